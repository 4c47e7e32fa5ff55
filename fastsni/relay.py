"""Backend connect, PROXY v1 header and the two-way relay, shared by both proxies (pure twin).

This module is the specification; ``pyx/_relay.pyx`` mirrors it function for function.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from fastsni import engine

HIGH_WATER = 64 * 1024  # per direction: pause the reading side above this much unsent

# Client transports with a connection open, for the graceful drain on SIGHUP.
LIVE: set = set()


def connect_backend(name: str, leaf: str) -> tuple[socket.socket, bool]:
    """fastsni.engine.connect_backend, returning a socket object for transports."""
    fd, send_proxy = engine.connect_backend(name, leaf)
    return socket.socket(fileno=fd), send_proxy


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


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


def shutdown_write(transport: asyncio.Transport) -> None:
    """shutdown(SHUT_WR) on the transport's socket, behind the event loop's back.

    Used instead of transport.write_eof(), which crashed uvloop 0.23 under load; it
    is only called once the transport's write buffer is empty.
    """
    fd = transport.get_extra_info("socket").fileno()
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already; its reset arrives as connection_lost
    finally:
        sock.detach()


class Side(asyncio.Protocol):
    """One end of a relay: bytes read here are written to ``peer``.

    Flow control: when the peer's unsent bytes pass HIGH_WATER, reading here pauses
    until they drain.  Half-close: EOF here becomes shutdown(SHUT_WR) on the peer
    (after its unsent bytes are out) while the other direction keeps flowing; once
    both ends sent EOF both are closed.  A reset or error on either closes both.
    """

    def __init__(self, peer: Side | None = None, greeting: bytes = b"") -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.greeting = greeting  # written first, before the peer is read
        self.eof = False  # this end sent EOF
        self.shut_pending = False  # shutdown_write waits for the buffer to drain
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER)
        peer = self.peer
        if peer is None:
            return
        if peer.closed:
            transport.close()
            return
        peer.peer = self
        if self.greeting:
            transport.write(self.greeting)
            self.greeting = b""
        peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer.eof:
            self.transport.close()
            peer.transport.close()
        else:
            peer.shut_write()
        return True

    def shut_write(self) -> None:
        transport = self.transport
        if transport.get_write_buffer_size() == 0:
            shutdown_write(transport)
        else:
            # With both limits at 0, resume_writing fires once the buffer is empty.
            self.shut_pending = True
            transport.set_write_buffer_limits(0, 0)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.shut_pending:
            self.shut_pending = False
            if not self.transport.is_closing():
                shutdown_write(self.transport)
        else:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        LIVE.discard(self.transport)
        peer = self.peer
        if peer is not None and not peer.closed and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()


def take_over(transport: asyncio.Transport) -> Side:
    """Make an open, paused client transport one end of a relay (it was reading a hello or a request)."""
    side = Side()
    side.transport = transport
    transport.set_protocol(side)
    transport.set_write_buffer_limits(HIGH_WATER)
    return side
