# cython: language_level=3
"""Compiled twin of fastsni/proxy.py: read the ClientHello, route by SNI, relay."""

from posix.unistd cimport write

from fastsni._engine cimport Handler, Service, Side, Timer

from errno import errorcode

from fastsni._engine import Relay, connect_backend, fair_share_counts
from fastsni.addresses import proxy_header
from fastsni.engine import failure
from fastsni._tls import HelloReader
from fastsni.proxy import ABSENT, BACKEND_SOCKET, HELLO_TIMEOUT, log
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, alert

# The counters of the SIGUSR1 line, as in the pure twin's COUNTS and ALERTS.
cdef unsigned long long _routed = 0, _closed_early = 0
cdef dict _alerts = {}


def counts():
    return {"routed": _routed, "closed_early": _closed_early, **fair_share_counts(), "alerts": dict(_alerts)}


cdef class TlsConnection(Handler):
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    cdef public Service service
    cdef public int fd
    cdef public Side client
    cdef public object reader
    cdef public Timer timer
    cdef public object name

    REFUSED = alert(INTERNAL_ERROR)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, Service service, int fd):
        self.service = service
        self.fd = fd
        self.client = Side(service.reactor, fd)
        self.reader = HelloReader()
        self.name = None
        service.reactor.add(fd, self)
        self.timer = service.reactor.schedule(HELLO_TIMEOUT, self.expire, ())

    cpdef ready(self, int fd, unsigned int events):
        """Read what the client sent (edge-triggered: until the kernel has no more)."""
        global _closed_early
        cdef Side client = self.client
        client.saw(events)
        while client.readable:
            data = client.read()
            if data is None:
                return
            if not data:  # closed (or reset) before the hello was complete: nothing to answer
                _closed_early += 1
                self.close()
                return
            try:
                name = self.reader.feed(data)
            except HelloError as exc:
                self.fail(exc.alert, None, exc.reason)
                return
            if name is not None:
                self.route(name)
                return

    cdef route(self, str name):
        """Connect to the backend for ``name``; the client may have sent more already
        (``client.readable``), which the Relay reads."""
        global _routed
        cdef Side backend
        self.timer.cancel()
        try:
            fd, proxy, _ = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, failure(exc, BACKEND_SOCKET))
            return
        backend = Side(self.service.reactor, fd)
        backend.queued = bytes(self.reader.received)  # the hello goes first, untouched
        self.reader = None
        if proxy:  # in one write with the hello
            backend.queued = proxy_header(proxy, self.fd, self.service.family, name) + backend.queued
        _routed += 1
        self.name = name
        Relay(self.service.reactor, self.client, backend, self.relay_closed, self.backend_failed)

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

    def shed(self):
        """Out of descriptors (engine.Service.shed): close now if no backend was named yet."""
        if self.reader is None:
            return False  # routed (or closed)
        self.close()
        return True

    def relay_closed(self):
        self.service.closed(self)

    def backend_failed(self, int err):
        """The backend reset (or failed) while relaying: one line, then the relay closes."""
        log(self.fd, self.name, f"{BACKEND_SOCKET}: {errorcode.get(err, err)} while relaying")

    def drain(self):
        """SIGHUP: nothing to do; a TLS stream has no request boundary to stop at."""
