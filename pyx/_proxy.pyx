# cython: language_level=3
"""Compiled twin of fastsni/proxy.py: read the ClientHello, route by SNI, relay."""

from libc.errno cimport EAGAIN, EINTR, errno
from posix.unistd cimport close, read, write

from fastsni._engine import Relay, connect_backend
from fastsni._tls import HelloReader
from fastsni.proxy import ABSENT, BACKEND_SOCKET, HELLO_TIMEOUT, addresses, log
from fastsni.relay import errno_name, proxy_v1_header
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, alert

cdef enum:
    C_CHUNK = 128 * 1024

cdef char _buffer[C_CHUNK]


cdef class TlsConnection:
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    cdef public object service
    cdef public int fd
    cdef public object reader
    cdef public object timer

    def __init__(self, service, int fd):
        self.service = service
        self.fd = fd
        self.reader = HelloReader()
        loop = service.loop
        loop.add_reader(fd, self.readable)
        self.timer = loop.call_later(HELLO_TIMEOUT, self.expire)

    def readable(self):
        cdef ssize_t got = read(self.fd, _buffer, C_CHUNK)
        if got < 0:
            if errno == EAGAIN or errno == EINTR:
                return
            self.close()
            return
        if got == 0:
            self.close()
            return
        try:
            name = self.reader.feed(_buffer[:got])
        except HelloError as exc:
            self.fail(exc.alert, None, exc.reason)
            return
        if name is not None:
            self.route(name)

    cdef route(self, str name):
        self.timer.cancel()
        try:
            backend, send_proxy = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, f"{BACKEND_SOCKET}: {errno_name(exc)}")
            return
        cdef bytes hello = bytes(self.reader.received)
        self.reader = None
        if send_proxy:
            hello = proxy_v1_header(*addresses(self.fd)) + hello
        Relay(self.service.loop, self.fd, backend, hello, b"", self.relay_closed)

    def expire(self):
        self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    cpdef fail(self, int code, name, str reason):
        """Answer with one fatal alert, log one line, close."""
        log(self.fd, name, reason)
        cdef bytes answer = alert(code)
        write(self.fd, <const char*>answer, len(answer))
        self.close()

    cpdef close(self):
        self.timer.cancel()
        self.reader = None
        self.service.loop.remove_reader(self.fd)
        close(self.fd)
        self.service.closed(self)

    def relay_closed(self):
        self.service.closed(self)
