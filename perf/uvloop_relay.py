"""The design card's shape, kept as a perf/ peer: uvloop protocols piping transports.

A minimal SNI relay on uvloop: the listening socket on fd 0, the current directory as
the hosts directory, the ClientHello read with fastsni's own reader (the compiled twin
when built), then ``<name>/tls-socket`` joined to the client by two protocols that
pause each other's reading while a transport's buffer is full.  No alerts, no
deadline, no PROXY header: only what a relay needs, so each regression run shows what
the engine buys over the card's first idea (perf/README.md).  Not a product: run it
only from perf/bench.py.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop

from fastsni import twins

tls = twins.load("fastsni.tls", "fastsni._tls")


class Side(asyncio.Protocol):
    """One transport of a relay; bytes it receives go to ``peer``'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False  # our transport received EOF (passed on as the other's write_eof)

    def other(self) -> asyncio.Transport | None:
        """The other side's transport while it is open."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return None
        return peer.transport

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        other = self.other()
        if other is not None:
            other.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other()
        if other is None:
            return False
        other.write_eof()
        if self.peer.eof:  # both directions ended: close both, or nothing ever would
            other.close()
            return False
        return True  # keep our side open until the other direction ends

    def connection_lost(self, exc) -> None:
        other = self.other()
        self.peer = None
        if other is not None:
            other.close()

    def pause_writing(self) -> None:  # our transport is full: stop reading the other side
        other = self.other()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other()
        if other is not None:
            other.resume_reading()


class Client(Side):
    """The client side: read the hello, connect the backend, then relay."""

    def __init__(self) -> None:
        super().__init__()
        self.reader = tls.HelloReader()

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            super().data_received(data)
            return
        try:
            name = self.reader.feed(data)
        except tls.HelloError:
            self.transport.close()
            return
        if name is not None:
            hello, self.reader = bytes(self.reader.received), None
            self.transport.pause_reading()
            asyncio.ensure_future(self.route(name, hello))

    async def route(self, name: str, hello: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_unix_connection(Side, f"{name}/tls-socket")
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while we connected
            backend.transport.close()
            return
        backend.peer, self.peer = self, backend
        backend.transport.write(hello)
        self.transport.resume_reading()


async def serve() -> None:
    listener = socket.socket(fileno=0)
    listener.setblocking(False)
    server = await asyncio.get_running_loop().create_server(Client, sock=listener, backlog=65535)
    async with server:
        await server.serve_forever()


def main() -> None:
    """``uvloop_relay.py [asyncio]``: on uvloop, or with ``asyncio`` on the stock loop (the
    same protocols, for comparison)."""
    if sys.argv[1:] == ["asyncio"]:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
