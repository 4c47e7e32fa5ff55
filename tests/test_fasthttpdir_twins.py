"""fasthttpdir's twins agree: request framing and host extraction, pure vs compiled (hypothesis)."""

from __future__ import annotations

import importlib
import re

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pure = importlib.import_module("fasthttpdir.proxy")

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET http://a.example:8080/x HTTP/1.1\r\nHost: A.example.\r\nX-Forwarded-For: 1\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.0\r\nHost: c\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: w\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    # an upgrade request with a body is parsed again without its Upgrade field (parse_again)
    b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\nabc"
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    # issue 21: Transfer-Encoding in HTTP/1.0 (400), trailers that route or frame, "_" in names
    b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\nHost: e\r\nTE: x\r\nA_b: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer_Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
]


def compiled():
    try:
        return importlib.import_module("fasthttpdir._http")
    except ImportError:
        pytest.skip("fasthttpdir._http is not built")


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(b" \t\r\n:.,;-0aZ\x00\x7f\xff[]/@"))
        if action == "insert":
            data[where:where] = bytes([byte])
        elif data and where < len(data):
            if action == "delete":
                del data[where]
            else:
                data[where] = byte
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=200)))
def test_framing_agrees(data):
    assert pure.frame(data) == compiled().frame(data)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=30), st.from_regex(rb"\A[A-Za-z0-9.\-:\[\]]{0,20}\Z")), max_size=2),
    st.one_of(st.just(b"/"), st.binary(max_size=30), st.from_regex(rb"\Ahttps?://[a-z.:0-9@]{0,20}/?\Z")),
)
def test_host_name_agrees(hosts, target):
    def outcome(module):
        try:
            return module.host_name(hosts, target)
        except module.Rejected as rejection:
            return (rejection.status, rejection.reason)

    assert outcome(pure) == outcome(compiled())


@pytest.mark.parametrize(
    "hosts, target, expected",
    [
        ([b"A.Example."], b"/", "a.example"),
        ([b"a.example:8080"], b"/", "a.example"),
        ([b"1.2.3.4"], b"/", "1.2.3.4"),
        ([b"a"], b"http://A:1/x", "a"),
        ([b"a"], b"*", "a"),
        ([b"[::1]"], b"/", 400),
        ([b"a:"], b"/", 400),
        ([b"a.."], b"/", 400),
        ([b"a"], b"http://b/", 400),
        ([b"a"], b"http://u@a/", 400),
        ([], b"/", 400),
        ([b"a", b"a"], b"/", 400),
    ],
)
def test_host_name_table(twin, hosts, target, expected):
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    try:
        got = module.host_name(hosts, target)
    except module.Rejected as rejection:
        got = rejection.status
    assert got == expected


def test_remembered_host_names_change_nothing(twin):
    """host_name remembers what a Host value gives; the target is still checked each time,
    a failing value is never remembered, and the memory stays bounded."""
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    for _ in range(2):
        assert module.host_name([b"Remembered.example:80 "], b"/") == "remembered.example"
        with pytest.raises(module.Rejected, match="disagree"):
            module.host_name([b"Remembered.example:80 "], b"http://other.example/")
        with pytest.raises(module.Rejected, match="invalid host name"):
            module.host_name([b"bad..example"], b"/")
    padded = b"padded.example" + b" " * 1000  # over REMEMBERED_VALUE: worked out every time
    assert module.host_name([padded], b"/") == "padded.example"
    for number in range(3 * pure.REMEMBERED_NAMES):
        assert module.host_name([b"h%d.example" % number], b"/") == f"h{number}.example"
    if twin.name == "pure":
        assert len(pure._names) <= pure.REMEMBERED_NAMES
        assert padded not in pure._names


def framed_in_pieces(module, data: bytes, size: int) -> list[tuple]:
    """module.frame(data), but fed ``size`` bytes at a time as a slow client sends them,
    until a rejection or an upgrade ends the parsing."""
    reader = module.RequestReader("192.0.2.1")
    for at in range(0, len(data), size):
        reader.feed(data[at : at + size])
        if reader.rejected or any(r.upgrade for r in reader.requests):
            break
    return [
        (r.name, r.error.status if r.error else 0, b"".join(r.data), r.complete, r.keep_alive, r.upgrade)
        for r in reader.requests
    ]


VERSIONS = {
    "1.1": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "1.0": b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    "2.0": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "1.2": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "0.9": b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    "lower-case": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "leading-crlf": b"\r\nGET / HTTP/1.0\r\nHost: a\r\n\r\n",
    "bare-lf-line": b"GET / HTTP/1.1\nX: HTTP/1.0\r\nHost: a\r\n\r\n",
    "pipelined-1.1-1.0": b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.0\r\nHost: b\r\n\r\n",
    "pipelined-1.0-1.1": b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: b\r\n\r\n",
    "body-then-1.0": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    b"GET / HTTP/1.0\r\nHost: b\r\n\r\n",
    "te-in-1.0": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", VERSIONS)
def test_version_from_the_request_line_is_llhttps(twin, case):
    """A request's version is read from its request line when the bytes being parsed begin
    with it (RequestReader.version), else asked of httptools: fed a byte at a time, every
    head takes the second way, and the framing must not differ."""
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    data = VERSIONS[case]
    whole = module.frame(data)
    assert whole == framed_in_pieces(module, data, 1)
    one_zero = b"GET / HTTP/1.0\r\n"
    routed = {"1.1": b"GET / HTTP/1.1\r\n", "1.0": one_zero, "leading-crlf": one_zero}
    if case in routed:
        assert whole[0][1] == 0 and whole[0][2].startswith(routed[case])
    if case == "pipelined-1.1-1.0":
        assert [r[2][:14] for r in whole] == [b"GET / HTTP/1.1", b"GET / HTTP/1.0"]
    if case in ("2.0", "1.2", "te-in-1.0"):
        assert whole[-1][1] == 400


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.sampled_from(["pure", "compiled"]))
def test_framing_in_pieces_agrees(data, which):
    """The first request's outcome and head (a chunked body is framed again piece by
    piece) are the same whether its head arrives whole or a byte at a time."""
    module = pure if which == "pure" else compiled()

    def first(requests):
        return [(r[0], r[1], r[2].split(b"\r\n\r\n")[0], r[4], r[5]) for r in requests[:1]]

    assert first(module.frame(data)) == first(framed_in_pieces(module, data, 1))


# --- simple requests: framed without llhttp, exactly as llhttp frames them ---------------

NAMES = [
    b"Host",
    b"host",
    b"HOST",
    b"Connection",
    b"Proxy-Connection",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Upgrade",
    b"X-Forwarded-For",
    b"Forwarded",
    b"X-Forwarded-Proto",
    b"User-Agent",
    b"Accept",
    b"X_Y",
    b"X-Y",
    b"K",
    b"Hos",
    b"Hostt",
    b"Keep-Alive",
    b"A b",
    b"",
]
VALUES = [
    b"a.example",
    b"A.Example.:80",
    b"a..b",
    b"close",
    b"Close",
    b"keep-alive",
    b"KEEP-ALIVE",
    b"upgrade",
    b"close, te",
    b"closed",
    b"0",
    b"3",
    b"chunked",
    b"",
    b"x y\tz",
    b"v ",
    b"\xff",
    b"a\x00b",
    b"a\rb",
    b"a\nb",
    b"1.2.3.4",
    b"websocket",
]
SEPARATORS = [b": ", b":", b":  ", b":\t", b" : ", b": \t"]


BENIGN = [
    b"User-Agent: wrk",
    b"Accept: */*",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Proxy-Connection: Close",
    b"X: ",
    b"Cookie: a=b; c=d",
    b"Hostname: b",
    b"V: trailing \t",
]


def edit(draw, head: bytearray, values: list[bytes]) -> None:
    """At most two edits of ``head`` that may take it out of the simple subset (or not):
    a field from NAMES, SEPARATORS and ``values`` after its first line, or a byte
    inserted, deleted or replaced."""
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            name, separator = draw(st.sampled_from(NAMES)), draw(st.sampled_from(SEPARATORS))
            at = head.index(b"\r\n") + 2
            head[at:at] = name + separator + draw(st.sampled_from(values)) + b"\r\n"
        else:
            where = draw(st.integers(0, len(head) - 1))
            byte = draw(st.sampled_from(b" \t\r\n:_-/0129aAZ\x00\x7f\x80\xff"))
            action = draw(st.sampled_from(["insert", "delete", "replace"]))
            if action == "insert":
                head[where:where] = bytes([byte])
            elif action == "delete":
                del head[where]
            else:
                head[where] = byte


@st.composite
def near_simple(draw):
    """A simple head, then at most two edits that may take it out of the subset (or not):
    a field from NAMES, SEPARATORS and VALUES, or a byte inserted, deleted or replaced."""
    method = draw(st.sampled_from([b"GET", b"HEAD"]))
    target = draw(st.sampled_from([b"/", b"/a?b=c#d", b"/%7e~!$&'()*+,;=:@"]))
    host = draw(st.sampled_from([b"Host: a.example", b"host: A.Example.:80", b"HOST: 1.2.3.4"]))
    lines = [method + b" " + target + b" HTTP/1.1", host]
    lines[1:1] = draw(st.lists(st.sampled_from(BENIGN), max_size=3))
    head = bytearray(b"\r\n".join(lines) + b"\r\n\r\n")
    edit(draw, head, VALUES)
    tail = draw(st.sampled_from([b"", b"", b"\r\n", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", b"abc"]))
    return bytes(head), tail


def reader_state(module, pieces, parser):
    """Every field of every request, and the reader's own state, after ``pieces`` (with
    llhttp from the start if ``parser``)."""
    reader = module.RequestReader("192.0.2.1")
    if parser:
        reader.start_parser()
    for piece in pieces:
        reader.feed(piece)
        if reader.rejected or any(r.upgrade for r in reader.requests):
            break
    requests = [
        (
            r.name,
            r.method,
            r.target,
            r.error and (r.error.status, r.error.reason),
            b"".join(r.data),
            r.size,
            r.replay,
            r.complete,
            r.keep_alive,
            r.upgrade,
            r.chunked,
            r.has_body,
        )
        for r in reader.requests
    ]
    return requests, reader.held, reader.in_head, reader.head_size, reader.current is None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_simple(), st.booleans(), st.sampled_from(["pure", "compiled"]))
def test_simple_requests_are_framed_as_llhttp_frames_them(case, apart, which):
    """A head in the simple subset (or near it), alone or followed by more, in one read or
    two: the same requests, bytes and state whether llhttp reads every request or only
    those that are not simple."""
    module = pure if which == "pure" else compiled()
    head, tail = case
    pieces = [head, tail] if apart else [head + tail]
    assert reader_state(module, pieces, False) == reader_state(module, pieces, True)


SIMPLE = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"HEAD /x?y#z HTTP/1.1\r\nhost: A.Example.:8080\r\nUser-Agent: curl/8\r\nAccept: */*\r\nX: \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Keep-Alive\r\nProxy-Connection: close\r\n\r\n",
]
NOT_SIMPLE = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",  # pipelined
    b"GET / HTTP/1.1\r\nHost: a.example\r\n",  # not whole
    b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n",
    b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nA_b: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close, te\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a..example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nX: \xe9\r\n\r\n",
]


@pytest.mark.parametrize("data", SIMPLE + NOT_SIMPLE)
def test_which_requests_are_simple(twin, data):
    """The subset is what the pure twin says; outside it llhttp frames the request."""
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    reader = module.RequestReader("192.0.2.1")
    reader.feed(data)
    assert (reader.parser is None) == (data in SIMPLE)
    assert reader_state(module, [data], False) == reader_state(module, [data], True)


def test_a_request_after_a_simple_close_is_refused(twin):
    """llhttp refuses what follows a request that said "close" (RFC 9112 §9.6); so does a
    reader that framed that request without it."""
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    reader = module.RequestReader("192.0.2.1")
    reader.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    assert reader.parser is None and [r.keep_alive for r in reader.requests] == [False]
    reader.feed(b"GET /second HTTP/1.1\r\nHost: a.example\r\n\r\n")
    first, second = reader.requests
    assert first.name == "a.example" and second.error.status == 400
    assert "Connection: close" in second.error.reason


@st.composite
def near_simple_answers(draw):
    """A simple answer, then at most two edits (a field or a byte), then maybe more bytes."""
    status = draw(st.sampled_from([b"200 OK", b"404 Not Found", b"500 ", b"302 Found", b"599 x\ty"]))
    body = draw(st.sampled_from([b"", b"hi", b"\r\n\r\n", b"x" * 300]))
    lines = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body)]
    lines[1:1] = draw(st.lists(st.sampled_from(BENIGN + [b"Content-Type: text/plain"]), max_size=3))
    head = bytearray(b"\r\n".join(lines) + b"\r\n\r\n")
    edit(draw, head, VALUES + [b"007", b"+2", b"2 ", b"1" * 16])
    head_only = draw(st.booleans())
    tail = draw(st.sampled_from([b"", b"", b"", b"x", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]))
    return bytes(head) + (b"" if head_only else body) + tail, head_only


class Recorder:
    """httptools response callbacks, counted: what llhttp makes of an answer."""

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.begun = self.heads = self.completed = 0
        self.seen = None

    def on_message_begin(self):
        self.begun += 1

    def on_headers_complete(self):
        self.heads += 1
        self.seen = (self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_message_complete(self):
        self.completed += 1


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_simple_answers(), st.sampled_from(["pure", "compiled"]))
def test_simple_answers_are_framed_as_llhttp_frames_them(case, which):
    """Whatever simple_answer takes is one whole answer to llhttp too (just its head for
    HEAD), nothing more, with the same status and keep-alive."""
    module = pure if which == "pure" else compiled()
    data, head = case
    answer = module.simple_answer(data, head)
    assert answer == pure.simple_answer(data, head)
    if answer is None:
        return
    llhttp = Recorder()
    llhttp.parser.feed_data(data)
    assert (llhttp.begun, llhttp.heads, llhttp.seen) == (1, 1, answer)
    length = int(re.search(rb"(?i)\r\ncontent-length: (\d+)", data)[1])
    assert llhttp.completed == (1 if not head or length == 0 else 0)
    assert data.endswith(b"\r\n\r\n") if head else llhttp.completed == 1


@pytest.mark.parametrize(
    "data, head, expected",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False, (200, True)),
        (b"HTTP/1.1 404 \r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False, (404, False)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True, (200, True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True, None),  # HEAD: a body is too much
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh", False, None),  # not whole
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1", False, None),  # more
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False, None),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n", False, None),
        (b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n", False, None),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False, None),
        (b"HTTP/1.1 200 OK\r\n\r\n", False, None),  # delimited by the close
    ],
)
def test_which_answers_are_simple(twin, data, head, expected):
    module = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    assert module.simple_answer(data, head) == expected
