"""Capture real TLS ClientHello byte streams on loopback, for tests/fixtures/hellos/.

Run by hand (the test suite never runs it; it only reads the .bin files it wrote):

    python3 tests/capture_hellos.py              # capture every client in CAPTURES
    python3 tests/capture_hellos.py NAME ...     # only these files, e.g. curl.bin

For each capture it listens on 127.0.0.1 (an ephemeral port) with a plain TCP socket,
starts the client against that port (bounded by a timeout), accepts one connection,
reads until a complete ClientHello has arrived -- following the TLS record lengths
(RFC 8446 §5.1) and the handshake message length (§4) -- and saves exactly the bytes
of the records that carry the ClientHello.  Then it closes the connection (the client
sees a failed handshake, which is expected) and reaps the client.  No certificate and
no TLS server are involved; nothing leaves the loopback interface.

Each capture's client, command and expected server name are in CAPTURES below and
in tests/fixtures/hellos/README.md; tests/test_tls.py holds the expected names too.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "fixtures" / "hellos"
TIMEOUT = 10  # seconds, for the client process and for each socket operation

# A 253-byte name (the longest check_hostname accepts): three 63-byte labels and one 61-byte.
LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56 + ".test"])
assert len(LONG_NAME) == 253, len(LONG_NAME)

OPENSSL = ["openssl", "s_client", "-connect", "127.0.0.1:{port}"]

# file name -> (client, command with {port}, expected server name or None for "no SNI")
CAPTURES: dict[str, tuple[str, list[str], str | None]] = {
    "openssl-tls13.bin": (
        "openssl s_client",
        [*OPENSSL, "-tls1_3", "-servername", "tls13.example.test"],
        "tls13.example.test",
    ),
    "openssl-tls12.bin": (
        "openssl s_client",
        [*OPENSSL, "-tls1_2", "-servername", "tls12.example.test"],
        "tls12.example.test",
    ),
    "openssl-noservername.bin": ("openssl s_client", [*OPENSSL, "-noservername"], None),
    "openssl-long-name.bin": ("openssl s_client", [*OPENSSL, "-servername", LONG_NAME], LONG_NAME),
    "curl.bin": (
        "curl",
        [
            "curl",
            "-k",
            "-sS",
            "--max-time",
            str(TIMEOUT),
            "--resolve",
            "curl.example.test:{port}:127.0.0.1",
            "https://curl.example.test:{port}/",
        ],
        "curl.example.test",
    ),
    "python-ssl.bin": (
        "Python ssl",
        [sys.executable, __file__, "--python-client", "{port}", "py.example.test"],
        "py.example.test",
    ),
}


def hello_end(data: bytes) -> int | None:
    """The offset just past the record that completes the first ClientHello, or None if incomplete."""
    at = 0
    handshake = bytearray()
    while len(data) - at >= 5:
        if data[at] != 22:
            raise ValueError(f"record type {data[at]} is not handshake")
        length = data[at + 3] << 8 | data[at + 4]
        if len(data) - at - 5 < length:
            return None
        handshake += data[at + 5 : at + 5 + length]
        at += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ValueError(f"handshake type {handshake[0]} is not ClientHello")
            if len(handshake) >= 4 + (handshake[1] << 16 | handshake[2] << 8 | handshake[3]):
                return at
    return None


def capture(out: Path, command: list[str]) -> bytes:
    """Run ``command`` (with {port} filled in) against a one-shot listener; save its ClientHello."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        argv = [part.format(port=port) for part in command]
        client = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(TIMEOUT)
                data = b""
                while (end := hello_end(data)) is None:
                    chunk = connection.recv(65536)
                    if not chunk:
                        raise RuntimeError(f"{argv}: connection closed after {len(data)} bytes")
                    data += chunk
        finally:
            try:
                client.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
    out.write_bytes(data[:end])
    return data[:end]


def python_client(port: int, name: str) -> None:
    """The Python ssl client: default context, SNI ``name``, ALPN h2 and http/1.1."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=name):
                pass
        except (OSError, ssl.SSLError):
            pass  # the listener closes without answering: expected


def main(argv: list[str]) -> None:
    if argv[:1] == ["--python-client"]:
        python_client(int(argv[1]), argv[2])
        return
    names = argv or list(CAPTURES)
    HERE.mkdir(parents=True, exist_ok=True)
    for name in names:
        client, command, expected = CAPTURES[name]
        data = capture(HERE / name, command)
        print(f"{name}: {len(data)} bytes from {client}, expected name {expected!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
