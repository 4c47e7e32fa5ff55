"""fasthttpdir's framing holes found from outside (issue 21), on both twins: a request's
framing and routing fields reach a backend only from the head, and only unambiguously.

- HTTP/1.0 with Transfer-Encoding: 400 and close (RFC 9112 §6.1), no backend connected;
- a chunked body's trailers lose every field that frames, routes or is hop-by-hop
  (Host, Content-Length, Transfer-Encoding, Connection, Keep-Alive, Proxy-Connection,
  Upgrade, TE, Trailer, any X-Forwarded-*, Forwarded);
- a field name with "_" is dropped, in the head and in trailers (as nginx does by
  default), and the rest of the request goes on.

Each case twice: ``frame()`` of the twin's module, and a real proxy process with a
backend that records every byte it received.
"""

from __future__ import annotations

import socket

import httptools
import pytest
from backends import UnixBackend, recv_until_eof

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NORMAL = b"GET /n HTTP/1.1\r\nHost: a.example\r\n\r\n"
NORMAL_FORWARDED = b"GET /n HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"

HTTP10_CHUNKED = (
    b"POST /a HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n"
)
CHUNKED = b"POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
ROUTING_TRAILERS = (
    b"Host: evil.example\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nProxy-Connection: close\r\n"
    b"Upgrade: websocket\r\nTE: trailers\r\nTrailer: Checksum\r\nForwarded: for=6.6.6.6\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Port: 8443\r\nX_Forwarded_For: 6.6.6.6\r\n"
    b"Host_: evil.example\r\n"
    b"Checksum: 1\r\n\r\n"
)
CHUNKED_FORWARDED = (
    b"POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
    b"3\r\nabc\r\n0\r\nChecksum: 1\r\n\r\n"
)
UNDERSCORES = (
    b"POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer_Encoding: chunked\r\nContent-Length: 3\r\n"
    b"X_Forwarded_For: 6.6.6.6\r\nX-Kept: 1\r\nhost_name: evil.example\r\n\r\n"
    b"abc"
)
UNDERSCORES_FORWARDED = (
    b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nX-Kept: 1\r\n"
    b"X-Forwarded-For: 192.0.2.1\r\n\r\nabc"
)


def framing(twin):
    return twin.module("fasthttpdir.proxy", "fasthttpdir._http")


# --- frame(): what each twin makes of the bytes ------------------------------------------


def test_http10_with_transfer_encoding_is_400(twin):
    """Refused at its head: nothing of it (nor of what follows) goes to a backend."""
    [(name, status, data, complete, keep_alive, _)] = framing(twin).frame(HTTP10_CHUNKED)
    assert (name, status, data, complete, keep_alive) == (None, 400, b"", True, False)


@pytest.mark.parametrize("coding", [b"chunked", b"gzip, chunked", b"identity"])
def test_http10_with_any_transfer_encoding_is_400(twin, coding):
    head = b"POST /a HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: %s\r\nContent-Length: 0\r\n\r\n"
    request = head % coding
    [(name, status, data, _, keep_alive, _)] = framing(twin).frame(request)
    assert (name, status, data, keep_alive) == (None, 400, b"", False)


def test_http10_without_transfer_encoding_still_routes(twin):
    request = b"POST /a HTTP/1.0\r\nHost: a.example\r\nContent-Length: 2\r\nTransfer_Encoding: gzip\r\n\r\nhi"
    [(name, status, data, complete, _, _)] = framing(twin).frame(request)
    assert (name, status, complete) == ("a.example", 0, True)
    assert data == (
        b"POST /a HTTP/1.0\r\nHost: a.example\r\nContent-Length: 2\r\nX-Forwarded-For: 192.0.2.1\r\n\r\nhi"
    )


def test_trailers_cannot_carry_routing_or_framing_fields(twin):
    [(name, status, data, complete, _, _)] = framing(twin).frame(CHUNKED + ROUTING_TRAILERS)
    assert (name, status, complete) == ("a.example", 0, True)
    assert data == CHUNKED_FORWARDED


@pytest.mark.parametrize("field", [b"Content-Length: 3", b"Transfer-Encoding: chunked"])
def test_framing_trailers_are_refused_by_the_parser(twin, field):
    """llhttp itself refuses these two in trailers: the request fails with 400 mid-body."""
    [(name, status, _, complete, _, _)] = framing(twin).frame(CHUNKED + field + b"\r\n\r\n")
    assert (name, status, complete) == ("a.example", 400, True)


@pytest.mark.parametrize("field", [b"Connection: close", b"Proxy-Connection: close"])
def test_close_in_trailers_ends_the_connection(twin, field):
    """llhttp takes a close from trailers: the request goes on without the field, and a
    request pipelined after it is refused (400), not forwarded."""
    first, second = framing(twin).frame(CHUNKED + field + b"\r\n\r\n" + NORMAL)
    assert first == ("a.example", 0, CHUNKED_FORWARDED.replace(b"Checksum: 1\r\n", b""), True, True, False)
    assert second[:3] == (None, 400, b"")


def test_field_names_with_underscores_are_dropped(twin):
    [(name, status, data, complete, _, _)] = framing(twin).frame(UNDERSCORES)
    assert (name, status, complete) == ("a.example", 0, True)
    assert data == UNDERSCORES_FORWARDED


def test_host_with_underscore_is_not_a_host(twin):
    """``Host_`` is neither routed by nor counted as a second Host."""
    request = b"GET / HTTP/1.1\r\nHost_: evil.example\r\nHost: a.example\r\n\r\n"
    [(name, status, data, _, _, _)] = framing(twin).frame(request)
    assert (name, status) == ("a.example", 0)
    assert data == b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
    [(name, status, *_)] = framing(twin).frame(b"GET / HTTP/1.1\r\nHost_: a.example\r\n\r\n")
    assert (name, status) == (None, 400)


# --- end to end: a real proxy, a backend that records what reached it --------------------


class Recorder:
    """A backend that keeps every byte each connection sent it and answers each complete
    request with OK (recording first, so an answer means its request is all here)."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []

    def handle(self, conn: socket.socket) -> None:
        got = bytearray()
        self.received.append(got)
        done = []

        class Callbacks:
            def on_message_complete(self) -> None:
                done.append(True)

        parser = httptools.HttpRequestParser(Callbacks())
        while data := conn.recv(65536):
            got.extend(data)
            parser.feed_data(data)
            while done:
                done.pop()
                conn.sendall(OK)


def answers(sock: socket.socket, count: int) -> bytes:
    """Read until ``count`` OK answers arrived (or EOF)."""
    data = b""
    while data.count(OK) < count:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_http10_with_transfer_encoding_gets_400_and_close_end_to_end(hosts, twin, proxies):
    recorder = Recorder()
    backend = UnixBackend(hosts / "a.example" / "http-socket", recorder.handle)
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect() as sock:
            sock.sendall(HTTP10_CHUNKED)
            answer = recv_until_eof(sock)  # the proxy closes after its 400
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"\r\nConnection: close\r\n" in answer
        assert answer.count(b"HTTP/1.1") == 1, answer
        proxy.expect("Transfer-Encoding in HTTP/1.0")
        # A later request reaches the backend as its first connection: the refused one never
        # connected (connections are accepted in the order they were made).
        with proxy.connect() as sock:
            sock.sendall(NORMAL)
            assert answers(sock, 1) == OK
    finally:
        backend.close()
    assert backend.accepted == 1
    assert [bytes(got) for got in recorder.received] == [NORMAL_FORWARDED]


def test_trailers_cannot_carry_routing_or_framing_fields_end_to_end(hosts, twin, proxies):
    recorder = Recorder()
    backend = UnixBackend(hosts / "a.example" / "http-socket", recorder.handle)
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect() as sock:
            # ("Connection: close" or "Proxy-Connection: close" in trailers makes llhttp refuse
            # what follows with a 400: keep-alive here, so a request follows)
            sock.sendall(CHUNKED + ROUTING_TRAILERS.replace(b": close\r\n", b": keep-alive\r\n") + NORMAL)
            assert answers(sock, 2) == OK + OK
    finally:
        backend.close()
    assert [bytes(got) for got in recorder.received] == [
        CHUNKED_FORWARDED.replace(b"192.0.2.1", b"127.0.0.1") + NORMAL_FORWARDED
    ]


def test_field_names_with_underscores_are_dropped_end_to_end(hosts, twin, proxies):
    recorder = Recorder()
    backend = UnixBackend(hosts / "a.example" / "http-socket", recorder.handle)
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect() as sock:
            # a backend that read Transfer_Encoding as Transfer-Encoding would take "abc" and
            # what follows for chunks; it gets Content-Length framing alone
            sock.sendall(UNDERSCORES + NORMAL)
            assert answers(sock, 2) == OK + OK
    finally:
        backend.close()
    assert [bytes(got) for got in recorder.received] == [
        UNDERSCORES_FORWARDED.replace(b"192.0.2.1", b"127.0.0.1") + NORMAL_FORWARDED
    ]
