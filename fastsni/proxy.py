"""fastsni's per-connection protocol: read the ClientHello, route by SNI, relay (pure twin).

This module is the specification; ``pyx/_proxy.pyx`` mirrors it function for function.
"""

from __future__ import annotations

import asyncio
import errno
import sys

from fastsni.relay import LIVE, Side, connect_backend, describe, errno_name, proxy_v1_header, take_over
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, HelloReader, alert

HELLO_TIMEOUT = 10.0  # seconds from accept to a complete ClientHello
BACKEND_SOCKET = "tls-socket"
# connect() errors that mean "nobody serves this name here" (RFC 6066 §3 unrecognized_name).
ABSENT = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ECONNREFUSED))


def log(address: tuple, name: str | None, reason: str) -> None:
    sys.stderr.write(f"fastsni: {describe(address)} {name or '-'}: {reason}\n")


class TlsFrontend(asyncio.Protocol):
    """An accepted client connection until its ClientHello names a backend."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = HelloReader()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        LIVE.add(transport)
        self.timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self.expired)

    def data_received(self, data: bytes) -> None:
        try:
            name = self.reader.feed(data)
        except HelloError as exc:
            self.fail(exc.alert, None, exc.reason)
            return
        if name is not None:
            self.route(name)

    def route(self, name: str) -> None:
        transport = self.transport
        transport.pause_reading()
        self.timer.cancel()
        try:
            sock, send_proxy = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, f"{BACKEND_SOCKET}: {errno_name(exc)}")
            return
        hello = bytes(self.reader.received)
        if send_proxy:
            peer = transport.get_extra_info("peername")
            hello = proxy_v1_header(peer, transport.get_extra_info("sockname")) + hello
        client = take_over(transport)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_unix_connection(lambda: Side(client, hello), sock=sock))
        task.add_done_callback(lambda task: self.connected(task, client, name))

    def connected(self, task: asyncio.Task, client: Side, name: str) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not client.closed:
            client.transport.write(alert(INTERNAL_ERROR))
            client.transport.close()
            log(self.transport.get_extra_info("peername"), name, f"backend: {exc!r}")

    def expired(self) -> None:
        if not self.transport.is_closing():
            self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    def fail(self, code: int, name: str | None, reason: str) -> None:
        transport = self.transport
        transport.write(alert(code))
        transport.close()
        log(transport.get_extra_info("peername"), name, reason)

    def eof_received(self) -> bool:
        # A client that closes before its hello is complete is simply closed.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        LIVE.discard(self.transport)
