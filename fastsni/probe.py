"""Live probes of a backend's Unix sockets, shared by fastsni-deploy and fastsni-check.

- ``tls-socket``: a real TLS handshake with SNI = the name, offering ALPN h2 and
  http/1.1; the certificate must be valid for the name (chain verified against the
  system store or a CA file; ``insecure`` skips only the chain, never the handshake or
  the name).
- ``http-socket``: a real HTTP/1.1 request with ``Host: <name>``; the status must be
  below 500, or exactly the expected one.

When the backend's directory holds ``send-proxy-v2`` (or else ``send-proxy-v1``), a probe
first sends the PROXY header the proxies would, in its form for a connection without
client addresses: v2 command LOCAL, v1 ``UNKNOWN`` (proxy-protocol.txt §2.2, §2.1).

A probe retries until its deadline while the backend looks not ready yet (no socket,
refused, reset, timed out, a 5xx); a certificate that does not fit the name, or a
wrong status below 500, fails at once.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import time
from dataclasses import dataclass

SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL
RETRY_INTERVAL = 0.1  # seconds between attempts while a backend is starting
ALPN = ["h2", "http/1.1"]
LEAVES = ("tls-socket", "http-socket")
MAX_STATUS_LINE = 8192
# proxy-protocol.txt §2.2: signature, version 2 command LOCAL (0x20), family UNSPEC, no
# addresses: "the receiver must accept this connection as valid" (a health check).
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes((0x20, 0x00, 0x00, 0x00))
PROXY_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"  # §2.1: the receiver uses the connection's own addresses


class ProbeFailed(Exception):
    """A probe did not pass; the message is one line saying exactly what failed."""


class NotReady(ProbeFailed):
    """A failure worth retrying until the deadline: the backend may still be starting."""


class OutOfTime(NotReady):
    """An attempt ran into the deadline; an earlier attempt's failure says more, if there was one."""


@dataclass(frozen=True)
class ProbeOptions:
    cafile: str | None = None
    insecure: bool = False
    path: str = "/"
    expect_status: int | None = None
    timeout: float = 30.0


def add_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """The probe options, the same for fastsni-deploy and fastsni-check."""
    group = parser.add_argument_group("probes")
    group.add_argument("--cafile", metavar="FILE", help="verify certificates with FILE, not the system store")
    group.add_argument(
        "--insecure",
        action="store_true",
        help="skip certificate chain verification (staging); the handshake and the name are still checked",
    )
    group.add_argument("--path", default="/", help="request path of the HTTP probe (default /)")
    group.add_argument(
        "--expect-status", type=int, metavar="CODE", help="the HTTP probe must answer CODE (default: < 500)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"how long probes retry while a backend starts (default {timeout:g})",
    )


def options_from(args: argparse.Namespace) -> ProbeOptions:
    return ProbeOptions(args.cafile, args.insecure, args.path, args.expect_status, args.timeout)


def probe_name(entry: str) -> str:
    """The name to send for an entry: a wildcard ``*.example.com`` is probed as one name it covers."""
    return "wildcard-probe" + entry[1:] if entry.startswith("*.") else entry


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A blocking stream socket connected to the Unix socket at ``path``, any length.

    A path too long for sun_path is reached through its directory's descriptor in /proc.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(max(timeout, 0.001))
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            sock.connect(path)
        else:
            directory, leaf = os.path.split(path)
            dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{leaf}")
            finally:
                os.close(dirfd)
        return sock
    except BaseException:
        sock.close()
        raise


def proxy_header(directory: str) -> bytes:
    """What the proxies send first to a backend in ``directory``, in its probe form (v2 wins)."""
    if os.path.lexists(os.path.join(directory, "send-proxy-v2")):
        return PROXY_V2_LOCAL
    if os.path.lexists(os.path.join(directory, "send-proxy-v1")):
        return PROXY_V1_UNKNOWN
    return b""


def _connect(path: str, deadline: float) -> socket.socket:
    """Connect, and send the PROXY header the backend expects, if any."""
    try:
        sock = connect_unix(path, deadline - time.monotonic())
    except FileNotFoundError:
        raise NotReady(f"{path}: no such socket") from None
    except ConnectionRefusedError:
        raise NotReady(f"{path}: nobody listens (connection refused)") from None
    except (TimeoutError, BlockingIOError):
        raise OutOfTime(f"{path}: connect timed out") from None
    except OSError as exc:
        raise ProbeFailed(f"{path}: cannot connect: {exc.strerror or exc}") from None
    header = proxy_header(os.path.dirname(path))
    try:
        sock.sendall(header)
    except OSError as exc:
        sock.close()
        raise NotReady(f"{path}: the backend closed at once: {exc.strerror or exc}") from None
    return sock


def _tls_context(cafile: str | None = None, trusted_leaf: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile, cadata=trusted_leaf)
    if trusted_leaf is not None:
        # --insecure, second pass: trust exactly the certificate the server showed, so
        # OpenSSL still checks its name and dates but not who issued it.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.set_alpn_protocols(ALPN)
    return context


def _handshake(path: str, name: str, context: ssl.SSLContext, deadline: float) -> tuple[str, str, bytes]:
    """One handshake: (version, ALPN or '-', the server's certificate in DER)."""
    sock = _connect(path, deadline)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        with context.wrap_socket(sock, server_hostname=name) as tls:
            return tls.version() or "?", tls.selected_alpn_protocol() or "-", tls.getpeercert(True) or b""
    except ssl.SSLCertVerificationError as exc:
        raise ProbeFailed(f"{path}: certificate not valid for {name}: {exc.verify_message}") from None
    except TimeoutError:
        raise OutOfTime(f"{path}: TLS handshake did not complete in time") from None
    except ssl.SSLError as exc:
        raise NotReady(f"{path}: TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise NotReady(f"{path}: TLS handshake failed: {exc.strerror or exc}") from None
    finally:
        sock.close()


def probe_tls(path: str, name: str, options: ProbeOptions, deadline: float) -> str:
    """One TLS probe; returns e.g. 'TLSv1.3, ALPN h2'."""
    if options.insecure:
        unverified = _tls_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        _, _, leaf = _handshake(path, name, unverified, deadline)
        if not leaf:
            raise ProbeFailed(f"{path}: the server sent no certificate")
        context = _tls_context(trusted_leaf=ssl.DER_cert_to_PEM_cert(leaf))
    else:
        context = _tls_context(options.cafile)
    version, alpn, _ = _handshake(path, name, context, deadline)
    return f"{version}, ALPN {alpn}"


def _status_line(sock: socket.socket, path: str) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise NotReady(f"{path}: the backend closed without an answer")
        data += chunk
        if len(data) > MAX_STATUS_LINE:
            raise ProbeFailed(f"{path}: no HTTP status line in the first {MAX_STATUS_LINE} bytes")
    return data.split(b"\r\n", 1)[0]


def probe_http(path: str, name: str, options: ProbeOptions, deadline: float) -> str:
    """One HTTP probe; returns e.g. 'HTTP 200'."""
    sock = _connect(path, deadline)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        request = f"GET {options.path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n"
        sock.sendall(request.encode("ascii") + b"User-Agent: fastsni-probe\r\n\r\n")
        line = _status_line(sock, path)
    except TimeoutError:
        raise OutOfTime(f"{path}: no HTTP answer in time") from None
    except OSError as exc:
        raise NotReady(f"{path}: HTTP request failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProbeFailed(f"{path}: not an HTTP/1.x answer: {line[:80]!r}")
    status = int(parts[1])
    shown = line.decode("ascii", "backslashreplace")
    if options.expect_status is not None:
        if status != options.expect_status:
            failure = ProbeFailed if status < 500 else NotReady
            raise failure(f"{path}: GET {options.path} answered {shown!r}, expected {options.expect_status}")
    elif status >= 500:
        raise NotReady(f"{path}: GET {options.path} answered {shown!r} (5xx)")
    return f"HTTP {status}"


PROBES = {"tls-socket": probe_tls, "http-socket": probe_http}


def probe(path: str, name: str, options: ProbeOptions, deadline: float) -> str:
    """Probe the socket at ``path`` (its leaf says which probe), retrying until ``deadline``."""
    check = PROBES[os.path.basename(path)]
    last: NotReady | None = None
    while True:
        try:
            return check(path, name, options, deadline)
        except NotReady as exc:
            if not (isinstance(exc, OutOfTime) and last is not None):
                last = exc
            if time.monotonic() + RETRY_INTERVAL >= deadline:
                raise ProbeFailed(f"{last}, still when the time for probes ran out") from None
        time.sleep(RETRY_INTERVAL)


def sockets_in(directory: str) -> list[str]:
    """The leaves among tls-socket and http-socket that exist in ``directory`` (any file type)."""
    return [leaf for leaf in LEAVES if os.path.lexists(os.path.join(directory, leaf))]
