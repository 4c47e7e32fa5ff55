#!/usr/bin/env python3
"""Fuzz fasthttpdir's request framing and host extraction: fasthttpdir.proxy (pure)
against fasthttpdir._http (compiled).

Input: a split pattern for the client's reads (see fuzzing.py), then one flags byte,
then the payload.  Flags bit 0 chooses the client address (IPv4 or IPv6); bit 5 pads the
first head past 64 KiB (two 32 KiB fields after its first two line ends); bit 6 set
fuzzes ``host_name`` alone (the payload's lines: Host values, the last one the target).
Otherwise the payload is what a client sends, fed to a RequestReader of each twin read
by read, as HttpConnection.client_data feeds it (after an upgrade request the rest is
held, after a rejection nothing more is read).  Checked:

- the twins agree exactly: every request's name, status, reason, bytes for the backend,
  completeness, keep-alive and upgrade flags, and the bytes held;
- statuses are the documented ones (400, 405, 431), reasons printable ASCII, names valid;
- what goes to a backend is one request and nothing more when parsed again (no
  smuggling), carries none of the client's X-Forwarded-*/Forwarded headers and exactly
  one X-Forwarded-For, ours; no field name with "_"; no trailer that frames, routes or
  is hop-by-hop; no Transfer-Encoding in HTTP/1.0;
- the reads do not matter: the same bytes in one read frame the same requests and
  bodies (unless a head went over 64 KiB, which is counted read by read);
- ``frame(payload)`` is the one-read result.

    python3 tests/fuzz/fuzz_request.py -runs=1000000 /tmp/fuzz-request tests/fuzz/corpus/request
"""

from __future__ import annotations

import httptools
from fuzzing import cut, main, printable, split_pattern, twins

pure, compiled = twins("fasthttpdir.proxy", "fasthttpdir._http", __name__ == "__main__")
STATUSES = {400, 405, 431}
IPS = ("192.0.2.1", "2001:db8::1")


def run(module, pieces: list[bytes], ip: str) -> tuple:
    """Feed ``pieces`` as the connection does; the requests framed and the bytes held."""
    reader = module.RequestReader(ip)
    upgraded = False
    for piece in pieces:
        if upgraded:
            reader.held += piece  # HttpConnection.client_data while upgrade_wait
            continue
        reader.feed(piece)
        if reader.requests and reader.requests[-1].upgrade:
            upgraded = True
        if reader.rejected is not None:
            break  # HttpConnection.wants_client: nothing more is read
    requests = tuple(
        (
            r.name,
            r.error.status if r.error else 0,
            r.error.reason if r.error else "",
            b"".join(r.data),
            r.complete,
            r.keep_alive,
            r.upgrade,
            r.method,
            r.target,
        )
        for r in reader.requests
    )
    return requests, bytes(reader.held)


class Backend:
    """What a backend parsing the forwarded bytes sees (httptools callbacks)."""

    def __init__(self) -> None:
        self.begun = 0
        self.completed = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[bytes] = []
        self.in_head = True
        self.body = b""

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        if not self.in_head:
            self.trailers.append(name)

    def on_headers_complete(self) -> None:
        self.in_head = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.completed += 1


def backend_view(data: bytes, method: bytes) -> tuple:
    """Parse what one request sends its backend: it must be exactly one request."""
    backend = Backend()
    parser = httptools.HttpRequestParser(backend)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as upgrade:
        assert int(upgrade.args[0]) == len(data), "bytes after an upgrade request went to the backend"
    assert backend.begun == 1, ("the backend would see another request", data)
    assert parser.get_method() == method
    names = [field for field, _ in backend.headers]
    assert not any(b"_" in field for field in names), ("a field name with '_' reached the backend", data)
    assert all(pure.kept_in_trailers(name) for name in backend.trailers), ("a routing trailer", data)
    if parser.get_http_version() == "1.0":
        assert b"transfer-encoding" not in names, ("Transfer-Encoding in HTTP/1.0", data)
    return backend.url, tuple(backend.headers), backend.body, backend.completed


def check(requests: tuple, ip: str) -> list:
    """The properties of one run; returns each request's backend view (for comparing reads)."""
    views = []
    for name, status, reason, data, complete, _keep_alive, upgrade, method, target in requests:
        if status:
            assert status in STATUSES, status
            assert printable(reason), reason
            assert name is None and data == b"" or status == 400, (status, name, data)
            views.append((status,))
            continue
        assert pure.check_hostname(name.encode()) == name, name
        url, headers, body, completed = backend_view(data, method)
        assert url == target
        assert completed == (1 if complete else 0), (completed, complete, data)
        lengths = [value for field, value in headers if field == b"content-length"]
        if complete and lengths and not upgrade:  # (an upgrade request's body: see test_fuzz.py)
            assert len(body) == int(lengths[0]), ("a body cut short", data)
        added = [value for field, value in headers if field in pure.DROPPED]
        assert added == [ip.encode()], ("X-Forwarded headers reach the backend", headers)
        views.append((name, method, url, headers, body, complete))
    return views


def host_outcome(module, hosts: list[bytes], target: bytes):
    try:
        return module.host_name(hosts, target)
    except module.Rejected as rejection:
        return (rejection.status, rejection.reason)


def check_host_name(payload: bytes) -> None:
    *hosts, target = payload.split(b"\n")
    expected = host_outcome(pure, hosts, target)
    assert host_outcome(compiled, hosts, target) == expected, (hosts, target)
    if isinstance(expected, str):
        assert pure.check_hostname(expected.encode()) == expected
    else:
        assert expected[0] == 400 and printable(expected[1]), expected


def test_one_input(data: bytes) -> None:
    sizes, rest = split_pattern(data)
    flags, payload = (rest[0], rest[1:]) if rest else (0, b"")
    if flags & 0x40:
        check_host_name(payload)
        return
    ip = IPS[flags & 1]
    if flags & 0x20:  # a first head over 64 KiB, which 4 KiB inputs cannot be
        payload = payload.replace(b"\r\n", b"\r\nX-Pad: " + b"p" * (pure.MAX_HEAD // 2), 2)
    pieces = cut(payload, sizes)
    expected = run(pure, pieces, ip)
    assert run(compiled, pieces, ip) == expected
    views = check(expected[0], ip)
    whole = run(pure, [payload], ip)
    assert run(compiled, [payload], ip) == whole
    assert pure.frame(payload, ip) == compiled.frame(payload, ip) == [r[:2] + r[3:7] for r in whole[0]]
    if any(status == 431 for _, status, *_ in expected[0] + whole[0]):
        return  # a head's size is counted read by read
    assert check(whole[0], ip) == views, "the same bytes framed differently in other reads"
    assert whole[1] == expected[1], "held bytes depend on the reads"


if __name__ == "__main__":
    main(test_one_input)
