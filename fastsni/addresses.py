"""Socket addresses as the proxies show them: the PROXY v1 line, the client IP for
X-Forwarded-For, and the ``ip:port`` of log lines.  Not on the hot path: pure only.
"""

from __future__ import annotations

import socket


def _plain_ip(address: str) -> tuple[int, str]:
    """(4 or 6, address) with IPv4-mapped IPv6 unwrapped and any %scope dropped."""
    if ":" not in address:
        return 4, address
    address = address.split("%", 1)[0]
    if address.lower().startswith("::ffff:") and "." in address:
        return 4, address[7:]
    return 6, address


def proxy_v1_header(client: tuple, server: tuple) -> bytes:
    """The PROXY protocol v1 line (haproxy proxy-protocol.txt §2.1) for a TCP connection."""
    client_family, client_ip = _plain_ip(client[0])
    server_family, server_ip = _plain_ip(server[0])
    if client_family != server_family:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY TCP{client_family} {client_ip} {server_ip} {client[1]} {server[1]}\r\n".encode("ascii")


def client_ip(address: tuple) -> str:
    """The client's IP as shown to backends: IPv4-mapped IPv6 as plain IPv4."""
    return _plain_ip(address[0])[1]


def describe(address: tuple) -> str:
    """``ip:port`` or ``[ip]:port`` for log lines."""
    family, ip = _plain_ip(address[0])
    return f"{ip}:{address[1]}" if family == 4 else f"[{ip}]:{address[1]}"


def _wrap(fd: int, family: int) -> socket.socket:
    """A socket object for ``fd``; with its family known, Python asks the kernel nothing."""
    if family:
        return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    return socket.socket(fileno=fd)


def peer_of(fd: int, family: int = 0) -> tuple:
    """The peer address of a connected TCP socket descriptor (of ``family``, 0: ask)."""
    sock = _wrap(fd, family)
    try:
        return sock.getpeername()
    finally:
        sock.detach()


def of_descriptor(fd: int, family: int = 0) -> tuple[tuple, tuple]:
    """(peer, local) addresses of a connected TCP socket descriptor (of ``family``, 0: ask)."""
    sock = _wrap(fd, family)
    try:
        return sock.getpeername(), sock.getsockname()
    finally:
        sock.detach()
