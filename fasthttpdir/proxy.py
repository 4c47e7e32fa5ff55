"""fasthttpdir's connection: parse HTTP/1.1 requests, route each by Host, relay (pure twin).

This module is the specification; ``pyx/_http.pyx`` mirrors it function for function.
It runs on fastsni's engine (fastsni/engine.py): descriptors, edge-triggered epoll,
read(2)/write(2), and the engine's Relay once a 101 turns a connection into a tunnel.

One client connection carries a queue of parsed requests.  The first one is the
exchange in progress: its head and body go to the backend of its host while the
backend's answer goes back to the client byte for byte, parsed only to find where
it ends.  One request at a time is in flight per backend connection, so answers
reach the client in request order; the backend connection is reused while
consecutive requests name the same host and it still leads to the same socket.
"""

from __future__ import annotations

import errno
import re
import time
from collections import deque

import httptools

from fastsni.addresses import client_ip, describe, proxy_header
from fastsni.engine import (
    NO_BACKEND,
    Handler,
    Relay,
    Service,
    Side,
    cause,
    connect_backend,
    exists_beside,
    failure,
    fair_share_counts,
    local_of,
    shutdown_write,
    socket_identity,
)
from fastsni.logs import failures
from fastsni.ownerlog import line, owner_log
from fastsni.tls import check_hostname

HEAD_TIMEOUT = 10.0  # seconds from accept (or the end of the previous answer) to a complete head
LINGER = 5.0  # seconds a closing connection keeps reading (and dropping) what the client still sends
RECHECK = 0.25  # seconds a lookup of a name's socket stands for its kept-alive backend connections
MAX_HEAD = 64 * 1024  # bytes of request head before 431
BACKEND_SOCKET = "http-socket"
TLS_SOCKET = "tls-socket"  # fastsni's: a host with only this one is redirected to https
DROPPED = frozenset((b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"forwarded"))
# Fields a chunked body's trailer section never passes on (besides DROPPED, any X-Forwarded-*
# and any name with "_"): a backend that merges trailers into the head (RFC 9110 §6.5.1)
# must not get a second Host, framing or hop-by-hop fields from them.
NOT_IN_TRAILERS = DROPPED | frozenset(
    (
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
    )
)
ABSENT = frozenset((errno.ENOENT, errno.ENOTDIR))  # nothing there: 308 if only a tls-socket is
NOT_FOUND = NO_BACKEND  # also a path out of the tree, another owner's socket: 404
UNAVAILABLE = frozenset((errno.EACCES, errno.ECONNREFUSED))
NOT_URI_SAFE = re.compile(rb"[^\x21-\x7e]")  # controls, space, DEL, non-ASCII: percent-encoded
# The strict subset of HTTP/1.1 framed without llhttp (RequestReader.simple_request): a
# GET or HEAD head whose bytes go to the backend unchanged.  llhttp reads every such head
# the same way (tests/test_fasthttpdir_twins.py, tests/fuzz/fuzz_request.py).
SIMPLE_METHODS = (b"GET", b"HEAD")
SIMPLE_TARGET = re.compile(rb"/[!-~]*")  # origin-form, visible ASCII
# RFC 9110 §5.6.2 token (without "_": such a name is dropped), ": ", a value that starts
# visible (llhttp drops leading OWS) and holds visible ASCII, SP and HTAB (§5.5).
SIMPLE_FIELD = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+: (?:[!-~][\t -~]*)?")
NOT_SIMPLE = DROPPED | frozenset((b"content-length", b"transfer-encoding", b"upgrade"))
CONNECTION = frozenset((b"connection", b"proxy-connection"))  # llhttp reads both
# A simple answer (simple_answer): HTTP/1.1, a status from 200 to 599 but 204 and 304,
# one Content-Length, simple fields, whole in one read.
SIMPLE_STATUS = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\t -~]*")
REASONS = {
    308: b"Permanent Redirect",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}

HIGH_WATER = 64 * 1024  # bytes waiting for one side before the other side is no longer read
# Host values that passed, with the name each gives (a pure function of the value): at
# most REMEMBERED_NAMES of them (then forgotten all at once), none over REMEMBERED_VALUE
# bytes (whitespace may pad a value up to the head's limit).
REMEMBERED_NAMES = 1024
REMEMBERED_VALUE = 300
_names: dict[bytes, str] = {}
# A backend connection is kept alive across requests for one name only while the name
# still leads to the socket it was made to (a switch of the entry, a restarted backend
# end that): each name's socket as looked up at most RECHECK seconds ago, at most
# REMEMBERED_NAMES of them (then forgotten all at once), checked by a connection at
# most every RECHECK seconds.  So a request that starts 2 x RECHECK after a switch goes
# to the new target, and an idle kept-alive backend connection to the old one is closed
# within 2 x RECHECK (sweep), not left to hold it.  No system call per request.
_sockets: dict[str, tuple[float, tuple[int, int] | None]] = {}
_sweeping = False  # a sweep is scheduled

__all__ = ["HttpConnection", "Rejected", "host_name", "frame"]


class Rejected(Exception):
    """A request answered by the proxy itself: an HTTP status and a reason for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _authority_name(authority: bytes) -> str:
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


def host_name(hosts: list[bytes], target: bytes) -> str:
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


def kept_in_trailers(name: bytes) -> bool:
    """Whether a chunked body's trailer field ``name`` goes on to the backend: not one
    that frames, routes or is hop-by-hop (NOT_IN_TRAILERS), no X-Forwarded-*, no "_"."""
    lowered = name.lower()
    return lowered not in NOT_IN_TRAILERS and not lowered.startswith(b"x-forwarded-") and b"_" not in name


def still_leads_to(name: str, identity: tuple[int, int] | None, now: float) -> bool:
    """Whether ``name``'s http-socket (engine.socket_identity), as looked up at most
    RECHECK seconds before ``now``, is still ``identity``; True if no lookup can be made
    (out of descriptors): a working connection is kept rather than lost."""
    seen = _sockets.get(name)
    if seen is None or now - seen[0] >= RECHECK:
        try:
            current = socket_identity(name, BACKEND_SOCKET)
        except OSError:
            return True
        if len(_sockets) >= REMEMBERED_NAMES:
            _sockets.clear()
        seen = _sockets[name] = (now, current)
    return seen[1] == identity


def sweep(service: Service) -> None:
    """Every RECHECK seconds while a connection waits between requests with its backend
    connection open: close the backend connections whose name leads elsewhere now, so
    that none holds a previous target's socket (fastsni-deploy --drain waits for them);
    their client connections stay, and their next request connects afresh."""
    global _sweeping
    now = service.reactor.time()
    waiting = False
    for connection in list(service.live):
        if connection.backend is not None and connection.active is None:
            if still_leads_to(connection.backend_name, connection.backend_socket, now):
                waiting = True
            else:
                connection.drop_backend()
    _sweeping = waiting
    if waiting:
        service.reactor.call_later(RECHECK, sweep, service)


def error_response(status: int, close: bool) -> bytes:
    reason = REASONS[status]
    body = b"%d %s\n" % (status, reason)
    return b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        reason,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


def redirect_response(name: str, method: bytes, target: bytes, close: bool) -> bytes:
    """308 to ``https://<name><path and query of target>`` (RFC 9110 §15.4.9: the method
    and body are kept), with a short body (only its length for HEAD)."""
    location = b"https://%s%s" % (name.encode("ascii"), https_path(target))
    body = b"Moved to %s\n" % location
    head = (
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
        b"Content-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
        % (
            location,
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
    )
    return head if method == b"HEAD" else head + body


def https_path(target: bytes) -> bytes:
    """The path and query of a request-target for a Location header: origin-form as
    sent; absolute-form without its scheme and authority (and fragment); ``*`` -> ``/``.
    Every byte outside printable ASCII is percent-encoded (RFC 3986 §2.1), so no control
    character (CR, LF above all) can reach the header, whatever the parser let through."""
    if target[:1] != b"/":
        if target == b"*":
            return b"/"
        rest = target.partition(b"://")[2]
        start = len(rest)
        for stop in (b"/", b"?"):
            index = rest.find(stop)
            if 0 <= index < start:
                start = index
        target = rest[start:].partition(b"#")[0]
        if target[:1] != b"/":
            target = b"/" + target  # "http://a?q" has an empty path
    return NOT_URI_SAFE.sub(_percent_encoded, target)


def _percent_encoded(match: re.Match) -> bytes:
    return b"%%%02X" % match[0][0]


def refusal(client: tuple, request, exc: OSError, started: float) -> int:
    """The status to answer when connect_backend failed for ``request``: 308 to https if
    only fastsni serves the name (no http-socket, a tls-socket), else 404, 503 or 502
    (logged); counted by cause, and told to the owner's log."""
    if exc.errno in ABSENT and exists_beside(exc, TLS_SOCKET):
        status, why = 308, "https_redirect"
    else:
        if exc.errno in NOT_FOUND:
            status = 404
        elif exc.errno in UNAVAILABLE:
            status = 503
        else:
            status = 502
        why = cause(exc)
        log(client, request.name, failure(exc, BACKEND_SOCKET))
    failed(client, request.name, status, why, started)
    return status


def failed(client: tuple, name: str | None, status: int, why: str, started: float) -> None:
    """Count an answer's cause (``status_503_refused``); tell the owner of ``name``."""
    key = f"status_{status}_{why}"
    CAUSES[key] = CAUSES.get(key, 0) + 1
    if name is not None and why != "no_entry":
        tell_owner(client, name, f"status_{status}", started, cause=why)


def tell_owner(client: tuple, name: str, outcome: str, started: float, **fields) -> None:
    """One line to the owner's log of ``name``, if its entry has one (fastsni.ownerlog)."""
    target = owner_log.target(name)
    if target >= 0:
        seconds = f"{time.monotonic() - started:.3f}"
        where = describe(client)
        owner_log.send(target, line("fasthttpdir", where, name, outcome, **fields, duration=seconds))


def response(status: int, request, close: bool) -> bytes:
    """fasthttpdir's own answer to ``request`` (None if none was parsed): a 308 to https
    or an error, without its body for HEAD (RFC 9110 §9.3.2)."""
    if status == 308:
        return redirect_response(request.name, request.method, request.target, close)
    answer = error_response(status, close)
    if request is not None and request.method == b"HEAD":
        return answer[: answer.index(b"\r\n\r\n") + 4]
    return answer


class Request:
    """One parsed request: what goes to the backend, and how far it has arrived."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.method = b""
        self.target = b""
        self.data: list[bytes] = []  # head and body bytes not yet written to a backend
        self.size = 0  # bytes in data
        self.complete = False  # the whole request was parsed
        self.keep_alive = True
        self.upgrade = False
        self.chunked = False
        self.error: Rejected | None = None
        self.replay = b""  # the head again, for a retry on a backend that closed idle
        self.has_body = False


class RequestReader:
    """httptools callbacks: turn client bytes into Request objects with their raw bodies.

    ``requests`` collects each request as its head completes; body bytes are appended
    to the newest request's ``data`` (chunked bodies re-framed as chunks of the same
    bytes, trailers kept).
    """

    def __init__(self, ip: str) -> None:
        self.forwarded_for = b"X-Forwarded-For: " + ip.encode() + b"\r\n"  # the client's, for every request
        self.parser: httptools.HttpRequestParser | None = None  # until a request is not simple
        self.closed_by: bytes | None = None  # a simple request's head that said "close"
        self.requests: deque[Request] = deque()
        self.current: Request | None = None
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.hosts: list[bytes] = []
        self.in_head = True  # between requests or inside a head
        self.head_size = 0  # bytes received since the head began (approximate, for the limit)
        self.trailers: list[bytes] = []
        self.held = b""  # bytes after an upgrade request, parsed later (or relayed)
        self.rejected: Rejected | None = None
        self.reparse = False  # the upgrade request being parsed has a body: see parse_again
        self.chunk: bytes | None = None  # the bytes being parsed, if a request begins them
        self.head_begun = False  # a head is parsed in part: the next bytes do not begin a request

    def feed(self, data: bytes) -> None:
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
        if self.in_head and self.head_size > MAX_HEAD:
            self.reject(Rejected(431, "request head over 64 KiB"))

    def simple_request(self, data: bytes) -> bool:
        """Frame ``data`` without llhttp if it is one whole GET or HEAD head and nothing
        more, in the strict subset above: no body, no upgrade, no field that the proxy
        drops or rewrites, a Connection field (if any) of exactly "close" or
        "keep-alive", one Host that routes.  Else False: llhttp parses it, and the
        answer is the one it always was (a 400 included)."""
        if len(data) > MAX_HEAD or not data.endswith(b"\r\n\r\n"):
            return False
        lines = data[:-4].split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        if method not in SIMPLE_METHODS or version != b"HTTP/1.1" or not SIMPLE_TARGET.fullmatch(target):
            return False
        fields = _simple_fields(lines[1:])
        if fields is None:
            return False
        hosts = []
        keep_alive = True
        for lowered, value in fields:
            if lowered == b"host":
                hosts.append(value)
            elif lowered in CONNECTION:
                option = _keeps_alive(value)
                if option < 0:
                    return False
                keep_alive = keep_alive and option == 1
            elif lowered in NOT_SIMPLE:
                return False
        try:
            name = host_name(hosts, target)
        except Rejected:
            return False
        head = data[:-2] + self.forwarded_for + b"\r\n"  # the head as on_headers_complete builds it
        request = Request()
        request.name = name
        request.method = method
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

    def start_parser(self) -> None:
        """llhttp from here on.  After a simple request that said "close", llhttp reads
        that head first, so that it refuses what follows, as it always did."""
        self.parser = httptools.HttpRequestParser(self)
        if self.closed_by is not None:
            self.chunk = self.closed_by
            self.parser.feed_data(self.closed_by)
            self.requests.pop()  # that request again: it is queued already

    def reject(self, rejection: Rejected) -> None:
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

    def parse_again(self, rest: bytes) -> None:
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

    def on_message_begin(self) -> None:
        self.head_begun = True
        self.target = b""
        self.headers = []
        self.hosts = []
        self.trailers = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer field (RFC 9112 §7.1.2): kept only if it cannot
            if kept_in_trailers(name):  # route or frame, lest a backend merge it into the head
                self.trailers.append(b"%s: %s\r\n" % (name, value))
            return
        self.headers.append((name, value))
        if name.lower() == b"host":
            self.hosts.append(value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        self.head_begun = False
        method = parser.get_method()
        version = self.version(method)
        size = len(method) + len(self.target) + 12
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        if size > MAX_HEAD:
            raise self.fail(Rejected(431, "request head over 64 KiB"))
        if version != "1.1" and version != "1.0":
            raise self.fail(Rejected(400, f"HTTP/{version}"))
        if method == b"CONNECT":
            raise self.fail(Rejected(405, "CONNECT"))
        if version == "1.0" and self.has_transfer_encoding():
            # RFC 9112 §6.1: faulty framing (an HTTP/1.0 backend may read the body by its
            # length or to the end): 400, then close
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
        for field, value in self.headers:
            lowered = field.lower()
            if lowered in DROPPED or b"_" in field or (self.reparse and lowered == b"upgrade"):
                continue  # a "_" in a name: dropped, as nginx does (CGI reads "_" as "-")
            if lowered == b"transfer-encoding":
                request.chunked = True  # llhttp accepts only "chunked" last in a request
            lines += (field, b": ", value, b"\r\n")
        lines += (self.forwarded_for, b"\r\n")
        head = b"".join(lines)
        request.data.append(head)
        request.size = len(head)
        request.replay = head
        self.current = request
        self.requests.append(request)

    def version(self, method: bytes) -> str:
        """The request's HTTP version, "1.1" or "1.0" (or another, refused).  Read from its
        request line, which llhttp has checked, when the bytes being parsed begin with it
        (the usual case) and it is exactly ``method SP target SP HTTP/1.x CRLF``;
        httptools' get_http_version() builds it with str.format.  (A line of another
        shape, "CONNECT  HTTP/1.1" with "HTTP/1.1" the target, is llhttp's to read.)"""
        chunk = self.chunk
        if chunk is not None:
            end = chunk.find(b"\n")  # llhttp ends a request line with CRLF only
            shaped = end == len(method) + len(self.target) + 11 and chunk.startswith(method)
            if shaped and chunk[end - 1] == 13:
                line_end = chunk[end - 10 : end - 1]
                if line_end == b" HTTP/1.1":
                    return "1.1"
                if line_end == b" HTTP/1.0":
                    return "1.0"
        return self.parser.get_http_version()

    def declares_body(self) -> bool:
        """Whether the head being parsed announces a body (RFC 9112 §6.3): chunked, or a
        Content-Length other than 0 (llhttp has checked that it is digits)."""
        for field, value in self.headers:
            lowered = field.lower()
            if lowered == b"transfer-encoding":
                return True
            if lowered == b"content-length" and value.strip(b" \t").lstrip(b"0"):
                return True
        return False

    def has_transfer_encoding(self) -> bool:
        """Whether the head being parsed has a Transfer-Encoding field."""
        for field, _ in self.headers:
            if field.lower() == b"transfer-encoding":
                return True
        return False

    def fail(self, rejection: Rejected) -> Rejected:
        self.rejected = rejection
        return rejection

    def on_body(self, body: bytes) -> None:
        request = self.current
        if request.chunked:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        request.has_body = True
        request.data.append(body)
        request.size += len(body)

    def on_message_complete(self) -> None:
        request = self.current
        if request.chunked:
            end = b"0\r\n" + b"".join(self.trailers) + b"\r\n"
            request.data.append(end)
            request.size += len(end)
        request.complete = True
        self.current = None
        self.in_head = True
        self.head_size = 0
        self.chunk = None  # the next request begins further on in it


def _simple_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]] | None:
    """Each field line's name, lowercased, and value, if every line is simple (SIMPLE_FIELD)."""
    fields = []
    for field_line in lines:
        if not SIMPLE_FIELD.fullmatch(field_line):
            return None
        field, _, value = field_line.partition(b": ")
        fields.append((field.lower(), value))
    return fields


def _keeps_alive(value: bytes) -> int:
    """A simple message's Connection value: "close" 0 (RFC 9112 §9.6), "keep-alive" 1,
    anything else -1 (llhttp reads a list of options; left to it)."""
    option = value.lower()
    if option == b"close":
        return 0
    return 1 if option == b"keep-alive" else -1


def simple_answer(data: bytes, head: bool) -> tuple[int, bool] | None:
    """(status, keep-alive) if ``data`` is one whole answer and nothing more (just its
    head if it answers a HEAD), in the strict subset that llhttp frames the same way
    (SIMPLE_STATUS, SIMPLE_FIELD, one Content-Length of digits, no Transfer-Encoding or
    Upgrade, a Connection field of "close" or "keep-alive"); else None: llhttp parses it."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    status_line = SIMPLE_STATUS.fullmatch(lines[0])
    if status_line is None:
        return None
    status = int(status_line[1])
    if status == 204 or status == 304:  # no body whatever the fields say (RFC 9112 §6.3)
        return None
    fields = _simple_fields(lines[1:])
    if fields is None:
        return None
    length = -1
    keep_alive = True
    for lowered, value in fields:
        if lowered == b"content-length":
            if length >= 0 or not value.isdigit() or len(value) > 15:
                return None
            length = int(value)
        elif lowered in CONNECTION:
            option = _keeps_alive(value)
            if option < 0:
                return None
            keep_alive = keep_alive and option == 1
        elif lowered == b"transfer-encoding" or lowered == b"upgrade":
            return None
    if length < 0 or len(data) - end - 4 != (0 if head else length):
        return None
    return status, keep_alive


def frame(data: bytes, ip: str = "192.0.2.1") -> list[tuple]:
    """Parse one client's ``data``: per request (name, error status, backend bytes, complete, ...).

    The pure function behind both twins' request framing, for differential tests.
    """
    reader = RequestReader(ip)
    reader.feed(data)
    return [
        (r.name, r.error.status if r.error else 0, b"".join(r.data), r.complete, r.keep_alive, r.upgrade)
        for r in reader.requests
    ]


# The counters of the SIGUSR1 line (fastsni.server): requests routed to a backend, bytes
# of requests forwarded to backends (up) and of answers forwarded to clients (down),
# upgraded relays the backend ended with a reset, the answers fasthttpdir gave itself, by
# status, and by cause (``status_503_denied``: fastsni.engine.cause; https_redirect,
# closed_early, bad_answer).  CAUSES is shared with the compiled twin (not hot).
COUNTS = {"routed": 0, "up": 0, "down": 0, "relay_resets": 0}
ANSWERED: dict[int, int] = {}
CAUSES: dict[str, int] = {}
ENDINGS = frozenset((errno.EPIPE, errno.ECONNRESET))  # how relays end: counted, not logged


def counts() -> dict:
    return {**COUNTS, **fair_share_counts(), "answered": dict(ANSWERED), "causes": dict(CAUSES)}


def log(client: tuple, name: str | None, reason: str) -> None:
    """One failure line about the connection from ``client`` (its address, as accept gave it)."""
    failures.write(f"fasthttpdir: {describe(client)} {name or '-'}: {reason}\n")


class HttpConnection(Handler):
    """One client connection on fastsni's engine: requests in, answers out in order.

    The client's descriptor and its current backend's both report to this handler
    (edge-triggered, see fastsni.engine), and each is read and written through its
    engine Side.  Bytes wait in a Side's ``queued`` only when a write fell short; while
    either side's holds more than HIGH_WATER, the other side is not read.  After a 101
    both sides go to the engine's Relay.
    """

    REFUSED = error_response(503, True)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, service: Service, fd: int, peer: tuple) -> None:
        self.service = service
        self.reactor = service.reactor
        self.fd = fd
        self.client = Side(service.reactor, fd)
        self.peer = peer  # the client's address, as accept gave it
        self.reader: RequestReader | None = RequestReader(client_ip(peer))
        self.backend: Side | None = None  # the backend connection, while one is open
        self.backend_name: str | None = None
        self.backend_socket: tuple[int, int] | None = None  # the identity of its socket file
        self.backend_checked = 0.0  # when it was made, or last found current
        self.client_eof = False  # the client sent everything; answer what it asked, then close
        self.active: Request | None = None  # the exchange in progress
        self.response = None  # the backend connection's HttpResponseParser, once an answer is not simple
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
        self.kept_alive = False  # answered a request and waits for the next
        self.reactor.add(fd, self)
        self.arm()

    # events

    def ready(self, fd: int, events: int) -> None:
        if fd == self.fd:
            self.client.saw(events)
        elif self.backend is not None and fd == self.backend.fd:
            self.backend.saw(events)
        self.run()

    def run(self) -> None:
        """Move what can move: writes that fell short first, then what each side sends."""
        backend, client = self.backend, self.client
        if backend is not None and backend.queued and backend.writable:
            self.flush_backend()
        if client.queued and client.writable and not self.done():
            self.flush_client()
        if not self.done():
            self.read_backend()
        if not self.done():
            self.read_client()

    def done(self) -> bool:
        return self.closed or self.relayed

    def shed(self) -> bool:
        """Out of descriptors (engine.Service.shed): close now if no request head is
        complete (a new connection, or one idle between requests)."""
        if self.done() or self.reader is None or self.active is not None or self.reader.requests:
            return False
        self.shut()
        return True

    # client side

    def read_client(self) -> None:
        client = self.client
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

    def wants_client(self) -> bool:
        """Read the client only while its queued bytes and the backend keep up."""
        if self.lingering:
            return not self.closed
        reader = self.reader
        if reader is None or self.done() or reader.rejected is not None:
            return False
        if self.upgrade_wait or self.client_eof:
            return False
        if self.backend is not None and len(self.backend.queued) > HIGH_WATER:
            return False
        queued = 0
        for request in reader.requests:
            queued += request.size
        return queued <= HIGH_WATER

    def client_data(self, data: bytes) -> None:
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

    def client_ended(self) -> None:
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

    def send_client(self, data: bytes) -> None:
        """Write ``data`` to the client, or queue it behind what waits already."""
        if self.client.send(data) < 0:
            self.shut()  # the client is gone

    def answer(self, status: int, close: bool, request: Request | None) -> None:
        """Answer ``request`` with fasthttpdir's own ``status``."""
        ANSWERED[status] = ANSWERED.get(status, 0) + 1
        self.send_client(response(status, request, close))

    def flush_client(self) -> None:
        if self.client.flush() < 0:
            self.shut()  # the client is gone
            return
        if self.client.queued:
            return
        if self.closing:
            self.shut()
        elif self.lingering:
            self.begin_lingering()

    def arm(self) -> None:
        """The next head is due within HEAD_TIMEOUT."""
        self.stop_timer()
        self.timer = self.reactor.call_later(HEAD_TIMEOUT, self.expire)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        self.timer = None
        if self.active is None and self.reader is not None and not self.reader.requests:
            if self.reader.head_size:
                log(self.peer, None, f"no complete request head within {HEAD_TIMEOUT:g} s")
            self.close()

    def close(self) -> None:
        """Close once what the client is owed is out (at most LINGER seconds from now)."""
        if self.closed:
            return
        self.end_exchanges()
        if not self.client.queued:
            self.shut()
            return
        self.closing = True
        self.timer = self.reactor.call_later(LINGER, self.shut)

    def linger(self) -> None:
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
        self.timer = self.reactor.call_later(LINGER, self.shut)
        if not self.client.queued:
            self.begin_lingering()

    def client_may_send(self) -> bool:
        """Whether more bytes may come from the client, so that closing now could reset
        the connection under the last answer.  Not if it has sent its end, nor after a
        whole request whose sender said "close" (RFC 9112 §9.6: it sends no further
        request) and nothing after it: its bytes read to the last (EAGAIN), none parsed
        past that request, no upgrade pending."""
        if self.client_eof:
            return False
        reader = self.reader
        if reader is None or self.client.readable or reader.rejected is not None or len(reader.requests) != 1:
            return True
        request = reader.requests[0]
        return request.keep_alive or request.upgrade or not request.complete or request.error is not None

    def begin_lingering(self) -> None:
        shutdown_write(self.fd)
        self.client.readable = True  # what came while we did not read is dropped now

    def end_exchanges(self) -> None:
        self.stop_timer()
        self.drop_backend()
        self.active = None
        self.response = None  # each parser refers back to its callbacks' object: unlink
        if self.reader is not None:  # them, so refcounting frees both now, not the GC later
            self.reader.parser = None
        self.reader = None

    def shut(self) -> None:
        """Close the client (and backend) descriptors now."""
        if self.closed:
            return
        self.end_exchanges()
        self.closed = True
        self.reactor.close(self.fd)
        self.service.closed(self)

    # exchanges

    def next(self) -> None:
        """Start the next queued request if none is in progress."""
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
            self.begun = time.monotonic()
            self.final = False
            self.overrun = False
            self.tail = b""
            self.close_delimited = False
            self.response_keep_alive = True
            if self.backend is not None and (self.backend_name != request.name or not self.backend_current()):
                self.drop_backend()  # another host, or its name leads elsewhere now
            self.reused = self.backend is not None
            if self.backend is None:
                if not self.connect(request):
                    continue  # answered with an error; the next request may go on
            else:
                self.pump()
            if self.active is request and self.backend is not None:
                COUNTS["routed"] += 1
        reader = self.reader
        if self.active is None and reader is not None and not reader.requests:
            if self.client_eof or (self.draining and not reader.head_size):
                self.close()
            elif self.timer is None:  # the head's deadline holds however its bytes trickle in
                self.kept_alive = True
                self.arm()
                if self.backend is not None:
                    self.watch_backend()

    def backend_current(self) -> bool:
        """Whether the open backend connection may take the next request: made or found
        current less than RECHECK seconds ago, or its name still leads to its socket."""
        now = self.reactor.time()
        if now - self.backend_checked < RECHECK:
            return True
        if not still_leads_to(self.backend_name, self.backend_socket, now):
            return False
        self.backend_checked = now
        return True

    def watch_backend(self) -> None:
        """Idle with a backend connection open: the sweep runs (see _sockets)."""
        global _sweeping
        if not _sweeping:
            _sweeping = True
            self.reactor.call_later(RECHECK, sweep, self.service)

    def connect(self, request: Request) -> bool:
        """Open a backend connection for ``request``; False if answered with an error."""
        try:
            fd, proxy, identity = connect_backend(request.name, BACKEND_SOCKET)
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
        self.backend = Side(self.reactor, fd)
        self.backend_name = request.name
        self.backend_socket = identity
        self.backend_checked = self.reactor.time()
        self.response = None  # llhttp once an answer is not simple (simple_answer)
        self.reactor.add(fd, self)
        if proxy:  # goes out in one write with the request head (pump)
            request.data.insert(
                0, proxy_header(proxy, self.peer, local_of(self.fd, self.service.family), request.name)
            )
        self.pump()
        return True

    def pump(self) -> None:
        """Write what has arrived of the request in progress to its backend."""
        request = self.active
        if request is None or self.backend is None or not request.data:
            return
        data = b"".join(request.data)
        request.data = []
        request.size = 0
        COUNTS["up"] += len(data)
        self.sent += len(data)
        self.send_backend(data)

    def send_backend(self, data: bytes) -> None:
        if self.backend.send(data) < 0:
            self.backend_write_failed()

    def flush_backend(self) -> None:
        if self.backend.flush() < 0:
            self.backend_write_failed()

    def backend_write_failed(self) -> None:
        """A write to the backend failed: the next read reports how (an answer may be in)."""
        self.backend.readable = self.backend.closing = True

    def drop_backend(self) -> None:
        if self.backend is not None:
            self.reactor.close(self.backend.fd)
            self.backend = None
            self.backend_name = None
            self.response = None

    # backend side

    def read_backend(self) -> None:
        while self.backend is not None and self.backend.readable and len(self.client.queued) <= HIGH_WATER:
            data = self.backend.read()
            if data is None:
                return
            if not data:  # closed, or reset: as good as closed
                self.backend_lost()
                return
            self.backend_data(data)

    def backend_data(self, data: bytes) -> None:
        if self.active is None or self.final:
            self.drop_backend()  # an answer nobody asked for
            return
        self.heads = 0
        answer = simple_answer(data, self.active.method == b"HEAD") if self.response is None else None
        if answer is not None:  # one whole answer: what llhttp's callbacks would have set
            self.status, self.response_keep_alive = answer
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
        COUNTS["down"] += len(data)
        self.send_client(data)
        if self.final and not self.closed:
            self.answered()

    def head_end(self, data: bytes) -> int:
        """Where in ``data`` the last answer head completed in it ends."""
        seen = self.tail + data
        at = -4
        for _ in range(self.heads):
            at = seen.index(b"\r\n\r\n", at + 4)
        return at + 4 - len(self.tail)

    def on_message_begin(self) -> None:
        if self.final:
            self.overrun = True
        self.status = 0
        self.framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
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

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.final = True

    def answered(self) -> None:
        """The final answer went out: the exchange ends once the request is all sent."""
        request = self.active
        self.routed(request)
        if not (self.response_keep_alive and request.keep_alive) or not request.complete:
            # the request is not all here (an early answer) or either side closes
            self.linger()
            return
        self.pump()
        self.finish()

    def finish(self) -> None:
        request = self.active
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

    def backend_lost(self) -> None:
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

    def routed(self, request: Request) -> None:
        """The backend's answer to ``request`` is out: one line to the owner's log."""
        tell_owner(
            self.peer,
            request.name,
            "routed",
            self.begun,
            status=self.status,
            up=self.sent,
            down=self.forwarded,
        )

    def fail_answer(self, reason: str, why: str = "bad_answer") -> None:
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

    def fail_request(self, rejection: Rejected) -> None:
        """The request in progress broke mid-body: 400 if nothing of its answer went out, else cut."""
        log(self.peer, self.active.name, rejection.reason)
        self.drop_backend()
        if self.forwarded == 0:
            self.answer(rejection.status, True, self.active)
            self.linger()
        else:
            self.shut()

    def relay(self, answer: bytes) -> None:
        """A 101 answer: from here on, bytes flow raw both ways, through fastsni's Relay.

        ``answer`` (the 101 and whatever followed it) goes to the client after anything
        still waiting for it; client bytes held back since the upgrade request go to
        the backend after anything still waiting for it."""
        self.stop_timer()
        backend, client = self.backend, self.client
        backend.queued += self.reader.held
        client.queued += answer
        client.readable = True  # it was not read while the upgrade waited: it may hold bytes
        self.backend = None
        self.reader = None
        self.active = None
        self.relayed = True
        self.reactor.remove(backend.fd)  # the Relay adds it as its own
        tell_owner(
            self.peer, self.backend_name, "routed", self.begun, status=101, up=self.sent, down=len(answer)
        )
        Relay(self.reactor, client, backend, self.relay_closed, self.backend_failed)

    def relay_closed(self) -> None:
        self.service.closed(self)

    def backend_failed(self, err: int) -> None:
        """The backend failed while relaying after a 101: a reset or broken pipe is how
        relays end (counted); anything else gets one line."""
        if err in ENDINGS:
            COUNTS["relay_resets"] += 1
            return
        reason = f"{BACKEND_SOCKET}: {errno.errorcode.get(err, err)} while relaying"
        log(self.peer, self.backend_name, reason)

    def drain(self) -> None:
        """SIGHUP: answer the requests begun, then close (see next); an idle one closes now."""
        if self.done() or self.reader is None:
            return  # a relay (or a connection already closing) runs to its end
        self.draining = True
        if self.kept_alive and self.active is None and not self.reader.requests and not self.reader.head_size:
            self.close()  # idle between requests; a new connection's first request may be on its way
