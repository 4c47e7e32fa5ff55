"""No Nagle stalls: the proxies set TCP_NODELAY once on the listening socket, every
accepted connection inherits it, and a backend's two small writes in a row reach the
client without waiting for its delayed ACK (~40 ms).  Both proxies, both twins."""

from __future__ import annotations

import ctypes
import os
import socket
import time

import pytest
from backends import client_hello, recv_exactly

ROUNDS = 40  # exchanges per connection; each is ~PAUSE without Nagle, ~40 ms with it
PAUSE = 0.002  # between the backend's two writes, so the proxy relays them as two
STALL = 0.025  # a gap this long between the two pieces is a Nagle stall (delayed ACK: 40 ms)
NOISE = 2  # gaps that long allowed for a busy machine's scheduling; Nagle stalls all but the first
SYS_PIDFD_GETFD = 438  # x86-64 and arm64


def proxy_descriptor_for(pid: int, client: socket.socket) -> socket.socket:
    """A duplicate (pidfd_getfd(2)) of the proxy's descriptor for ``client``'s connection."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            sock = socket.socket(fileno=fd)
            try:
                if sock.family == client.family and sock.getpeername() == client.getsockname():
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("the proxy holds no descriptor for this connection")


def two_pieces(first: bytes, second: bytes, before: int):
    """A backend: read ``before`` bytes (the hello), then per ping write two pieces."""

    def handle(conn: socket.socket) -> None:
        recv_exactly(conn, before)
        while conn.recv(65536):  # one ping (or request) per read: the client waits for the answer
            conn.sendall(first)
            time.sleep(PAUSE)
            conn.sendall(second)

    return handle


def gaps(sock: socket.socket, request: bytes, first: bytes, second: bytes) -> list[float]:
    """Per exchange, seconds between the first piece's arrival and the second's."""
    measured = []
    for _ in range(ROUNDS):
        sock.sendall(request)
        assert recv_exactly(sock, len(first)) == first
        start = time.monotonic()
        assert recv_exactly(sock, len(second)) == second
        measured.append(time.monotonic() - start)
    return measured


def assert_no_stalls(measured: list[float]) -> None:
    stalled = [gap for gap in measured if gap >= STALL]
    assert len(stalled) <= NOISE, (
        f"{len(stalled)} of {len(measured)} exchanges stalled: {sorted(stalled)[-5:]}"
    )


def test_fastsni_accepted_sockets_inherit_nodelay_and_never_stall(twin, hosts, proxies, backends):
    hello = client_hello("a.test")
    backends(hosts / "a.test" / "tls-socket", two_pieces(b"first", b"second", len(hello)))
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(hello)
        measured = gaps(sock, b"ping", b"first", b"second")
        assert_no_stalls(measured)
        with proxy_descriptor_for(proxy.process.pid, sock) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_fasthttpdir_accepted_sockets_inherit_nodelay_and_never_stall(twin, hosts, proxies, backends):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    backends(hosts / "a.test" / "http-socket", two_pieces(head, b"body", 0))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        measured = gaps(sock, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", head, b"body")
        assert_no_stalls(measured)
        with proxy_descriptor_for(proxy.process.pid, sock) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
