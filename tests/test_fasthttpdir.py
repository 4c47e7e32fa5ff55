"""fasthttpdir end to end, over both twins: a real proxy process, backends on Unix sockets."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httptools
import pytest
from backends import UnixBackend, read_proxy_line, recv_exactly, recv_until_eof


def read_request(conn: socket.socket, buffer: bytearray) -> tuple[dict, bytes] | None:
    """Read one request (blocking) with httptools; leftover bytes stay in ``buffer``."""
    state: dict = {"headers": [], "body": bytearray(), "done": False}

    class Callbacks:
        def on_url(self, url):
            state["target"] = url.decode()

        def on_header(self, name, value):
            state["headers"].append([name.decode(), value.decode("latin-1")])

        def on_body(self, body):
            state["body"] += body

        def on_message_complete(self):
            state["done"] = True

    parser = httptools.HttpRequestParser(Callbacks())
    data = bytes(buffer)
    buffer.clear()
    while True:
        if data:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                state["done"] = True
        if state["done"]:
            state["method"] = parser.get_method().decode()
            return state, b""
        data = conn.recv(1 << 20)
        if not data:
            return None


def echo(seen: list | None = None, proxy_line: bool = False):
    """A keep-alive backend answering each request with JSON describing it."""

    def handle(conn: socket.socket) -> None:
        line = read_proxy_line(conn).decode() if proxy_line else None
        buffer = bytearray()
        while True:
            got = read_request(conn, buffer)
            if got is None:
                return
            request, _ = got
            body = request.pop("body")
            request["sha256"] = hashlib.sha256(body).hexdigest()
            request["length"] = len(body)
            request["proxy"] = line
            if seen is not None:
                seen.append(request)
            answer = json.dumps(request).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )

    return handle


def scripted(answer: bytes, then_close: bool = False):
    """A backend that reads each request head and writes ``answer``."""

    def handle(conn: socket.socket) -> None:
        buffer = bytearray()
        while read_request(conn, buffer) is not None:
            conn.sendall(answer)
            if then_close:
                return

    return handle


def exchange(sock: socket.socket, data: bytes, count: int = 1, head: bool = False) -> list[tuple]:
    """Send ``data``; read ``count`` responses: (status, headers dict, body).

    Each response is taken as it completes, so several in one recv() all count."""
    sock.sendall(data)
    responses: list[tuple] = []
    state: dict = {}

    class Callbacks:
        def on_message_begin(self):
            state.update(headers={}, body=bytearray(), done=False)

        def on_header(self, name, value):
            state["headers"][name.decode().lower()] = value.decode()

        def on_headers_complete(self):
            if head:
                state["done"] = True

        def on_body(self, body):
            state["body"] += body

        def on_message_complete(self):
            if not head:
                responses.append((parser.get_status_code(), state["headers"], bytes(state["body"])))
                state.clear()

    parser = httptools.HttpResponseParser(Callbacks())
    while len(responses) < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            if state and not state.get("done", True):
                raise ConnectionError("EOF in the middle of a response")
            break
        if not head:
            parser.feed_data(chunk)
            continue
        for byte in [chunk[i : i + 1] for i in range(len(chunk))]:  # a HEAD answer ends at its head
            parser.feed_data(byte)
            if state.get("done"):
                responses.append((parser.get_status_code(), state["headers"], bytes(state["body"])))
                state.clear()
                parser = httptools.HttpResponseParser(Callbacks())
    return responses


@pytest.fixture
def backends():
    started: list[UnixBackend] = []

    def start(hosts: Path, name: str, handle, leaf: str = "http-socket") -> UnixBackend:
        backend = UnixBackend(hosts / name / leaf, handle)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


def get(host: str, target: str = "/", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def test_routes_by_host_and_forwards_headers(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a.example", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        request = (
            b"GET /x?y=1 HTTP/1.1\r\nHost: A.Example.:8080\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"Forwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\n"
            b"Accept: */*\r\nX-Other:  kept \r\n\r\n"
        )
        [(status, headers, body)] = exchange(sock, request)
    assert status == 200
    got = json.loads(body)
    assert got["method"] == "GET" and got["target"] == "/x?y=1"
    assert got["headers"] == [
        ["Host", "A.Example.:8080"],
        ["Accept", "*/*"],
        ["X-Other", "kept "],
        ["X-Forwarded-For", "127.0.0.1"],
    ]


def test_host_switching_on_one_keepalive_connection(hosts, twin, proxies, backends):
    a = backends(hosts, "a", echo())
    b = backends(hosts, "b", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        for host in ("a", "a", "b", "a", "b", "b"):
            [(status, _, body)] = exchange(sock, get(host, f"/{host}"))
            assert status == 200 and json.loads(body)["target"] == f"/{host}"
    assert a.accepted == 2 and b.accepted == 2  # reused while the host stays the same


def test_pipelining_across_two_hosts_in_order(hosts, twin, proxies, backends):
    backends(hosts, "a", echo())
    backends(hosts, "b", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    names = ["a", "b", "b", "a", "b", "a", "a"]
    with proxy.connect() as sock:
        responses = exchange(sock, b"".join(get(n, f"/{i}") for i, n in enumerate(names)), len(names))
    assert [json.loads(body)["target"] for _, _, body in responses] == [f"/{i}" for i in range(len(names))]


BAD_REQUESTS = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "differing-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "bad-chunk": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "te-not-chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-lf-header": b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
    "control-char": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "no-host-1.0": b"GET / HTTP/1.0\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "ipv6-host": b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
    "bad-port": b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n",
    "bad-name": b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n",
    "dotdot": b"GET / HTTP/1.1\r\nHost: ..\r\n\r\n",
    "absolute-disagrees": b"GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "http-0.9": b"GET /\r\n\r\n",
    "http-2.0": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
}


def head_recorder(seen: list):
    """A backend that records each request head's bytes as they arrive, answering 204."""

    def handle(conn: socket.socket) -> None:
        buffer = b""
        while chunk := conn.recv(65536):
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                seen.append(head + b"\r\n\r\n")
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    return handle


@pytest.mark.parametrize(
    "field", [b"Host: a.example\t", b"hOsT:\t  a.example  ", b"host: A.Example.:80 \t "], ids=repr
)
def test_host_with_optional_whitespace_routes(hosts, twin, proxies, backends, field):
    """RFC 9110 §5.5: leading and trailing SP/HTAB are not part of a field value.  The
    backend gets the field as sent, trailing whitespace included; like every field, it is
    rebuilt as ``name: value`` (llhttp hands over the value without its leading OWS)."""
    seen: list = []
    backends(hosts, "a.example", head_recorder(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        [(status, _, _)] = exchange(sock, b"GET / HTTP/1.1\r\n" + field + b"\r\n\r\n")
    assert status == 204
    name, _, value = field.partition(b":")
    assert seen[0].split(b"\r\n")[1] == name + b": " + value.lstrip(b" \t")


def test_ipv6_literal_host_is_refused_as_such(hosts, twin, proxies):
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        [(status, _, _)] = exchange(sock, b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
    assert status == 400
    proxy.expect("IPv6 literal in host")


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_invalid_requests_get_400_and_close(hosts, twin, proxies, backends, case):
    seen: list = []
    backends(hosts, "a", echo(seen))
    backends(hosts, "b", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        responses = exchange(sock, BAD_REQUESTS[case], 2)
        assert sock.recv(1) == b""
    assert [(status, headers["connection"]) for status, headers, _ in responses] == [(400, "close")]
    assert seen == [] or case == "bad-chunk"
    proxy.expect("fasthttpdir: 127.0.0.1:")


def test_smuggled_second_request_is_not_forwarded(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        responses = exchange(sock, get("a", "/ok") + BAD_REQUESTS["cl-and-te"] + get("a", "/smuggled"), 3)
    assert [status for status, _, _ in responses] == [200, 400]
    assert [r["target"] for r in seen] == ["/ok"]


def test_backend_cannot_answer_the_next_request(hosts, twin, proxies, backends):
    """Bytes after a backend's answer must never pass as the answer to the client's next
    request, which may be for another tenant's host (response splitting)."""
    injected = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"

    def splitter(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + injected)
        conn.recv(1)  # hold the connection open until the proxy drops it

    seen: list = []
    backends(hosts, "evil", splitter)
    backends(hosts, "victim", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("evil") + get("victim"))
        received = recv_until_eof(sock)
    assert b"forged" not in received
    assert received.startswith(b"HTTP/1.1 502 ")
    assert "after its answer" in proxy.expect("evil")


def test_backend_cannot_answer_the_next_request_after_head(hosts, twin, proxies, backends):
    """The same for HEAD, whose answer ends at its head although it names a length."""
    injected = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"

    def splitter(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        # The length covers exactly the forged answer, so a parser reading it as a body
        # would see one complete answer and nothing after it.
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(injected) + injected)
        conn.recv(1)

    backends(hosts, "evil", splitter)
    backends(hosts, "victim", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: evil\r\n\r\n" + get("victim"))
        received = recv_until_eof(sock)
    assert b"forged" not in received
    assert received.startswith(b"HTTP/1.1 502 ")


def test_connect_is_405(hosts, twin, proxies):
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        [(status, _, _)] = exchange(sock, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 2)
    assert status == 405


@pytest.mark.parametrize("after", [b"", b"frames"])
def test_refused_upgrade_request_closes(hosts, twin, proxies, after):
    """A 404 to an upgrade request ends the connection at once (Connection: close), even
    with the client's half-close or its first frames already in: what follows an upgrade
    request may be the new protocol, not HTTP.  It used to wait out the head deadline."""
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect(timeout=5) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: w.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + after
        )
        if after:
            sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock)  # within the socket's 5 s, not the 10 s head deadline
    assert answer.startswith(b"HTTP/1.1 404 ") and b"\r\nConnection: close\r\n" in answer, answer


def test_head_over_64k_is_431(hosts, twin, proxies):
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"
        [(status, _, _)] = exchange(sock, big, 2)
    assert status == 431


def test_absolute_form_routes_by_authority(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a.example", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        [(status, _, _)] = exchange(sock, b"GET http://A.example:80/p HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert status == 200 and seen[0]["target"] == "http://A.example:80/p"


def test_backend_errors_map_to_404_503_502(hosts, twin, proxies, backends):
    (hosts / "refused").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(hosts / "refused" / "http-socket"))
    sock.close()  # a socket file nobody listens on: ECONNREFUSED
    (hosts / "notdir").write_text("")
    (hosts / "loop").mkdir()
    os.symlink("http-socket", hosts / "loop" / "http-socket")  # ELOOP: no backend
    backends(hosts, "closes", scripted(b"", then_close=True))
    backends(hosts, "garbage", scripted(b"NOT HTTP\r\n\r\n"))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as conn:
        answers = [exchange(conn, get(name))[0] for name in ("absent", "notdir", "refused", "loop")]
    assert [status for status, _, _ in answers] == [404, 404, 503, 404]
    assert all(headers["content-type"] == "text/plain" for _, headers, _ in answers)
    for name in ("closes", "garbage"):
        with proxy.connect() as conn:
            [(status, headers, _)] = exchange(conn, get(name), 2)
            assert (status, headers["connection"]) == (502, "close")
    proxy.expect("absent: absent/http-socket: ENOENT: no entry for this name")


def test_send_proxy_v1(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a", echo(seen, proxy_line=True))
    (hosts / "a" / "send-proxy-v1").write_text("")
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        exchange(sock, get("a") + get("a"), 2)
        port = sock.getsockname()[1]
    assert seen[0]["proxy"] == f"PROXY TCP4 127.0.0.1 127.0.0.1 {port} {proxy.port}\r\n"


@pytest.mark.parametrize(
    "answer, count",
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", 1),
        (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", 1),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            3,
        ),
    ],
)
def test_bodiless_and_informational_answers_byte_for_byte(hosts, twin, proxies, backends, answer, count):
    backends(hosts, "a", scripted(answer))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        for _ in range(2):  # the connection stays usable
            sock.sendall(get("a"))
            assert recv_exactly(sock, len(answer)) == answer


def test_head_answer_ends_at_its_head(hosts, twin, proxies, backends):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    backends(hosts, "a", scripted(answer))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        for _ in range(2):
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert recv_exactly(sock, len(answer)) == answer


def test_close_delimited_body_ends_at_eof(hosts, twin, proxies, backends):
    answer = b"HTTP/1.0 200 OK\r\n\r\n" + b"body without length" * 1000
    backends(hosts, "a", scripted(answer, then_close=True))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a"))
        got = recv_until_eof(sock)
    assert got == answer


def test_backend_connection_close_ends_client_connection(hosts, twin, proxies, backends):
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    backends(hosts, "a", scripted(answer))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a") + get("a"))
        got = recv_until_eof(sock)
    assert got == answer


def test_slowloris_head_is_cut_after_10_s_however_it_trickles(hosts, twin, proxies, backends):
    """The head deadline runs from the end of the previous answer, not from the last byte:
    a client dribbling a head (a byte every 0.4 s) is closed 10 s after its answer."""
    backends(hosts, "a", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect(timeout=20) as sock:
        [(status, _, _)] = exchange(sock, get("a"))
        answered = time.monotonic()
        assert status == 200
        sock.settimeout(0.4)
        closed_after = None
        for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Dribble: " + b"x" * 60:  # 0.4 s a byte: 31 s at most
            try:
                sock.send(bytes([byte]))
                if sock.recv(100) == b"":
                    closed_after = time.monotonic() - answered
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed_after = time.monotonic() - answered
                break
        assert closed_after is not None and 9.5 < closed_after < 12, closed_after
    proxy.expect("no complete request head within 10 s")


def test_chunked_upload_is_forwarded(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    body = b"hello chunked world"
    request = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" + (
        b"e\r\n chunked world\r\n0\r\n\r\n"
    )
    with proxy.connect() as sock:
        [(status, _, _)] = exchange(sock, request)
    assert status == 200 and seen[0]["sha256"] == hashlib.sha256(body).hexdigest()


def test_sighup_drains_request_in_flight(hosts, twin, proxies, backends):
    arrived, answer = threading.Event(), threading.Event()

    def slow(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        arrived.set()
        answer.wait(10)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    backends(hosts, "a", slow)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a", extra="Connection: close\r\n"))
        assert arrived.wait(10)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.expect("draining 1 connections")
        answer.set()
        [(status, _, body)] = exchange(sock, b"")
    assert (status, body) == (200, b"slow")
    assert proxy.process.wait(timeout=10) == 0


def test_sighup_closes_idle_keepalive_connections_at_once(hosts, twin, proxies, backends):
    backends(hosts, "a", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect(timeout=5) as idle, proxy.connect(timeout=5) as busy:
        [(status, _, _)] = exchange(idle, get("a"))  # answered; the connection stays open
        assert status == 200
        busy.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # a head not complete yet
        proxy.process.send_signal(signal.SIGHUP)
        proxy.expect("draining 2 connections")
        assert idle.recv(1) == b""  # closed by the drain, well before its 10 s
        [(status, _, _)] = exchange(busy, b"\r\n")  # the request in progress is answered
        assert status == 200
        assert busy.recv(1) == b""  # then that connection closes too
    assert proxy.process.wait(timeout=5) == 0


def test_version_and_help(twin):
    out = subprocess.run(
        [sys.executable, "-m", "fasthttpdir", "--version"], env=twin.env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("fasthttpdir ") and f"({twin.name})" in out.stdout


def test_refused_upgrade_continues_as_http(hosts, twin, proxies, backends):
    seen: list = []
    backends(hosts, "a", echo(seen))
    proxy = proxies("fasthttpdir", hosts, twin)
    upgrade = get("a", "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n")
    with proxy.connect() as sock:
        responses = exchange(sock, upgrade + get("a", "/after"), 2)
    assert [status for status, _, _ in responses] == [200, 200]
    assert [r["target"] for r in seen] == ["/ws", "/after"]


def test_raw_relay_after_101(hosts, twin, proxies, backends):
    def handle(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nhello ")
        while data := conn.recv(65536):
            conn.sendall(data.upper())

    backends(hosts, "a", handle)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a", "/", "Upgrade: x\r\nConnection: Upgrade\r\n") + b"early bytes ")
        got = b""
        while not got.endswith(b"EARLY BYTES "):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        assert got.endswith(b"\r\n\r\nhello EARLY BYTES ")
        sock.sendall(b"raw not http\r\n\r\n")
        got = b""
        while len(got) < 16:
            got += sock.recv(65536)
        assert got == b"RAW NOT HTTP\r\n\r\n"


def test_expect_100_continue(hosts, twin, proxies, backends):
    def handle(conn: socket.socket) -> None:
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not buffer.endswith(b"body"):
            buffer += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")

    backends(hosts, "a", handle)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        got = b""
        while not got.endswith(b"\r\n\r\n"):
            got += sock.recv(65536)
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        [(status, _, body)] = exchange(sock, b"body")
    assert (status, body) == (200, b"done")


def test_streamed_answer_flows_as_it_arrives(hosts, twin, proxies, backends):
    first_seen = threading.Event()

    def handle(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.sendall(b"7\r\ndata: 1\r\n")
        first_seen.wait(10)  # the second event only after the client saw the first
        conn.sendall(b"7\r\ndata: 2\r\n0\r\n\r\n")

    backends(hosts, "a", handle)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a", "/events"))
        got = b""
        while not got.endswith(b"data: 1\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        first_seen.set()
        while not got.endswith(b"0\r\n\r\n"):
            got += sock.recv(65536)
        [(status, _, _)] = exchange(sock, get("a", "/events"))  # still usable
    assert status == 200


def upload_and_read(sock: socket.socket, head: bytes, size: int) -> bytes:
    """Send ``head`` and ``size`` body bytes from a thread while reading until EOF here."""

    def upload() -> None:
        try:
            sock.sendall(head)
            sock.sendall(bytes(size))
        except OSError:
            pass  # the proxy stopped reading: expected once it has answered

    sender = threading.Thread(target=upload)
    sender.start()
    try:
        return recv_until_eof(sock)
    finally:
        sock.shutdown(socket.SHUT_WR)
        sender.join(20)


def test_early_answer_reaches_a_client_still_uploading(hosts, twin, proxies, backends):
    """A backend that refuses an upload at its head (413) without reading the body: the
    client, still sending, gets the whole answer and then EOF, never a reset."""
    refused = threading.Event()
    answer = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge"

    def refuse(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        conn.sendall(answer)
        refused.wait(20)  # the body stays unread

    backends(hosts, "a", refuse)
    proxy = proxies("fasthttpdir", hosts, twin)
    size = 32 << 20
    with proxy.connect() as sock:
        try:
            got = upload_and_read(
                sock, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size, size
            )
        finally:
            refused.set()
    assert got == answer


def test_error_answer_reaches_a_client_still_uploading(hosts, twin, proxies):
    proxy = proxies("fasthttpdir", hosts, twin)
    size = 32 << 20
    with proxy.connect() as sock:
        got = upload_and_read(
            sock, b"POST / HTTP/1.1\r\nHost: absent\r\nContent-Length: %d\r\n\r\n" % size, size
        )
    assert got.startswith(b"HTTP/1.1 404 Not Found\r\n") and got.endswith(b"404 Not Found\n")


def tagged(tag: bytes, ended: threading.Event | None = None, hold: tuple | None = None):
    """A keep-alive backend answering every request with ``tag``; ``ended`` is set when the
    proxy closes its connection; with ``hold`` (received, answer): each answer waits for
    ``answer`` once the request is in, which ``received`` says."""

    def handle(conn: socket.socket) -> None:
        buffer = bytearray()
        while read_request(conn, buffer) is not None:
            if hold is not None:
                hold[0].set()
                assert hold[1].wait(20)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(tag), tag))
        if ended is not None:
            ended.set()

    return handle


def switch(hosts: Path, name: str, target: str) -> None:
    """Point the entry ``name`` at ``target`` atomically, as fastsni-deploy does."""
    new = hosts / f".{name}.new"
    new.symlink_to(target)
    os.replace(new, hosts / name)


def test_idle_keepalive_backend_connection_follows_a_switch(hosts, twin, proxies, backends):
    """After a switch, a kept-alive client's idle backend connection to the previous target
    is closed within 2 x RECHECK (0.5 s), the client's own connection staying open, and its
    next request goes to the new target: nothing idle holds the old version (--drain)."""
    old_ended = threading.Event()
    backends(hosts, "_releases/v1", tagged(b"v1", old_ended))
    backends(hosts, "_releases/v2", tagged(b"v2"))
    (hosts / "a").symlink_to("_releases/v1")
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        assert [body for _, _, body in exchange(sock, get("a") * 2, 2)] == [b"v1", b"v1"]
        switch(hosts, "a", "_releases/v2")
        assert old_ended.wait(5)  # 0.5 s by design; 5 s for a loaded machine
        assert [body for _, _, body in exchange(sock, get("a") * 2, 2)] == [b"v2", b"v2"]


def test_busy_keepalive_connection_follows_a_switch(hosts, twin, proxies, backends):
    """A request that starts 2 x RECHECK (0.5 s) after a switch goes to the new target although
    the client's connection was never idle (its answer from the old one was in progress)."""
    received, answer = threading.Event(), threading.Event()
    backends(hosts, "_releases/v1", tagged(b"v1", hold=(received, answer)))
    backends(hosts, "_releases/v2", tagged(b"v2"))
    (hosts / "a").symlink_to("_releases/v1")
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a"))
        assert received.wait(10)
        switch(hosts, "a", "_releases/v2")
        time.sleep(0.6)  # the bound itself, not a race: what is asked of a request starting now
        answer.set()
        assert [body for _, _, body in exchange(sock, b"", 1)] == [b"v1"]  # begun before the switch
        assert [body for _, _, body in exchange(sock, get("a"), 1)] == [b"v2"]


def test_keepalive_backend_connection_kept_while_nothing_changes(hosts, twin, proxies, backends):
    """Without a switch, one backend connection serves every request of a kept-alive client,
    idle or not, across several rechecks."""
    backend = backends(hosts, "a", tagged(b"v1"))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        for _ in range(3):
            assert [body for _, _, body in exchange(sock, get("a"), 1)] == [b"v1"]
            time.sleep(0.6)  # idle past RECHECK: the sweep looks and keeps it
        assert backend.accepted == 1


BIG_ANSWER = 16 << 20  # far more than the socket buffers hold: still in flight as the proxy closes


def big_answer(conn: socket.socket) -> None:
    """A keep-alive backend answering each request with BIG_ANSWER bytes."""
    buffer = bytearray()
    while read_request(conn, buffer) is not None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_ANSWER)
        conn.sendall(bytes(BIG_ANSWER))


def closed_for_good(sock: socket.socket) -> bool:
    """After the proxy's EOF: whether it closed its end outright (a byte sent now draws a
    reset within 5 s) rather than lingering to read and drop what comes."""
    sock.sendall(b"x")
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    return bool(poller.poll(5000))


@pytest.mark.parametrize(
    "request_bytes",
    [
        get("a", extra="Connection: close\r\n"),
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    ],
    ids=["close", "close-with-body", "close-chunked", "http-1.0"],
)
def test_no_linger_after_a_clients_last_request(hosts, twin, proxies, backends, request_bytes):
    """A client that said "close" (or spoke HTTP/1.0 without keep-alive) and sent its whole
    request sends nothing more (RFC 9112 §9.6), so fasthttpdir closes at once, without
    waiting for the client's FIN: and the answer, 16 MiB still in flight as it closes,
    arrives whole, then EOF, never a reset."""
    backends(hosts, "a", big_answer)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(request_bytes)
        got = recv_until_eof(sock)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and len(body) == BIG_ANSWER and body.count(0) == BIG_ANSWER
        assert closed_for_good(sock)


def test_no_linger_after_its_own_answer_to_a_last_request(hosts, twin, proxies):
    """fasthttpdir's own answer (here 404) to a whole request that said "close": closed at once."""
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("absent", extra="Connection: close\r\n"))
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert closed_for_good(sock)


def test_lingers_when_the_client_may_pipeline(hosts, twin, proxies, backends):
    """The backend closes but the client did not say "close": it may have sent its next
    request already (here it has, unread by anyone), so fasthttpdir lingers: the whole
    first answer arrives, then EOF, and the client's own bytes draw no reset."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK"
    backends(hosts, "a", scripted(answer, then_close=True))
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(get("a") + get("a", "/second"))
        assert recv_until_eof(sock) == answer
        sock.sendall(b"x")  # read and dropped: no reset comes (a closed socket's would within ms)
        poller = select.poll()
        poller.register(sock, select.POLLERR)
        assert not poller.poll(1000)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""


def test_client_closing_inside_a_body_ends_the_exchange(hosts, twin, proxies, backends):
    """A body cut short by the client's EOF can never be answered: the backend connection
    is closed (not left waiting for bytes that will not come) and one line is logged."""
    backend_saw_eof = threading.Event()

    def wait_for_body(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        backend_saw_eof.set()

    backends(hosts, "a", wait_for_body)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    assert backend_saw_eof.wait(10)
    proxy.expect("a: client closed inside a request body")


def test_a_client_that_resets_at_once_keeps_its_address(hosts, twin, proxies):
    """Its request is still read and answered, and its line names it by the address
    accept returned, although it reset before it was even accepted."""
    proxy = proxies("fasthttpdir", hosts, twin)
    port = proxy.reset_before_accept(get("absent"))
    line = proxy.expect("absent/http-socket: ENOENT")
    assert line.startswith(f"fasthttpdir: 127.0.0.1:{port} absent: "), line


def test_get_after_head_on_one_backend_connection(hosts, twin, proxies, backends):
    """A HEAD answer has a Content-Length but no body: the next answer on the same backend
    connection must not be taken for that body."""

    def answer(conn: socket.socket) -> None:
        buffer = bytearray()
        while (got := read_request(conn, buffer)) is not None:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
            conn.sendall(head if got[0]["method"] == "HEAD" else head + b"hello")

    backend = backends(hosts, "a", answer)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        [(status, headers, _)] = exchange(sock, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", head=True)
        assert (status, headers["content-length"]) == (200, "5")
        [(status, _, body)] = exchange(sock, get("a"))
        assert (status, body) == (200, b"hello")
    assert backend.accepted == 1


def test_own_answer_to_head_has_no_body(hosts, twin, proxies, backends):
    """RFC 9110 §9.3.2: a 404 to HEAD carries Content-Length but no body, so the answer to
    the next request on the connection is read as itself."""
    backends(hosts, "a", echo())
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 404 ") and b"Content-Length: 14\r\n" in head
        [(status, _, body)] = exchange(sock, get("a", "/next"))
    assert status == 200 and json.loads(body)["target"] == "/next"
