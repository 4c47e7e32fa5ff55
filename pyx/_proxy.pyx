# cython: language_level=3
"""Compiled twin of fastsni/proxy.py: read the ClientHello, route by SNI, relay."""

from libc.errno cimport EAGAIN, EINTR, errno
from posix.unistd cimport read, write

from errno import errorcode

from fastsni._engine import Relay, connect_backend
from fastsni.addresses import proxy_header
from fastsni.engine import CHUNK, CLOSING, errno_name
from fastsni._tls import HelloReader
from fastsni.proxy import ABSENT, BACKEND_SOCKET, HELLO_TIMEOUT, log
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, alert

cdef enum:
    C_CHUNK = 128 * 1024

assert CHUNK == C_CHUNK
cdef char _buffer[C_CHUNK]
cdef unsigned int C_CLOSING = CLOSING

# The counters of the SIGUSR1 line, as in the pure twin's COUNTS and ALERTS.
cdef unsigned long long _routed = 0, _closed_early = 0
cdef dict _alerts = {}


def counts():
    return {"routed": _routed, "closed_early": _closed_early, "alerts": dict(_alerts)}


cdef class TlsConnection:
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    cdef public object service
    cdef public int fd
    cdef public object reader
    cdef public object timer
    cdef public object name

    def __init__(self, service, int fd):
        self.service = service
        self.fd = fd
        self.reader = HelloReader()
        self.name = None
        service.reactor.add(fd, self)
        self.timer = service.reactor.call_later(HELLO_TIMEOUT, self.expire)

    def ready(self, int fd, unsigned int events):
        """Read what the client sent (edge-triggered: until the kernel has no more)."""
        global _closed_early
        cdef ssize_t got
        while True:
            got = read(fd, _buffer, C_CHUNK)
            if got < 0:
                if errno == EAGAIN or errno == EINTR:
                    return
                _closed_early += 1
                self.close()
                return
            if got == 0:
                _closed_early += 1
                self.close()
                return
            try:
                name = self.reader.feed(_buffer[:got])
            except HelloError as exc:
                self.fail(exc.alert, None, exc.reason)
                return
            if name is not None:
                self.route(name, got == C_CHUNK or (events & C_CLOSING) != 0)
                return
            if got < C_CHUNK and not events & C_CLOSING:
                return

    cdef route(self, str name, bint more):
        """Connect to the backend for ``name``; ``more``: the client may have sent more already."""
        global _routed
        self.timer.cancel()
        try:
            backend, proxy = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, f"{BACKEND_SOCKET}: {errno_name(exc)}")
            return
        cdef bytes hello = bytes(self.reader.received)
        self.reader = None
        if proxy:
            hello = proxy_header(proxy, self.fd, self.service.family, name) + hello  # one write
        _routed += 1
        self.name = name
        reactor = self.service.reactor
        Relay(reactor, self.fd, backend, hello, b"", self.relay_closed, more, self.backend_failed)

    def expire(self):
        self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    cpdef fail(self, int code, name, str reason):
        """Answer with one fatal alert, log one line, close."""
        _alerts[code] = _alerts.get(code, 0) + 1
        log(self.fd, name, reason)
        cdef bytes answer = alert(code)
        write(self.fd, <const char*>answer, len(answer))
        self.close()

    cpdef close(self):
        self.timer.cancel()
        self.reader = None
        self.service.reactor.close(self.fd)
        self.service.closed(self)

    def relay_closed(self):
        self.service.closed(self)

    def backend_failed(self, int err):
        """The backend reset (or failed) while relaying: one line, then the relay closes."""
        log(self.fd, self.name, f"{BACKEND_SOCKET}: {errorcode.get(err, err)} while relaying")

    def drain(self):
        """SIGHUP: nothing to do; a TLS stream has no request boundary to stop at."""
