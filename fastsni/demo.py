"""``fastsni-demo [--once]``: fastsni on a loopback port in front of a sample TLS backend.

Makes a temporary hosts directory with ``demo.localhost/tls-socket`` served by a
small HTTPS server (a self-signed certificate made with the openssl command), starts
fastsni on 127.0.0.1 with that directory as its current directory, fetches one page
through it to show it works, prints the curl line that reaches it, and keeps serving
until Ctrl-C (with --once: exits after the check).  Everything is removed at exit.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "demo.localhost"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The sample backend: one HTTP/1.1 response per connection."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    tls = writer.get_extra_info("ssl_object")
    body = f"Hello from the {NAME} backend: TLS {tls.version()} ended here, not in fastsni.\n".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()


def fetch(port: int, cert: Path) -> str:
    context = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]


async def run(once: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="fastsni-demo-") as temporary:
        top = Path(temporary)
        cert, key = make_certificate(top)
        hosts = top / "hosts"
        (hosts / NAME).mkdir(parents=True)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["http/1.1"])
        backend = await asyncio.start_unix_server(answer, str(hosts / NAME / "tls-socket"), ssl=context)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastsni", stdin=listener.fileno(), cwd=hosts
        )
        listener.close()
        try:
            body = await asyncio.to_thread(fetch, port, cert)
            print(f"fetched through fastsni: {body.strip()}", flush=True)
            print(
                f"\nhosts directory: {hosts}\ntry:  curl --cacert {cert} "
                f"--resolve {NAME}:{port}:127.0.0.1 https://{NAME}:{port}/",
                flush=True,
            )
            if not once:
                print("Ctrl-C stops the demo.", flush=True)
                await proxy.wait()
        finally:
            if proxy.returncode is None:
                proxy.terminate()
                await proxy.wait()
            backend.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--once"]):
        sys.stderr.write("usage: fastsni-demo [--once]\n")
        raise SystemExit(2)
    try:
        raise SystemExit(asyncio.run(run(once=bool(args))))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
