# cython: language_level=3
"""Compiled twin of fastsni/proxy.py: read the ClientHello, route by SNI, relay."""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from posix.unistd cimport write
cimport cython

from fastsni._engine cimport (
    _monotonic,
    connect_fd,
    new_relay,
    new_side,
    no_owner_log,
    Handler,
    Service,
    Side,
    Timer,
)
from fastsni._tls cimport HelloReader

from errno import errorcode

from fastsni._engine import fair_share_counts, local_of
from fastsni._addresses import describe, proxy_header
from fastsni.engine import cause, failure
from fastsni.logs import failures
from fastsni.ownerlog import owner_log
from fastsni.proxy import (  # not hot: the pure twin's own
    ABSENT,
    BACKEND_SOCKET,
    ENDINGS,
    HELLO_TIMEOUT,
    hello_cause,
    log,
    tell_owner,
)
from fastsni.tls import INTERNAL_ERROR, MARK_ECH, MARK_GREASE, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, alert

# The counters of the SIGUSR1 line, as in the pure twin's COUNTS, ALERTS and CAUSES.
cdef unsigned long long _routed = 0, _closed_early = 0, _hello_ech = 0, _hello_grease = 0, _relay_resets = 0
cdef dict _alerts = {}
cdef dict _causes = {}


def counts():
    return {
        "routed": _routed,
        "closed_early": _closed_early,
        "hello_ech": _hello_ech,
        "hello_grease": _hello_grease,
        "relay_resets": _relay_resets,
        **fair_share_counts(),
        "alerts": dict(_alerts),
        "causes": dict(_causes),
    }


def counted(int code, why):
    """One more alert ``code``, and one more of its cause ``why`` (if any)."""
    _alerts[code] = _alerts.get(code, 0) + 1
    if why is not None:
        key = f"alert_{code}_{why}"
        _causes[key] = _causes.get(key, 0) + 1


cdef class TlsConnection(Handler):
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    cdef public Service service
    cdef public int fd
    cdef public Side client
    cdef public HelloReader reader
    cdef public Timer timer
    cdef public object name
    cdef public double started
    cdef public object peer
    cdef public bint owner_line
    cdef public object relay

    REFUSED = alert(INTERNAL_ERROR)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, Service service, int fd, peer):
        self.service = service
        self.fd = fd
        self.peer = peer  # the client's address, as accept gave it: for log lines and PROXY headers
        self.client = new_side(service.reactor, fd)
        self.reader = HelloReader.__new__(HelloReader)  # HelloReader(), without a Python call
        self.name = None
        self.started = _monotonic()
        self.owner_line = False  # routed to an entry with an owner's log: a line when the relay ends
        self.relay = None
        self.timer = None  # the hello's deadline, set once a read finds it incomplete
        service.reactor.add(fd, self)

    @cython.nonecheck(True)  # reader: None once routed or closed (AttributeError, as before it was typed)
    cpdef ready(self, int fd, unsigned int events):
        """Read what the client sent (edge-triggered: until the kernel has no more)."""
        global _closed_early
        cdef Side client = self.client
        client.saw(events)
        while client.readable:
            data = client.read()
            if data is None:
                break
            if not data:  # closed (or reset) before the hello was complete: nothing to answer
                _closed_early += 1
                self.close()
                return
            try:
                name = self.reader.feed(data)
            except HelloError as exc:
                self.fail(exc.alert, None, exc.reason, hello_cause(exc))
                return
            if name is not None:
                self.route(name)
                return
        if self.timer is None:  # incomplete: the deadline holds however the rest trickles in
            self.timer = self.service.reactor.schedule(HELLO_TIMEOUT, self.expire, ())

    @cython.nonecheck(True)
    cdef route(self, str name):
        """Connect to the backend for ``name``; the client may have sent more already
        (``client.readable``), which the Relay reads."""
        global _routed, _hello_ech, _hello_grease
        cdef Side backend
        cdef bytearray received
        cdef int fd, proxy, marks
        cdef unsigned long long identity[2]  # unused here (fasthttpdir's keep-alive needs it)
        self.stop_timer()
        try:
            fd = connect_fd(name, BACKEND_SOCKET, &proxy, identity)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, failure(exc, BACKEND_SOCKET), cause(exc))
            return
        backend = new_side(self.service.reactor, fd)
        received = self.reader.received  # the hello goes first, untouched
        backend.queued = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(received), PyByteArray_GET_SIZE(received))
        marks = self.reader.marks()
        if marks:
            _hello_ech += marks & MARK_ECH
            _hello_grease += (marks & MARK_GREASE) >> 1
        self.reader = None
        self.owner_line = not no_owner_log(name, _monotonic()) and owner_log.target(name) >= 0
        if proxy:  # in one write with the hello
            backend.queued = proxy_header(proxy, self.peer, local_of(self.fd, self.service.family), name) + backend.queued
        _routed += 1
        self.name = name
        self.relay = new_relay(self.service.reactor, self.client, backend, self.relay_closed, self.backend_failed)

    def expire(self):
        self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    cpdef fail(self, int code, name, str reason, why=None):
        """Answer with one fatal alert, log one line (and one to the owner's log), close."""
        counted(code, why)
        client = describe(self.peer)
        failures.write(f"fastsni: {client} {name or '-'}: {reason}\n")
        if name is not None and why != "no_entry":
            tell_owner(name, client, f"alert_{code}", self.started, cause=why)
        cdef bytes answer = alert(code)
        write(self.fd, <const char*>answer, len(answer))
        self.close()

    cdef stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    cpdef close(self):
        self.stop_timer()
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
        relay, self.relay = self.relay, None  # it refers back to us: let both go now
        if self.owner_line:  # (no relay yet: it closed as it began)
            up, down = (relay.up, relay.down) if relay is not None else (None, None)
            tell_owner(self.name, describe(self.peer), "routed", self.started, up=up, down=down)
        self.service.closed(self)

    def backend_failed(self, int err):
        """The backend failed while relaying: a reset or broken pipe is how relays end
        (counted); anything else gets one line.  Then the relay closes."""
        global _relay_resets
        if err in ENDINGS:
            _relay_resets += 1
            return
        log(self.peer, self.name, f"{BACKEND_SOCKET}: {errorcode.get(err, err)} while relaying")

    def drain(self):
        """SIGHUP: nothing to do; a TLS stream has no request boundary to stop at."""
