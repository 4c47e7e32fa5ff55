"""fasthttpdir's connection: parse HTTP/1.1 requests, route each by Host, relay (pure twin).

This module is the specification; ``pyx/_http.pyx`` mirrors it function for function.

One client connection carries a queue of parsed requests.  The first one is the
exchange in progress: its head and body go to the backend of its host while the
backend's answer goes back to the client byte for byte, parsed only to find where
it ends.  One request at a time is in flight per backend connection, so answers
reach the client in request order; the backend connection is reused while
consecutive requests name the same host.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections import deque

import httptools

from fastsni.addresses import client_ip, describe, proxy_v1_header
from fastsni.engine import Reactor, Relay, connect_backend, errno_name
from fastsni.tls import check_hostname

HEAD_TIMEOUT = 10.0  # seconds from accept (or the end of the previous answer) to a complete head
LINGER = 5.0  # seconds a closing connection keeps reading (and dropping) what the client still sends
MAX_HEAD = 64 * 1024  # bytes of request head before 431
BACKEND_SOCKET = "http-socket"
DROPPED = frozenset((b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"forwarded"))
NOT_FOUND = frozenset((errno.ENOENT, errno.ENOTDIR))
UNAVAILABLE = frozenset((errno.EACCES, errno.ECONNREFUSED))
REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}

HIGH_WATER = 64 * 1024  # per transport: more unsent bytes than this stop the other side being read
LIVE: set = set()  # open client connections, for the drain on SIGHUP

__all__ = ["LIVE", "HttpConnection", "Rejected", "host_name", "frame"]


def steal(transport: asyncio.Transport) -> int:
    """The socket of a transport that has written everything, for fastsni's relay: a
    duplicate descriptor; the transport is aborted, so its event loop forgets the original."""
    fd = os.dup(transport.get_extra_info("socket").fileno())
    transport.abort()
    return fd


_reactor: Reactor | None = None


def reactor() -> Reactor:
    """This process's reactor for relays after an upgrade, made on first use."""
    global _reactor
    if _reactor is None:
        _reactor = Reactor(asyncio.get_running_loop())
    return _reactor


class Rejected(Exception):
    """A request answered by the proxy itself: an HTTP status and a reason for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _authority_name(authority: bytes) -> str:
    """``host[:port]`` -> the directory name: port dropped, one trailing dot dropped, lowercased."""
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
    name = _authority_name(hosts[0])
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
        self.ip = ip
        self.parser = httptools.HttpRequestParser(self)
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

    def feed(self, data: bytes) -> None:
        """Parse ``data``; a rejection or parse error becomes a final error Request."""
        if self.in_head:
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.held = data[int(exc.args[0]) :]
            return
        except httptools.HttpParserError as exc:
            self.reject(self.rejected or Rejected(400, f"bad request: {exc}"))
            return
        if self.in_head and self.head_size > MAX_HEAD:
            self.reject(Rejected(431, "request head over 64 KiB"))

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

    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = []
        self.hosts = []
        self.trailers = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self.trailers.append(b"%s: %s\r\n" % (name, value))
            return
        self.headers.append((name, value))
        if name.lower() == b"host":
            self.hosts.append(value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        method = parser.get_method()
        version = parser.get_http_version()
        size = len(method) + len(self.target) + 12
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        if size > MAX_HEAD:
            raise self.fail(Rejected(431, "request head over 64 KiB"))
        if version != "1.1" and version != "1.0":
            raise self.fail(Rejected(400, f"HTTP/{version}"))
        if method == b"CONNECT":
            raise self.fail(Rejected(405, "CONNECT"))
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
        lines = [b"%s %s HTTP/%s\r\n" % (method, self.target, version.encode())]
        for field, value in self.headers:
            lowered = field.lower()
            if lowered in DROPPED:
                continue
            if lowered == b"transfer-encoding":
                request.chunked = True  # llhttp accepts only "chunked" last in a request
            lines.append(b"%s: %s\r\n" % (field, value))
        lines.append(b"X-Forwarded-For: %s\r\n\r\n" % self.ip.encode())
        head = b"".join(lines)
        request.data.append(head)
        request.size = len(head)
        request.replay = head
        self.current = request
        self.requests.append(request)

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


def log(client: tuple | None, name: str | None, reason: str) -> None:
    where = describe(client) if client else "(gone)"
    sys.stderr.write(f"fasthttpdir: {where} {name or '-'}: {reason}\n")


class Backend(asyncio.Protocol):
    """The backend end of one connection: everything goes to the HttpConnection."""

    def __init__(self, connection: HttpConnection, name: str, greeting: bytes) -> None:
        self.connection = connection
        self.name = name
        self.greeting = greeting
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER)
        if self.greeting:
            transport.write(self.greeting)
        self.connection.backend_ready(self)

    def data_received(self, data: bytes) -> None:
        self.connection.backend_data(self, data)

    def eof_received(self) -> bool:
        return False  # close: answers are complete or cut, both handled in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connection.backend_lost(self)

    def pause_writing(self) -> None:
        self.connection.backend_full = True
        self.connection.flow()

    def resume_writing(self) -> None:
        if self.connection.switching is not None:
            asyncio.get_running_loop().call_soon(self.connection.hand_over)
            return
        self.connection.backend_full = False
        self.connection.flow()


class HttpConnection(asyncio.Protocol):
    """One client connection: requests in, answers out in order, upgrades to a raw relay."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: tuple | None = None
        self.server: tuple | None = None
        self.reader: RequestReader | None = None
        self.backend: Backend | None = None
        self.active: Request | None = None  # the exchange in progress
        self.response = None  # its HttpResponseParser
        self.status = 0  # status of the response being parsed
        self.forwarded = 0  # bytes of the current answer sent to the client
        self.final = False  # the final (non-1xx) answer is complete
        self.close_delimited = False
        self.response_keep_alive = True
        self.framed = False
        self.backend_full = False
        self.reading = True
        self.upgrade_wait = False
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # loop time the next head is due by; 0: none due
        self.reused = False  # the exchange in progress went to an open backend connection
        self.switching: bytes | None = None  # a 101 answer, while the sockets leave their transports
        self.overrun = False  # the backend sent more after its final answer
        self.heads = 0  # answer heads completed in the bytes being parsed
        self.tail = b""  # the last 3 bytes of the answer so far, to find a head's end
        self.relayed = False  # handed to fastsni's relay after a 101
        self.draining = False  # SIGHUP: close once the requests begun are answered

    # client side

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.client = transport.get_extra_info("peername")
        self.server = transport.get_extra_info("sockname")
        transport.set_write_buffer_limits(HIGH_WATER)
        LIVE.add(self)
        self.reader = RequestReader(client_ip(self.client))
        self.arm()

    def arm(self) -> None:
        """The next head is due within HEAD_TIMEOUT.  The connection keeps one timer and
        moves its deadline lazily (expire() checks it), so a request costs no timer calls."""
        self.deadline = self.loop.time() + HEAD_TIMEOUT
        if self.timer is None:
            self.timer = self.loop.call_later(HEAD_TIMEOUT, self.expire)

    def disarm(self) -> None:
        """A head is complete: no deadline until the next arm()."""
        self.deadline = 0.0

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadline = 0.0

    def expire(self) -> None:
        self.timer = None
        if not self.deadline:
            return
        left = self.deadline - self.loop.time()
        if left > 0:
            self.timer = self.loop.call_later(left, self.expire)
            return
        if self.active is None and not self.reader.requests:
            if self.reader.head_size:
                log(self.client, None, f"no complete request head within {HEAD_TIMEOUT:g} s")
            self.close()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None or reader.rejected is not None:
            return
        if self.upgrade_wait:
            reader.held += data
            return
        reader.feed(data)
        if reader.requests:
            self.disarm()
        if reader.requests and reader.requests[-1].upgrade:
            self.upgrade_wait = True
        active = self.active
        if active is not None:
            if active.error is not None:
                self.fail_request(active.error)
                return
            self.pump()
        self.next()
        self.flow()

    def eof_received(self) -> bool:
        if self.active is None and not (self.reader and self.reader.requests):
            self.close()
            return False
        self.closing = True  # the answers in progress still go out; close after them
        self.flow()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.relayed:
            LIVE.discard(self)
        self.stop_timer()
        self.reader = None
        backend = self.backend
        self.backend = None
        if backend is not None and backend.transport is not None:
            backend.transport.abort()

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.switching is not None:
            asyncio.get_running_loop().call_soon(self.hand_over)
            return
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def flow(self) -> None:
        """Read the client only while its queued bytes and the backend keep up."""
        reader = self.reader
        if reader is None or self.transport.is_closing():
            return
        queued = 0
        for request in reader.requests:
            queued += request.size
        want = not (
            self.backend_full
            or queued > HIGH_WATER
            or self.upgrade_wait
            or self.closing
            or reader.rejected is not None
        )
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def close(self) -> None:
        self.stop_timer()
        if self.transport is not None:
            self.transport.close()
        backend = self.backend
        self.backend = None
        if backend is not None and backend.transport is not None:
            backend.transport.close()

    def linger(self) -> None:
        """Close after the last answer without losing it (RFC 9112 §9.6): the client may
        still be sending (a body, pipelined requests), and closing with its bytes unread
        would reset the connection, which can destroy the answer before it is read.  So
        shut our side once the answer is out, then read and drop until the client closes
        or LINGER seconds pass."""
        self.drop_backend()
        self.stop_timer()
        self.active = None
        self.reader = None  # data_received drops what comes; eof_received closes
        if self.transport.is_closing():
            return
        if not self.transport.can_write_eof():
            self.close()
            return
        self.transport.write_eof()
        self.transport.resume_reading()
        self.timer = self.loop.call_later(LINGER, self.close)

    # exchanges

    def next(self) -> None:
        """Start the next queued request if none is in progress."""
        while self.active is None and self.reader is not None and self.reader.requests:
            if self.transport.is_closing():
                return
            request = self.reader.requests[0]
            if request.error is not None:
                log(self.client, request.name, request.error.reason)
                self.transport.write(error_response(request.error.status, True))
                self.linger()
                return
            self.active = request
            self.response = httptools.HttpResponseParser(self)
            self.status = 0
            self.forwarded = 0
            self.final = False
            self.overrun = False
            self.tail = b""
            self.close_delimited = False
            self.response_keep_alive = True
            backend = self.backend
            if backend is not None and (backend.name != request.name or backend.closed):
                self.backend = None
                if backend.transport is not None:
                    backend.transport.close()
                backend = None
            self.reused = backend is not None
            if backend is None:
                if not self.connect(request):
                    continue  # answered with an error; the next request may go on
            elif backend.transport is not None:
                self.pump()
        reader = self.reader
        if self.active is None and reader is not None and not reader.requests:
            if self.closing or (self.draining and not reader.head_size):
                self.close()
            elif not self.transport.is_closing():
                self.arm()

    def connect(self, request: Request) -> bool:
        """Open a backend connection for ``request``; False if answered with an error."""
        try:
            fd, send_proxy = connect_backend(request.name, BACKEND_SOCKET)
        except OSError as exc:
            if exc.errno in NOT_FOUND:
                status = 404
            elif exc.errno in UNAVAILABLE:
                status = 503
            else:
                status = 502
            log(self.client, request.name, f"{BACKEND_SOCKET}: {errno_name(exc)}")
            self.active = None
            if request.complete and request.keep_alive:
                self.reader.requests.popleft()
                self.transport.write(error_response(status, False))
                return False
            self.transport.write(error_response(status, True))
            self.linger()
            return True
        greeting = proxy_v1_header(self.client, self.server) if send_proxy else b""
        backend = Backend(self, request.name, greeting)
        self.backend = backend
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
        task = loop.create_task(loop.create_unix_connection(lambda: backend, sock=sock))
        task.add_done_callback(lambda task: self.connected(task, backend, request))
        return True

    def connected(self, task: asyncio.Task, backend: Backend, request: Request) -> None:
        if task.cancelled() or task.exception() is None:
            return
        if self.backend is backend and self.active is request:
            self.backend = None
            self.fail_answer(f"{BACKEND_SOCKET}: {task.exception()}")

    def backend_ready(self, backend: Backend) -> None:
        if self.backend is not backend or self.transport.is_closing():
            backend.transport.close()
            return
        if self.transport.get_write_buffer_size() > HIGH_WATER:
            backend.transport.pause_reading()
        self.pump()
        self.flow()

    def pump(self) -> None:
        """Write what has arrived of the request in progress to its backend."""
        request = self.active
        backend = self.backend
        if request is None or backend is None or backend.transport is None or not request.data:
            return
        backend.transport.writelines(request.data)
        request.data = []
        request.size = 0

    # backend side

    def backend_data(self, backend: Backend, data: bytes) -> None:
        if backend is not self.backend or self.active is None or self.final:
            backend.transport.close()  # an answer nobody asked for
            if backend is self.backend:
                self.backend = None
            return
        self.heads = 0
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
        self.tail = (self.tail + data)[-3:]
        if self.overrun:
            # More after the final answer, unasked: never let it pass as the answer to
            # the client's next request (which may be for another host).
            self.fail_answer("backend sent bytes after its answer")
            return
        self.forwarded += len(data)
        self.transport.write(data)
        if self.final:
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
        if not (self.response_keep_alive and request.keep_alive) or not request.complete:
            # the request is not all here (an early answer) or either side closes
            self.linger()
            return
        self.pump()
        self.finish()

    def finish(self) -> None:
        request = self.active
        self.active = None
        self.response = None
        self.reader.requests.popleft()
        if request.upgrade and self.upgrade_wait:
            self.upgrade_wait = False
            held = self.reader.held
            self.reader.held = b""
            if held:
                self.data_received(held)
                return
        self.next()
        self.flow()

    def drop_backend(self) -> None:
        backend = self.backend
        self.backend = None
        if backend is not None and backend.transport is not None:
            backend.transport.close()

    def backend_lost(self, backend: Backend) -> None:
        if backend is not self.backend:
            return
        self.backend = None
        if self.active is None or self.final:
            return
        if self.close_delimited:
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
                self.flow()
            return
        self.fail_answer("backend closed before its answer was complete")

    def fail_answer(self, reason: str) -> None:
        """The backend failed the request in progress: 502 if nothing went out yet, else cut."""
        log(self.client, self.active.name if self.active else None, reason)
        self.drop_backend()
        if self.forwarded == 0:
            self.transport.write(error_response(502, True))
            self.linger()
        else:
            self.transport.abort()

    def fail_request(self, rejection: Rejected) -> None:
        """The request in progress broke mid-body: 400 if nothing of its answer went out, else cut."""
        log(self.client, self.active.name, rejection.reason)
        self.drop_backend()
        if self.forwarded == 0:
            self.transport.write(error_response(rejection.status, True))
            self.linger()
        else:
            self.transport.abort()

    def relay(self, answer: bytes) -> None:
        """A 101 answer: from here on, bytes flow raw both ways, through fastsni's relay.

        The two sockets leave their transports once both wrote everything queued
        (resume_writing brings us back to hand_over); then ``answer`` (the 101 and
        whatever followed it) goes to the client, held client bytes to the backend."""
        self.switching = answer
        self.stop_timer()
        self.transport.pause_reading()
        self.backend.transport.pause_reading()
        self.hand_over()

    def hand_over(self) -> None:
        backend = self.backend
        if self.switching is None or backend is None or self.transport.is_closing():
            return
        for transport in (self.transport, backend.transport):
            if transport.get_write_buffer_size():
                transport.set_write_buffer_limits(0, 0)  # resume_writing says when it is empty
                return
        answer = self.switching
        held = self.reader.held
        self.switching = None
        self.reader = None
        self.backend = None
        self.relayed = True
        client = steal(self.transport)
        server = steal(backend.transport)
        shared = reactor()
        shared.add(client, None)
        Relay(shared, client, server, held, answer, self.relay_closed, True)

    def relay_closed(self) -> None:
        LIVE.discard(self)

    def drain(self) -> None:
        """SIGHUP: answer the requests begun, then close (see next); an idle one closes now."""
        if self.relayed or self.reader is None:
            return  # a relay (or a connection already closing) runs to its end
        self.draining = True
        if self.active is None and not self.reader.requests and not self.reader.head_size:
            self.close()  # between requests
