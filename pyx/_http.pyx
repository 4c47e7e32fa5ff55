# cython: language_level=3
"""Compiled twin of fasthttpdir/proxy.py: request framing, host extraction, the connection.

It mirrors the pure module function for function; that module is the specification.

One client connection carries a queue of parsed requests.  The first one is the
exchange in progress: its head and body go to the backend of its host while the
backend's answer goes back to the client byte for byte, parsed only to find where
it ends.  One request at a time is in flight per backend connection, so answers
reach the client in request order; the backend connection is reused while
consecutive requests name the same host and it still leads to the same socket.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy, strlen

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)

from fastsni._engine cimport _monotonic, connect_fd, new_side, no_owner_log, Handler, Reactor, Service, Side, Timer

import sys
from collections import deque
from errno import errorcode

import httptools

from fastsni._engine import Relay, fair_share_counts, local_of, shutdown_write, socket_identity
from fastsni._tls import check_hostname
from fastsni._addresses import client_ip, describe, proxy_header
from fasthttpdir.proxy import (  # shared with the pure twin, not copied: not on the hot path
    BACKEND_SOCKET,
    CAUSES,
    DROPPED,
    ENDINGS,
    HEAD_TIMEOUT,
    HIGH_WATER,
    LINGER,
    MAX_HEAD,
    RECHECK,
    REMEMBERED_NAMES,
    REMEMBERED_VALUE,
    Rejected,
    error_response,
    failed,
    https_path,  # with redirect_response: what refusal() answers for a TLS-only host
    kept_in_trailers,
    log,
    redirect_response,
    refusal,
    response,
    tell_owner,
)

__all__ = ["HttpConnection", "Rejected", "host_name", "frame"]


cdef dict _names = {}  # Host values that passed, and their names: see the pure twin
cdef dict _sockets = {}  # each name's socket as looked up lately: see the pure twin
cdef bint _sweeping = False  # a sweep is scheduled
cdef double C_RECHECK = RECHECK
# The shared constants as C values: compared per request without a Python object in sight.
cdef Py_ssize_t C_HIGH_WATER = HIGH_WATER
cdef Py_ssize_t C_MAX_HEAD = MAX_HEAD
cdef double C_HEAD_TIMEOUT = HEAD_TIMEOUT
cdef double C_LINGER = LINGER
cdef frozenset C_DROPPED = DROPPED
cdef bytes C_GET = b"GET", C_HEAD = b"HEAD"
# RFC 9110 §5.6.2 token characters without "_" (see the pure twin's SIMPLE_FIELD)
cdef unsigned char C_TCHAR[256]
cdef const unsigned char* _t = b"!#$%&'*+-.^`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
while _t[0]:
    C_TCHAR[_t[0]] = 1
    _t += 1


# The counters of the SIGUSR1 line, as in the pure twin's COUNTS and ANSWERED (and its
# CAUSES, shared: counted only where a request failed).
cdef unsigned long long _routed = 0, _up = 0, _down = 0, _relay_resets = 0
cdef dict _answered = {}


cpdef bint still_leads_to(str name, object identity, double now) except -1:
    """Whether ``name``'s http-socket, as looked up at most RECHECK seconds before ``now``,
    is still ``identity``; True if no lookup can be made (out of descriptors)."""
    cdef tuple seen = _sockets.get(name)
    if seen is None or now - <double>seen[0] >= C_RECHECK:
        try:
            current = socket_identity(name, BACKEND_SOCKET)
        except OSError:
            return True
        if len(_sockets) >= REMEMBERED_NAMES:
            _sockets.clear()
        seen = (now, current)
        _sockets[name] = seen
    return seen[1] == identity


def sweep(Service service):
    """Every RECHECK seconds while a connection waits between requests with its backend
    connection open: close the backend connections whose name leads elsewhere now."""
    global _sweeping
    cdef HttpConnection connection
    cdef double now = _monotonic()
    cdef bint waiting = False
    for connection in list(service.live):
        if connection.backend is not None and connection.active is None:
            if still_leads_to(connection.backend_name, connection.backend_socket, now):
                waiting = True
            else:
                connection.drop_backend()
    _sweeping = waiting
    if waiting:
        service.reactor.schedule(C_RECHECK, sweep, (service,))


def counts():
    return {
        "routed": _routed,
        "up": _up,
        "down": _down,
        "relay_resets": _relay_resets,
        **fair_share_counts(),
        "answered": dict(_answered),
        "causes": dict(CAUSES),
    }


def _authority_name(authority):
    """``host[:port]`` -> the directory name: port dropped, one trailing dot dropped, lowercased."""
    if authority[:1] == b"[":
        raise Rejected(400, "IPv6 literal in host")
    host, colon, port = authority.rpartition(b":")
    if not colon:
        host = authority
    elif not port.isdigit() or not port.isascii():
        raise Rejected(400, "bad port in host")
    if host.endswith(b"."):
        host = host[:-1]
    name = check_hostname(host)
    if name is None:
        raise Rejected(400, "invalid host name")
    return name


cpdef str host_name(hosts, target):
    """The backend directory of a request with these Host values and request-target.

    Exactly one Host; an absolute-form target's authority must name the same host.
    Raises Rejected(400) otherwise.
    """
    if len(hosts) != 1:
        raise Rejected(400, "no Host header" if not hosts else "several Host headers")
    value = hosts[0]
    name = _names.get(value)  # the same few hosts, request after request
    if name is None:
        name = _authority_name(value.strip(b" \t"))  # RFC 9110 §5.5: OWS is not part of the value
        if len(value) <= REMEMBERED_VALUE:
            if len(_names) >= REMEMBERED_NAMES:
                _names.clear()
            _names[value] = name
    if target[:1] == b"/" or target == b"*":
        return name
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise Rejected(400, "bad request target")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        index = rest.find(stop)
        if 0 <= index < end:
            end = index
    authority = rest[:end]
    if b"@" in authority:
        raise Rejected(400, "userinfo in request target")
    if _authority_name(authority) != name:
        raise Rejected(400, "request target and Host disagree")
    return name


cdef inline bint _named(const unsigned char* at, Py_ssize_t size, const char* lowered) noexcept:
    """Whether the ``size`` bytes at ``at`` are ``lowered``, ASCII letters in either case
    (bytes.lower() in the pure twin; no locale)."""
    cdef Py_ssize_t i
    if size != <Py_ssize_t>strlen(lowered):
        return False
    for i in range(size):
        if (at[i] | 0x20 if 0x41 <= at[i] <= 0x5A else at[i]) != <unsigned char>lowered[i]:
            return False
    return True


cdef Py_ssize_t _simple_field(const unsigned char* p, Py_ssize_t at, Py_ssize_t* colon) noexcept:
    """The pure twin's _simple_fields, one line: where the field line at ``at`` ends (its
    CR) if it is simple, with ``colon`` set where its name ends; else -1.  A CRLF CRLF
    must follow in ``p``: every scan stops at its CR at the latest."""
    cdef Py_ssize_t start = at
    while C_TCHAR[p[at]]:
        at += 1
    if at == start or p[at] != 58 or p[at + 1] != 32:  # ": "
        return -1
    colon[0] = at
    at += 2
    if p[at] == 32 or p[at] == 9:
        return -1
    while p[at] == 9 or 0x20 <= p[at] <= 0x7E:
        at += 1
    if p[at] != 13 or p[at + 1] != 10:
        return -1
    return at


cdef int _keeps_alive(const unsigned char* value, Py_ssize_t size) noexcept:
    """A simple message's Connection value: "close" 0, "keep-alive" 1, anything else -1."""
    if _named(value, size, b"close"):
        return 0  # RFC 9112 §9.6
    return 1 if _named(value, size, b"keep-alive") else -1


cpdef tuple simple_answer(bytes data, bint head):
    """(status, keep-alive) if ``data`` is one whole simple answer and nothing more (just
    its head if it answers a HEAD); else None: see the pure twin."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t at, colon, end, value, head_end, i
    cdef long long length = -1
    cdef int status, keep_alive = 1, option
    cdef const unsigned char* found = <const unsigned char*>memmem(p, n, b"\r\n\r\n", 4)
    if found == NULL or n < 17 or memcmp(p, b"HTTP/1.1 ", 9) != 0:
        return None
    head_end = found - p
    if not (0x32 <= p[9] <= 0x35 and 0x30 <= p[10] <= 0x39 and 0x30 <= p[11] <= 0x39) or p[12] != 32:
        return None
    status = (p[9] - 0x30) * 100 + (p[10] - 0x30) * 10 + p[11] - 0x30
    if status == 204 or status == 304:  # no body whatever the fields say (RFC 9112 §6.3)
        return None
    at = 13
    while p[at] == 9 or 0x20 <= p[at] <= 0x7E:
        at += 1
    if p[at] != 13 or p[at + 1] != 10:
        return None
    at += 2
    while at < head_end + 2:
        end = _simple_field(p, at, &colon)
        if end < 0:
            return None
        value = colon + 2
        if _named(p + at, colon - at, b"content-length"):
            if length >= 0 or end == value or end - value > 15:
                return None
            length = 0
            for i in range(value, end):
                if not 0x30 <= p[i] <= 0x39:
                    return None
                length = length * 10 + p[i] - 0x30
        elif _named(p + at, colon - at, b"connection") or _named(p + at, colon - at, b"proxy-connection"):
            option = _keeps_alive(p + value, end - value)
            if option < 0:
                return None
            keep_alive &= option
        elif _named(p + at, colon - at, b"transfer-encoding") or _named(p + at, colon - at, b"upgrade"):
            return None
        at = end + 2
    if length < 0 or n - head_end - 4 != (0 if head else length):
        return None
    return (status, bool(keep_alive))


cdef class Request:
    """One parsed request: what goes to the backend, and how far it has arrived."""

    cdef public object name
    cdef public bytes method
    cdef public bytes target
    cdef public list data
    cdef public Py_ssize_t size
    cdef public bint complete
    cdef public bint keep_alive
    cdef public bint upgrade
    cdef public bint chunked
    cdef public object error
    cdef public bytes replay
    cdef public bint has_body

    def __init__(self):
        self.name = None
        self.method = b""
        self.target = b""
        self.data = []  # head and body bytes not yet written to a backend
        self.size = 0  # bytes in data
        self.complete = False  # the whole request was parsed
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.error = None
        self.replay = b""  # the head again, for a retry on a backend that closed idle
        self.has_body = False


cdef class RequestReader:
    """httptools callbacks: turn client bytes into Request objects with their raw bodies.

    ``requests`` collects each request as its head completes; body bytes are appended
    to the newest request's ``data`` (chunked bodies re-framed as chunks of the same
    bytes, trailers kept).
    """

    cdef public bytes forwarded_for
    cdef public object parser
    cdef public object requests
    cdef public Request current
    cdef public bytes target
    cdef public list headers
    cdef public list hosts
    cdef public bint in_head
    cdef public Py_ssize_t head_size
    cdef public list trailers
    cdef public bytes held
    cdef public object rejected
    cdef public bint reparse
    cdef public bytes chunk
    cdef public bytes closed_by
    cdef public bint head_begun

    def __init__(self, ip):
        self.forwarded_for = b"X-Forwarded-For: " + ip.encode() + b"\r\n"  # the client's, for every request
        self.parser = None  # until a request is not simple
        self.closed_by = None  # a simple request's head that said "close"
        self.requests = deque()
        self.current = None
        self.target = b""
        self.headers = []
        self.hosts = []
        self.in_head = True  # between requests or inside a head
        self.head_size = 0  # bytes received since the head began (approximate, for the limit)
        self.trailers = []
        self.held = b""  # bytes after an upgrade request, parsed later (or relayed)
        self.rejected = None
        self.reparse = False  # the upgrade request being parsed has a body: see parse_again
        self.chunk = None  # the bytes being parsed, if a request begins them
        self.head_begun = False  # a head is parsed in part: the next bytes do not begin a request

    cpdef feed(self, data):
        """Parse ``data``; a rejection or parse error becomes a final error Request."""
        if self.parser is None:
            if self.closed_by is None and self.simple_request(data):
                return
            self.start_parser()
        self.chunk = data if self.in_head and not self.head_begun else None
        if self.in_head:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[int(exc.args[0]) :]
            if self.reparse:
                self.parse_again(rest)
            else:
                self.held = rest
            return
        except httptools.HttpParserError as exc:
            self.reject(self.rejected or Rejected(400, f"bad request: {exc}"))
            return
        if self.in_head and self.head_size > C_MAX_HEAD:
            self.reject(Rejected(431, "request head over 64 KiB"))

    cdef bint simple_request(self, data) except -1:
        """Frame ``data`` without llhttp if it is one whole GET or HEAD head and nothing
        more, in the strict subset of the pure twin, scanned here in C."""
        cdef const unsigned char* p
        cdef Py_ssize_t n, at, colon, value, end, method_size, target_end
        cdef int keep_alive = 1, option
        cdef bytes host = None, head, forwarded_for = self.forwarded_for
        cdef char* out
        cdef Request request
        if type(data) is not bytes:
            return False
        p = <const unsigned char*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
        if n > C_MAX_HEAD or n < 18 or memcmp(p + n - 4, b"\r\n\r\n", 4) != 0:
            return False
        if memcmp(p, b"GET /", 5) == 0:
            method_size = 3
        elif memcmp(p, b"HEAD /", 6) == 0:
            method_size = 4
        else:
            return False
        at = method_size + 1
        while 0x21 <= p[at] <= 0x7E:  # stops at the CR of the end at the latest
            at += 1
        target_end = at
        if n - at < 13 or memcmp(p + at, b" HTTP/1.1\r\n", 11) != 0:
            return False
        at += 11
        while at < n - 2:  # one field line; the head's last CRLF begins at n - 2
            end = _simple_field(p, at, &colon)
            if end < 0:
                return False
            value = colon + 2
            if _named(p + at, colon - at, b"host"):
                if host is not None:
                    return False
                host = PyBytes_FromStringAndSize(<const char*>p + value, end - value)
            elif _named(p + at, colon - at, b"connection") or _named(p + at, colon - at, b"proxy-connection"):
                option = _keeps_alive(p + value, end - value)
                if option < 0:
                    return False
                keep_alive &= option
            elif (
                _named(p + at, colon - at, b"content-length")
                or _named(p + at, colon - at, b"transfer-encoding")
                or _named(p + at, colon - at, b"upgrade")
                or _named(p + at, colon - at, b"x-forwarded-for")
                or _named(p + at, colon - at, b"x-forwarded-host")
                or _named(p + at, colon - at, b"x-forwarded-proto")
                or _named(p + at, colon - at, b"forwarded")
            ):
                return False  # NOT_SIMPLE
            at = end + 2
        if host is None:
            return False
        target = PyBytes_FromStringAndSize(<const char*>p + method_size + 1, target_end - method_size - 1)
        try:
            name = host_name([host], target)
        except Rejected:
            return False
        head = PyBytes_FromStringAndSize(NULL, n + PyBytes_GET_SIZE(forwarded_for))
        out = PyBytes_AS_STRING(head)  # the head as on_headers_complete builds it
        memcpy(out, p, n - 2)
        memcpy(out + n - 2, PyBytes_AS_STRING(forwarded_for), PyBytes_GET_SIZE(forwarded_for))
        memcpy(out + n - 2 + PyBytes_GET_SIZE(forwarded_for), b"\r\n", 2)
        request = Request()
        request.name = name
        request.method = C_GET if method_size == 3 else C_HEAD
        request.target = target
        request.keep_alive = keep_alive
        request.data.append(head)
        request.size = len(head)
        request.replay = head
        request.complete = True
        self.requests.append(request)
        if not keep_alive:
            self.closed_by = data
        return True

    cpdef start_parser(self):
        """llhttp from here on; after a simple request that said "close", it reads that
        head first (see the pure twin)."""
        self.parser = httptools.HttpRequestParser(self)
        if self.closed_by is not None:
            self.chunk = self.closed_by
            self.parser.feed_data(self.closed_by)
            self.requests.pop()  # that request again: it is queued already

    cdef reject(self, rejection):
        self.rejected = rejection
        if self.current is not None:  # broken inside a body: that request fails
            self.current.error = rejection
            self.current.complete = True
            self.current = None
            return
        request = Request()
        request.error = rejection
        request.complete = True
        request.keep_alive = False
        self.requests.append(request)

    cdef parse_again(self, bytes rest):
        """httptools switches protocols right at the head of an upgrade request, so the
        body of one that has a body would be held back, unparsed, until its answer, which
        a backend gives only once it has the body (RFC 9110 §7.8: the switch comes after
        the whole request).  Such a request is parsed again without its Upgrade field
        (a server may ignore it, and an intermediary may drop it: it is hop-by-hop), so
        its body and what follows it are framed as usual."""
        self.reparse = False
        request = self.requests.pop()  # the newest: parsing stopped right after its head
        self.parser = httptools.HttpRequestParser(self)
        self.head_size = 0
        self.feed(request.replay + rest)

    def on_message_begin(self):
        self.head_begun = True
        self.target = b""
        self.headers = []
        self.hosts = []
        self.trailers = []

    def on_url(self, url):
        self.target += url

    def on_header(self, name, value):
        if not self.in_head:  # a trailer field: kept only if it cannot route or frame
            if kept_in_trailers(name):
                self.trailers.append(b"%s: %s\r\n" % (name, value))
            return
        self.headers.append((name, value))
        if name.lower() == b"host":
            self.hosts.append(value)

    def on_headers_complete(self):
        cdef bytes method, field, value, lowered, head
        cdef tuple pair
        cdef list lines
        cdef Py_ssize_t size
        cdef Request request
        parser = self.parser
        self.in_head = False
        self.head_begun = False
        method = parser.get_method()
        version = self.version(method)
        size = len(method) + len(self.target) + 12
        for pair in self.headers:
            size += len(<bytes>pair[0]) + len(<bytes>pair[1]) + 4
        if size > C_MAX_HEAD:
            raise self.fail(Rejected(431, "request head over 64 KiB"))
        if version != "1.1" and version != "1.0":
            raise self.fail(Rejected(400, f"HTTP/{version}"))
        if method == b"CONNECT":
            raise self.fail(Rejected(405, "CONNECT"))
        if version == "1.0" and self.has_transfer_encoding():
            # RFC 9112 §6.1: faulty framing: 400, then close
            raise self.fail(Rejected(400, "Transfer-Encoding in HTTP/1.0"))
        try:
            name = host_name(self.hosts, self.target)
        except Rejected as rejection:
            raise self.fail(rejection) from None
        request = Request()
        request.name = name
        request.method = method
        request.target = self.target
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        if request.upgrade and self.declares_body():
            request.upgrade = False  # dropped, see parse_again
            self.reparse = True
        lines = [method, b" ", self.target, b" HTTP/1.1\r\n" if version == "1.1" else b" HTTP/1.0\r\n"]
        for pair in self.headers:
            field = pair[0]
            value = pair[1]
            lowered = field.lower()
            if lowered in C_DROPPED or b"_" in field or (self.reparse and lowered == b"upgrade"):
                continue  # a "_" in a name: dropped, as nginx does (CGI reads "_" as "-")
            if lowered == b"transfer-encoding":
                request.chunked = True  # llhttp accepts only "chunked" last in a request
            lines.append(field)
            lines.append(b": ")
            lines.append(value)
            lines.append(b"\r\n")
        lines.append(self.forwarded_for)
        lines.append(b"\r\n")
        head = b"".join(lines)
        request.data.append(head)
        request.size = len(head)
        request.replay = head
        self.current = request
        self.requests.append(request)

    cdef str version(self, bytes method):
        """The request's HTTP version: see the pure twin."""
        cdef bytes chunk = self.chunk
        cdef const char* at
        cdef const char* lf
        if chunk is not None:
            at = chunk
            lf = <const char*>memchr(at, 10, len(chunk))  # llhttp ends a request line with CRLF only
            if (
                lf != NULL
                and lf - at == len(method) + len(self.target) + 11
                and lf[-1] == 13
                and memcmp(at, <const char*>method, len(method)) == 0
            ):
                at = lf - 10
                if memcmp(at, b" HTTP/1.1", 9) == 0:
                    return "1.1"
                if memcmp(at, b" HTTP/1.0", 9) == 0:
                    return "1.0"
        return self.parser.get_http_version()

    cdef bint declares_body(self):
        """Whether the head being parsed announces a body (RFC 9112 §6.3): chunked, or a
        Content-Length other than 0 (llhttp has checked that it is digits)."""
        for field, value in self.headers:
            lowered = field.lower()
            if lowered == b"transfer-encoding":
                return True
            if lowered == b"content-length" and value.strip(b" \t").lstrip(b"0"):
                return True
        return False

    cdef bint has_transfer_encoding(self):
        """Whether the head being parsed has a Transfer-Encoding field."""
        cdef tuple pair
        for pair in self.headers:
            if (<bytes>pair[0]).lower() == b"transfer-encoding":
                return True
        return False

    def fail(self, rejection):
        self.rejected = rejection
        return rejection

    def on_body(self, body):
        cdef Request request = self.current
        if request.chunked:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        request.has_body = True
        request.data.append(body)
        request.size += len(body)

    def on_message_complete(self):
        cdef Request request = self.current
        if request.chunked:
            end = b"0\r\n" + b"".join(self.trailers) + b"\r\n"
            request.data.append(end)
            request.size += len(end)
        request.complete = True
        self.current = None
        self.in_head = True
        self.head_size = 0
        self.chunk = None  # the next request begins further on in it


def frame(data, ip="192.0.2.1"):
    """Parse one client's ``data``: per request (name, error status, backend bytes, complete, ...).

    The pure function behind both twins' request framing, for differential tests.
    """
    reader = RequestReader(ip)
    reader.feed(data)
    return [
        (r.name, r.error.status if r.error else 0, b"".join(r.data), r.complete, r.keep_alive, r.upgrade)
        for r in reader.requests
    ]


cdef class HttpConnection(Handler):
    """One client connection on fastsni's engine: requests in, answers out in order.

    The client's descriptor and its current backend's both report to this handler
    (edge-triggered, see fastsni.engine), and each is read and written through its
    engine Side.  Bytes wait in a Side's ``queued`` only when a write fell short; while
    either side's holds more than HIGH_WATER, the other side is not read.  After a 101
    both sides go to the engine's Relay.
    """

    cdef public Service service
    cdef public Reactor reactor
    cdef public int fd
    cdef public Side client
    cdef public object peer
    cdef public RequestReader reader
    cdef public Side backend
    cdef public object backend_name
    cdef public object backend_socket
    cdef public double backend_checked
    cdef public bint client_eof
    cdef public Request active
    cdef public object response
    cdef public int status
    cdef public Py_ssize_t forwarded
    cdef public bint final
    cdef public bint close_delimited
    cdef public bint response_keep_alive
    cdef public bint framed
    cdef public bint upgrade_wait
    cdef public bint reused
    cdef public bint overrun
    cdef public int heads
    cdef public bytes tail
    cdef public Timer timer
    cdef public bint closing
    cdef public bint lingering
    cdef public bint relayed
    cdef public bint closed
    cdef public bint kept_alive
    cdef public bint draining
    cdef public Py_ssize_t sent
    cdef public double begun

    REFUSED = error_response(503, True)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, Service service, int fd, peer):
        self.service = service
        self.reactor = service.reactor
        self.fd = fd
        self.client = new_side(service.reactor, fd)
        self.peer = peer  # the client's address, as accept gave it
        self.reader = RequestReader(client_ip(peer))
        self.backend = None  # the backend connection, while one is open
        self.backend_name = None
        self.backend_socket = None  # the identity of its socket file
        self.backend_checked = 0.0  # when it was made, or last found current
        self.client_eof = False  # the client sent everything; answer what it asked, then close
        self.active = None  # the exchange in progress
        self.response = None  # its HttpResponseParser, once an answer is not simple
        self.status = 0  # status of the response being parsed
        self.forwarded = 0  # bytes of the current answer sent to the client
        self.sent = 0  # bytes of the current request sent to its backend
        self.begun = 0.0  # when the current request began, for the owner's log
        self.final = False  # the final (non-1xx) answer is complete
        self.close_delimited = False
        self.response_keep_alive = True
        self.framed = False
        self.upgrade_wait = False
        self.reused = False  # the exchange in progress went to an open backend connection
        self.overrun = False  # the backend sent more after its final answer
        self.heads = 0  # answer heads completed in the bytes being parsed
        self.tail = b""  # the last 3 bytes of the answer so far, to find a head's end
        self.timer = None
        self.closing = False  # close once what is queued for the client is out
        self.lingering = False  # read and drop what the client sends, until it closes
        self.relayed = False  # handed to fastsni's relay after a 101
        self.closed = False
        self.draining = False  # SIGHUP: close once the requests begun are answered
        self.kept_alive = False
        self.reactor.add(fd, self)
        self.arm()

    # events

    cpdef ready(self, int fd, unsigned int events):
        if fd == self.fd:
            self.client.saw(events)
        elif self.backend is not None and fd == self.backend.fd:
            self.backend.saw(events)
        self.run()

    cdef run(self):
        """Move what can move: writes that fell short first, then what each side sends."""
        cdef Side backend = self.backend, client = self.client
        if backend is not None and backend.queued and backend.writable:
            self.flush_backend()
        if client.queued and client.writable and not self.done():
            self.flush_client()
        if not self.done():
            self.read_backend()
        if not self.done():
            self.read_client()

    cdef bint done(self):
        return self.closed or self.relayed

    def shed(self):
        """Out of descriptors (engine.Service.shed): close now if no request head is
        complete (a new connection, or one idle between requests)."""
        if self.done() or self.reader is None or self.active is not None or self.reader.requests:
            return False
        self.shut()
        return True

    # client side

    cdef read_client(self):
        cdef Side client = self.client
        while client.readable and self.wants_client():
            data = client.read()
            if data is None:
                return
            if not data:
                if client.error:
                    self.shut()  # reset: nothing more can reach the client
                    return
                client.readable = False
                self.client_ended()
                return
            if self.lingering:
                continue  # dropped
            self.client_data(data)

    cdef bint wants_client(self):
        """Read the client only while its queued bytes and the backend keep up."""
        cdef Py_ssize_t queued
        cdef Request request
        if self.lingering:
            return not self.closed
        reader = self.reader
        if reader is None or self.done() or reader.rejected is not None:
            return False
        if self.upgrade_wait or self.client_eof:
            return False
        if self.backend is not None and len(self.backend.queued) > C_HIGH_WATER:
            return False
        queued = 0
        for request in reader.requests:
            queued += request.size
        return queued <= C_HIGH_WATER

    cdef client_data(self, bytes data):
        reader = self.reader
        if self.upgrade_wait:
            reader.held += data
            return
        reader.feed(data)
        if reader.requests:
            self.stop_timer()  # a head is complete: no deadline while it is answered
            if reader.requests[-1].upgrade:
                self.upgrade_wait = True
        active = self.active
        if active is not None:
            if active.error is not None:
                self.fail_request(active.error)
                return
            self.pump()
        self.next()

    cdef client_ended(self):
        """EOF from the client: the answers to its complete requests still go out, then
        it closes.  A request cut off inside its body can never be answered: close now."""
        reader = self.reader
        if self.lingering or reader is None or (self.active is None and not reader.requests):
            self.close()
            return
        if reader.current is not None:
            log(self.peer, reader.current.name, "client closed inside a request body")
            self.shut()
            return
        self.client_eof = True

    cdef send_client(self, bytes data):
        """Write ``data`` to the client, or queue it behind what waits already."""
        if self.client.send(data) < 0:
            self.shut()  # the client is gone

    cdef answer(self, int status, bint close, request):
        """Answer ``request`` with fasthttpdir's own ``status``."""
        _answered[status] = _answered.get(status, 0) + 1
        self.send_client(response(status, request, close))

    cdef flush_client(self):
        if self.client.flush() < 0:
            self.shut()  # the client is gone
            return
        if self.client.queued:
            return
        if self.closing:
            self.shut()
        elif self.lingering:
            self.begin_lingering()

    cdef arm(self):
        """The next head is due within HEAD_TIMEOUT."""
        self.stop_timer()
        self.timer = self.reactor.schedule(C_HEAD_TIMEOUT, self.expire, ())

    cdef stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self):
        self.timer = None
        if self.active is None and self.reader is not None and not self.reader.requests:
            if self.reader.head_size:
                log(self.peer, None, f"no complete request head within {HEAD_TIMEOUT:g} s")
            self.close()

    cdef close(self):
        """Close once what the client is owed is out (at most LINGER seconds from now)."""
        if self.closed:
            return
        self.end_exchanges()
        if not self.client.queued:
            self.shut()
            return
        self.closing = True
        self.timer = self.reactor.schedule(C_LINGER, self.shut, ())

    cdef linger(self):
        """Close after the last answer without losing it (RFC 9112 §9.6): if the client
        may still be sending (a body, pipelined requests), closing with its bytes unread
        would reset the connection, which can destroy the answer before it is read.  So
        shut our side once the answer is out, then read and drop until the client closes;
        all within LINGER seconds.  A client that can send nothing more is closed at once."""
        if self.closed:
            return
        if not self.client_may_send():
            self.close()
            return
        self.end_exchanges()
        self.lingering = True
        self.timer = self.reactor.schedule(C_LINGER, self.shut, ())
        if not self.client.queued:
            self.begin_lingering()

    cdef bint client_may_send(self):
        """Whether more bytes may come from the client, so that closing now could reset
        the connection under the last answer.  Not if it has sent its end, nor after a
        whole request whose sender said "close" (RFC 9112 §9.6: it sends no further
        request) and nothing after it: its bytes read to the last (EAGAIN), none parsed
        past that request, no upgrade pending."""
        cdef RequestReader reader = self.reader
        cdef Request request
        if self.client_eof:
            return False
        if reader is None or self.client.readable or reader.rejected is not None or len(reader.requests) != 1:
            return True
        request = reader.requests[0]
        return request.keep_alive or request.upgrade or not request.complete or request.error is not None

    cdef begin_lingering(self):
        shutdown_write(self.fd)
        self.client.readable = True  # what came while we did not read is dropped now

    cdef end_exchanges(self):
        self.stop_timer()
        self.drop_backend()
        self.active = None
        self.response = None  # each parser refers back to its callbacks' object: unlink
        if self.reader is not None:  # them, so refcounting frees both now, not the GC later
            self.reader.parser = None
        self.reader = None

    cpdef shut(self):
        """Close the client (and backend) descriptors now."""
        if self.closed:
            return
        self.end_exchanges()
        self.closed = True
        self.reactor.close(self.fd)
        self.service.closed(self)

    # exchanges

    cdef next(self):
        """Start the next queued request if none is in progress."""
        global _routed
        cdef Request request
        while self.active is None and self.reader is not None and self.reader.requests:
            request = self.reader.requests[0]
            if request.error is not None:
                log(self.peer, request.name, request.error.reason)
                self.answer(request.error.status, True, request)
                self.linger()
                return
            self.active = request
            self.status = 0
            self.forwarded = 0
            self.sent = 0
            self.begun = _monotonic()
            self.final = False
            self.overrun = False
            self.tail = b""
            self.close_delimited = False
            self.response_keep_alive = True
            if self.backend is not None and (
                self.backend_name != request.name
                or not self.backend_current()
            ):
                self.drop_backend()  # another host, or its name leads elsewhere now
            self.reused = self.backend is not None
            if self.backend is None:
                if not self.connect(request):
                    continue  # answered with an error; the next request may go on
            else:
                self.pump()
            if self.active is request and self.backend is not None:
                _routed += 1
        reader = self.reader
        if self.active is None and reader is not None and not reader.requests:
            if self.client_eof or (self.draining and not reader.head_size):
                self.close()
            elif self.timer is None:  # the head's deadline holds however its bytes trickle in
                self.kept_alive = True
                self.arm()
                if self.backend is not None:
                    self.watch_backend()

    cdef bint backend_current(self) except -1:
        """Whether the open backend connection may take the next request: made or found
        current less than RECHECK seconds ago, or its name still leads to its socket."""
        cdef double now = _monotonic()
        if now - self.backend_checked < C_RECHECK:
            return True
        if not still_leads_to(self.backend_name, self.backend_socket, now):
            return False
        self.backend_checked = now
        return True

    cdef watch_backend(self):
        """Idle with a backend connection open: the sweep runs (see the pure twin's _sockets)."""
        global _sweeping
        if not _sweeping:
            _sweeping = True
            self.reactor.schedule(C_RECHECK, sweep, (self.service,))

    cdef bint connect(self, Request request) except -1:
        """Open a backend connection for ``request``; False if answered with an error."""
        cdef int fd, proxy
        cdef unsigned long long identity[2]
        try:
            fd = connect_fd(request.name, BACKEND_SOCKET, &proxy, identity)  # connect_backend at C cost
        except OSError as exc:
            self.active = None
            # An upgrade request refused closes: what the client sent after it may be the new
            # protocol already, not HTTP (RFC 9110 §7.8: it switches only with a 101).
            if request.complete and request.keep_alive and not request.upgrade:
                self.reader.requests.popleft()
                self.answer(refusal(self.peer, request, exc, self.begun), False, request)
                return False
            self.answer(refusal(self.peer, request, exc, self.begun), True, request)
            self.linger()
            return True
        self.backend = new_side(self.reactor, fd)
        self.backend_name = request.name
        self.backend_socket = (identity[0], identity[1])
        self.backend_checked = _monotonic()
        self.response = None  # llhttp once an answer is not simple (simple_answer)
        self.reactor.add(fd, self)
        if proxy:  # goes out in one write with the request head (pump)
            request.data.insert(0, proxy_header(proxy, self.peer, local_of(self.fd, self.service.family), request.name))
        self.pump()
        return True

    cdef pump(self):
        """Write what has arrived of the request in progress to its backend."""
        global _up
        cdef Request request = self.active
        if request is None or self.backend is None or not request.data:
            return
        data = b"".join(request.data)
        request.data = []
        request.size = 0
        _up += len(data)
        self.sent += len(data)
        self.send_backend(data)

    cdef send_backend(self, bytes data):
        if self.backend.send(data) < 0:
            self.backend_write_failed()

    cdef flush_backend(self):
        if self.backend.flush() < 0:
            self.backend_write_failed()

    cdef backend_write_failed(self):
        """A write to the backend failed: the next read reports how (an answer may be in)."""
        self.backend.readable = self.backend.closing = True

    cdef drop_backend(self):
        if self.backend is not None:
            self.reactor.close(self.backend.fd)
            self.backend = None
            self.backend_name = None
            self.response = None

    # backend side

    cdef read_backend(self):
        while self.backend is not None and self.backend.readable and len(self.client.queued) <= C_HIGH_WATER:
            data = self.backend.read()
            if data is None:
                return
            if not data:  # closed, or reset: as good as closed
                self.backend_lost()
                return
            self.backend_data(data)

    cdef backend_data(self, bytes data):
        global _down
        cdef Request active
        cdef tuple answer
        if self.active is None or self.final:
            self.drop_backend()  # an answer nobody asked for
            return
        self.heads = 0
        answer = simple_answer(data, self.active.method == b"HEAD") if self.response is None else None
        if answer is not None:  # one whole answer: what llhttp's callbacks would have set
            self.status = answer[0]
            self.response_keep_alive = answer[1]
            self.heads = 1
            self.final = True
        else:
            if self.response is None:
                self.response = httptools.HttpResponseParser(self)
            try:
                self.response.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self.status != 101 or not self.active.upgrade:
                    self.fail_answer("101 without an upgrade request")
                    return
                self.relay(data)
                return
            except httptools.HttpParserError as exc:
                self.fail_answer(f"bad response: {exc}")
                return
        if self.final and self.active.method == b"HEAD" and self.head_end(data) < len(data):
            self.overrun = True  # llhttp would read them as a body: a HEAD answer ends at its head
        if not self.final:  # for head_end: a head's end may straddle two reads (none after the final)
            self.tail = (self.tail + data[-3:])[-3:]
        if self.overrun:
            # More after the final answer, unasked: never let it pass as the answer to
            # the client's next request (which may be for another host).
            self.fail_answer("backend sent bytes after its answer")
            return
        self.forwarded += len(data)
        _down += len(data)
        self.send_client(data)
        if self.final and not self.closed:
            self.answered()

    cdef Py_ssize_t head_end(self, bytes data) except -1:
        """Where in ``data`` the last answer head completed in it ends."""
        seen = self.tail + data
        at = -4
        for _ in range(self.heads):
            at = seen.index(b"\r\n\r\n", at + 4)
        return at + 4 - len(self.tail)

    def on_message_begin(self):
        if self.final:
            self.overrun = True
        self.status = 0
        self.framed = False

    def on_header(self, name, value):
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self):
        self.heads += 1
        parser = self.response
        status = parser.get_status_code()
        self.status = status
        if status < 200:
            return
        self.response_keep_alive = parser.should_keep_alive()
        if self.active.method == b"HEAD":
            self.final = True
        elif status != 204 and status != 304 and not self.framed:
            self.close_delimited = True  # EOF ends the body

    def on_message_complete(self):
        if self.status >= 200:
            self.final = True

    cdef answered(self):
        """The final answer went out: the exchange ends once the request is all sent."""
        cdef Request request = self.active
        self.routed(request)
        if not (self.response_keep_alive and request.keep_alive) or not request.complete:
            # the request is not all here (an early answer) or either side closes
            self.linger()
            return
        self.pump()
        self.finish()

    cdef finish(self):
        cdef Request request = self.active
        self.active = None
        if request.method == b"HEAD":  # its answer left the parser expecting a body
            self.response = None
        self.reader.requests.popleft()
        if request.upgrade and self.upgrade_wait:
            self.upgrade_wait = False
            held = self.reader.held
            self.reader.held = b""
            if held:
                self.client_data(held)
                return
        self.next()

    cdef backend_lost(self):
        """The backend closed (or reset) its connection."""
        self.drop_backend()
        if self.active is None or self.final:
            return
        if self.close_delimited:
            self.routed(self.active)
            self.linger()  # EOF ends a body without a length
            return
        request = self.active
        if self.reused and self.forwarded == 0 and request.complete and not request.has_body:
            # the backend closed an idle connection as the request went out: retry once, fresh
            self.reused = False
            request.data = [request.replay]
            request.size = len(request.replay)
            if not self.connect(request):
                self.next()
            return
        self.fail_answer("backend closed before its answer was complete", "closed_early")

    cdef routed(self, Request request):
        """The backend's answer to ``request`` is out: one line to the owner's log."""
        if not no_owner_log(request.name, _monotonic()):
            tell_owner(self.peer, request.name, "routed", self.begun, status=self.status, up=self.sent, down=self.forwarded)

    cdef fail_answer(self, str reason, str why="bad_answer"):
        """The backend failed the request in progress: 502 if nothing went out yet, else cut."""
        name = self.active.name if self.active else None
        log(self.peer, name, reason)
        self.drop_backend()
        if self.forwarded == 0:
            failed(self.peer, name, 502, why, self.begun)
            self.answer(502, True, self.active)
            self.linger()
        else:
            if name is not None:
                tell_owner(self.peer, name, "cut", self.begun, cause=why, up=self.sent, down=self.forwarded)
            self.shut()

    cdef fail_request(self, rejection):
        """The request in progress broke mid-body: 400 if nothing of its answer went out, else cut."""
        log(self.peer, self.active.name, rejection.reason)
        self.drop_backend()
        if self.forwarded == 0:
            self.answer(rejection.status, True, self.active)
            self.linger()
        else:
            self.shut()

    cdef relay(self, bytes answer):
        """A 101 answer: from here on, bytes flow raw both ways, through fastsni's Relay.

        ``answer`` (the 101 and whatever followed it) goes to the client after anything
        still waiting for it; client bytes held back since the upgrade request go to
        the backend after anything still waiting for it."""
        self.stop_timer()
        cdef Side backend = self.backend, client = self.client
        backend.queued += self.reader.held
        client.queued += answer
        client.readable = True  # it was not read while the upgrade waited: it may hold bytes
        self.backend = None
        self.reader = None
        self.active = None
        self.relayed = True
        self.reactor.remove(backend.fd)  # the Relay adds it as its own
        tell_owner(self.peer, self.backend_name, "routed", self.begun, status=101, up=self.sent, down=len(answer))
        Relay(self.reactor, client, backend, self.relay_closed, self.backend_failed)

    def relay_closed(self):
        self.service.closed(self)

    def backend_failed(self, int err):
        """The backend failed while relaying after a 101: a reset or broken pipe is how
        relays end (counted); anything else gets one line."""
        global _relay_resets
        if err in ENDINGS:
            _relay_resets += 1
            return
        reason = f"{BACKEND_SOCKET}: {errorcode.get(err, err)} while relaying"
        log(self.peer, self.backend_name, reason)

    def drain(self):
        """SIGHUP: answer the requests begun, then close (see next); an idle one closes now."""
        if self.done() or self.reader is None:
            return  # a relay (or a connection already closing) runs to its end
        self.draining = True
        if self.kept_alive and self.active is None and not self.reader.requests and not self.reader.head_size:
            self.close()  # idle between requests; a new connection's first request may be on its way
