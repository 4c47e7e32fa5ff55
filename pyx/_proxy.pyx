# cython: language_level=3
"""Compiled twin of fastsni/proxy.py: read the ClientHello, route by SNI, relay."""

import asyncio

from fastsni._relay import LIVE, Side, take_over
from fastsni._tls import HelloReader
from fastsni.proxy import ABSENT, BACKEND_SOCKET, HELLO_TIMEOUT, log
from fastsni.relay import connect_backend, errno_name, proxy_v1_header
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, alert

cdef set _LIVE = LIVE
cdef object _get_running_loop = asyncio.get_running_loop


cdef class TlsFrontend:
    """An accepted client connection until its ClientHello names a backend."""

    cdef public object transport
    cdef public object reader
    cdef public object timer

    def __init__(self):
        self.transport = None
        self.reader = HelloReader()
        self.timer = None

    def connection_made(self, transport):
        self.transport = transport
        _LIVE.add(transport)
        self.timer = _get_running_loop().call_later(HELLO_TIMEOUT, self.expired)

    def data_received(self, data):
        try:
            name = self.reader.feed(data)
        except HelloError as exc:
            self.fail(exc.alert, None, exc.reason)
            return
        if name is not None:
            self.route(name)

    def route(self, str name):
        transport = self.transport
        transport.pause_reading()
        self.timer.cancel()
        try:
            sock, send_proxy = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, f"{BACKEND_SOCKET}: {errno_name(exc)}")
            return
        cdef bytes hello = bytes(self.reader.received)
        if send_proxy:
            peer = transport.get_extra_info("peername")
            hello = proxy_v1_header(peer, transport.get_extra_info("sockname")) + hello
        client = take_over(transport)
        loop = _get_running_loop()
        task = loop.create_task(loop.create_unix_connection(lambda: Side(client, hello), sock=sock))
        task.add_done_callback(lambda task: self.connected(task, client, name))

    def connected(self, task, client, str name):
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not client.closed:
            client.transport.write(alert(INTERNAL_ERROR))
            client.transport.close()
            log(self.transport.get_extra_info("peername"), name, f"backend: {exc!r}")

    def expired(self):
        if not self.transport.is_closing():
            self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    cpdef fail(self, int code, name, str reason):
        transport = self.transport
        transport.write(alert(code))
        transport.close()
        log(transport.get_extra_info("peername"), name, reason)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.timer.cancel()
        _LIVE.discard(self.transport)
