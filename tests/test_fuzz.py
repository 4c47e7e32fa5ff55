"""The fuzz harnesses of tests/fuzz/ in the default run: every committed seed and
regression input replayed on both twins, then a bounded coverage-guided run of each.

The bounded runs need atheris (the `test` extras install it where PyPI has a wheel) and
skip without it; the replays need only the compiled twins.  Longer runs:
``python3 tests/fuzz/run.py`` (see its docstring).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from backends import UnixBackend, recv_exactly
from conftest import REQUIRE_COMPILED

FUZZ = Path(__file__).resolve().parent / "fuzz"
HARNESSES = ("hello", "request", "response")
# Executions per harness in the default run, about a minute for all three on a loaded
# 2-core machine (hello feeds both twins byte by byte, request pads heads past 64 KiB,
# response runs real connections); each run is also capped in time, so a slower machine
# runs fewer rather than hitting the test timeout.
RUNS = {"hello": 12000, "request": 20000, "response": 8000}
SECONDS_AT_MOST = 75


def need_compiled() -> None:
    for name in ("fastsni._tls", "fastsni._engine", "fasthttpdir._http"):
        try:
            importlib.import_module(name)
        except ImportError:
            if REQUIRE_COMPILED:
                raise
            pytest.skip(f"{name} is not built")


def harness(name: str):
    """tests/fuzz/fuzz_<name>.py as a module (its helpers import each other by name)."""
    need_compiled()
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(f"fuzz_{name}")


def inputs(name: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / name).iterdir()) + sorted((FUZZ / "regressions" / name).glob("*"))


@pytest.mark.parametrize("name", HARNESSES)
def test_seeds_and_regressions_replay(name):
    module = harness(name)
    for path in inputs(name):
        module.test_one_input(path.read_bytes())


@pytest.mark.parametrize("name", HARNESSES)
def test_bounded_fuzz_run(name, tmp_path):
    pytest.importorskip("atheris")
    need_compiled()
    spec = importlib.util.spec_from_file_location("fuzz_runner", FUZZ / "run.py")
    runner = sys.modules["fuzz_runner"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    result = runner.run(name, tmp_path, runs=RUNS[name], seconds=SECONDS_AT_MOST, seed=1)
    print(result.summary())
    assert result.returncode == 0, result.output[-4000:]
    assert result.executions >= RUNS[name] // 10, result.summary()
    assert result.cov > 0 and result.corpus > 0, result.summary()


# --- what the harnesses turned up -------------------------------------------------------


def test_upgrade_request_with_a_body_reaches_a_backend_that_ignores_upgrade(hosts, twin, proxies):
    """curl --http2 over http:// sends ``Upgrade: h2c`` on a POST with its body; a backend
    without h2c answers it as HTTP/1.1 once it has read the body (RFC 9113 §3.2 / RFC 7540
    §3.2: the body is sent in full before the switch)."""

    def handle(conn: socket.socket) -> None:
        head = bytearray()
        while not head.endswith(b"\r\n\r\n"):
            byte = conn.recv(1)
            if not byte:
                return
            head += byte
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", bytes(head)).group(1))
        body = recv_exactly(conn, length)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    backend = UnixBackend(hosts / "a.example" / "http-socket", handle)
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "3", "--http2", "-d", "hello", "--resolve",
             f"a.example:{proxy.port}:127.0.0.1", f"http://a.example:{proxy.port}/"],
            capture_output=True, timeout=30,
        )  # fmt: skip
    finally:
        backend.close()
    assert (done.returncode, done.stdout) == (0, b"hello"), done.stderr


UPGRADE_WITH_BODIES = (
    b"POST /a HTTP/1.1\r\nHost: a.example\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Content-Length: 5\r\n\r\nhello"
    b"POST /b HTTP/1.1\r\nHost: a.example\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    b"GET /c HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
    b"Content-Length: 0\r\n\r\n"
    b"raw"
)


def test_upgrade_requests_with_a_body_are_framed_without_their_upgrade(twin):
    """An upgrade request with a body (Content-Length or chunked) goes on as a plain
    request without its Upgrade field, body included, and the next request is parsed;
    one without a body (Content-Length: 0 too) still waits for its answer as an upgrade."""
    proxy = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    first, second, third = proxy.frame(UPGRADE_WITH_BODIES, "192.0.2.1")
    assert first == (
        "a.example", 0,
        b"POST /a HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\nContent-Length: 5\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\n\r\nhello",
        True, True, False,
    )  # fmt: skip
    assert second == (
        "a.example", 0,
        b"POST /b HTTP/1.1\r\nHost: a.example\r\nConnection: upgrade\r\nTransfer-Encoding: chunked\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        True, True, False,
    )  # fmt: skip
    assert third[3:] == (True, True, True)
    assert third[2].startswith(b"GET /c HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket")


SPOOFING_TRAILERS = (
    b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nx-forwarded-host: evil.example\r\n"
    b"X-Forwarded-Proto: https\r\nChecksum: 1\r\n\r\n"
)
CHUNKED = b"POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
CHUNKED_FORWARDED = (
    b"POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n"
    b"3\r\nabc\r\n0\r\nChecksum: 1\r\n\r\n"
)


def test_trailers_cannot_carry_forwarded_headers(twin):
    """fuzz_request found it (regressions/request/trailer-x-forwarded): the client's
    X-Forwarded-*/Forwarded fields reached the backend in a chunked body's trailer section,
    where a backend that merges trailers into the head (RFC 9110 §6.5.1 lets a field's
    definition allow it) would take them for the proxy's."""
    proxy = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    [(name, status, data, complete, _, _)] = proxy.frame(CHUNKED + SPOOFING_TRAILERS, "192.0.2.1")
    assert (name, status, complete) == ("a.example", 0, True)
    assert data == CHUNKED_FORWARDED


def test_a_version_is_read_only_from_a_request_line_that_begins_the_read(twin):
    """fuzz_request found it (regressions/request/version-of-a-head-begun-in-an-earlier-read):
    a request that begins after another in one read and ends in the next was given the
    version at the end of the next read's first line (RequestReader.version), so a head
    that llhttp reads as HTTP/0.9 went on as HTTP/1.1; split or whole, it is refused."""
    proxy = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    pieces = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b\r\nHost: a\r\n", b"X: y HTTP/1.1\r\n\r\n"]
    for reads in (pieces, [b"".join(pieces)]):
        reader = proxy.RequestReader("192.0.2.1")
        for data in reads:
            reader.feed(data)
        first, second = reader.requests
        assert first.name == "a" and first.error is None
        assert (second.name, second.error.status, second.error.reason) == (None, 400, "HTTP/0.9")


def test_a_version_is_read_only_from_a_request_line_of_the_usual_shape(twin):
    """fuzz_request found it (regressions/request/connect-with-the-version-as-its-target):
    in "CONNECT  HTTP/1.1" llhttp reads "HTTP/1.1" as the target and no version (0.9),
    but the line's end made it 1.1 when the head came in one read (405), not in pieces
    (400).  Only a line ``method SP target SP HTTP/1.x`` is read without llhttp now."""
    proxy = twin.module("fasthttpdir.proxy", "fasthttpdir._http")
    data = b"CONNECT  HTTP/1.1\r\nHost: a\r\n\r\n"
    for size in (len(data), 1):
        reader = proxy.RequestReader("192.0.2.1")
        for at in range(0, len(data), size):
            reader.feed(data[at : at + size])
        [request] = reader.requests
        assert (request.error.status, request.error.reason) == (400, "HTTP/0.9")


def test_trailers_cannot_carry_forwarded_headers_end_to_end(hosts, twin, proxies):
    got = bytearray()

    def handle(conn: socket.socket) -> None:
        while not got.endswith(b"Checksum: 1\r\n\r\n") and (data := conn.recv(65536)):
            got.extend(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = UnixBackend(hosts / "a.example" / "http-socket", handle)
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect() as sock:
            sock.sendall(CHUNKED + SPOOFING_TRAILERS)
            answer = b""
            while not answer.endswith(b"ok"):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
    finally:
        backend.close()
    assert bytes(got) == CHUNKED_FORWARDED.replace(b"192.0.2.1", b"127.0.0.1")
