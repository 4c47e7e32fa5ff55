"""Backends on Unix sockets for end-to-end tests, each serving in threads of the test process.

Blocking sockets and one thread per connection: simple, deterministic, and enough for
the loads the suite generates.  Every backend is closed (and its threads end) at
teardown.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


def reap(process: subprocess.Popen, timeout: float = 10) -> int:
    """Stop ``process`` if it still runs (SIGTERM, then SIGKILL after ``timeout`` s) and reap it."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def client_hello(name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real Python ssl client for ``name``: one ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def read_proxy_line(conn: socket.socket) -> bytes:
    """Read one PROXY v1 line (at most 107 bytes, spec §2.1) byte by byte, leaving the rest unread."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = conn.recv(1)
        if not byte or len(line) > 107:
            raise ConnectionError(f"bad PROXY line {line!r}")
        line += byte
    return line


def recv_until_eof(conn: socket.socket) -> bytes:
    """Everything the peer sends until it closes (or shuts down) its side."""
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    return bytes(data)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


class UnixBackend:
    """Listen on ``path``; run ``handle(conn)`` in a thread for each connection."""

    def __init__(self, path: Path, handle: Callable[[socket.socket], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = handle
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if len(str(path)) > 100:  # bind a long path relative to its directory
            cwd = os.getcwd()
            os.chdir(path.parent)
            try:
                self.sock.bind(path.name)
            finally:
                os.chdir(cwd)
        else:
            self.sock.bind(str(path))
        self.sock.listen(1024)
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                self.handle(conn)
        except Exception as exc:
            if not self.closed:
                self.errors.append(exc)

    def close(self) -> None:
        self.closed = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)
        for thread in self.threads:
            thread.join(5)


def tls_http_backend(ca, name: str, expect_proxy: bool = False, seen: list | None = None, label: str = ""):
    """A handler: (PROXY line), TLS with a certificate for ``name`` (ALPN h2 or http/1.1),
    then reply to one request with a body naming the backend (``label``, default ``name``)
    and the negotiated ALPN."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])

    def handle(conn: socket.socket) -> None:
        if expect_proxy:
            line = read_proxy_line(conn)
            if seen is not None:
                seen.append(line)
        with context.wrap_socket(conn, server_side=True) as tls:
            alpn = tls.selected_alpn_protocol()
            if alpn == "h2":
                # Enough of HTTP/2 to prove h2 was negotiated end to end: our SETTINGS,
                # then close; clients that asked for h2 only check the ALPN result.
                tls.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                return
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                request += chunk
            body = f"backend {label or name} alpn {alpn}\n".encode()
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError):
                pass

    return handle


def http_backend(label: str, status: int = 200):
    """A handler: plain HTTP/1.1 with keep-alive; each request (no body) is answered with
    ``status`` and a body naming ``label``, until the peer closes or asks to close."""

    def handle(conn: socket.socket) -> None:
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                pending += chunk
            head, pending = pending.split(b"\r\n\r\n", 1)
            body = f"backend {label}\n".encode()
            close = b"\r\nconnection: close" in head.lower()
            conn.sendall(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode()
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\n"
                + body
            )
            if close:
                return

    return handle


def run_as(uid: int, function: Callable[[], int], timeout: float = 30) -> tuple[int, str]:
    """Call ``function`` in a forked child running as ``uid`` (gid ``uid``, no other groups);
    (its return value as exit code, what it printed).  Needs root."""
    with tempfile.TemporaryFile("w+") as out:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                sys.stdout = sys.stderr = open(out.fileno(), "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                code = function()
            except BaseException as exc:
                sys.stderr.write(f"child failed: {exc!r}\n")
            finally:
                sys.stdout.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child running as uid {uid} did not finish in {timeout} s")
            time.sleep(0.02)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read()
