"""SIGUSR1 writes one counters line: what a proxy accepted, routed, refused and relayed."""

from __future__ import annotations

import signal
import time

from backends import client_hello, recv_exactly, recv_until_eof

DOWNLOAD = 4 << 20  # enough for the relay to splice an upload of that size (downloads are copied)


def counters(proxy, open_wanted: int = 0) -> dict[str, str]:
    """Ask for the counters line (again, within a bound, until ``open`` is as wanted)."""
    deadline = time.monotonic() + 10
    while True:
        proxy.process.send_signal(signal.SIGUSR1)
        line = proxy.expect(f"{proxy.program}: counters ")
        fields = dict(field.split("=", 1) for field in line.split(" counters ", 1)[1].split())
        if int(fields["open"]) == open_wanted or time.monotonic() > deadline:
            return fields
        time.sleep(0.05)


def test_fastsni_counters(twin, hosts, proxies, backends):
    name = "count.test"
    hello = client_hello(name)

    def handle(conn):
        recv_exactly(conn, len(hello))
        size = int(recv_exactly(conn, 8))
        assert recv_exactly(conn, size) == b"u" * size
        conn.sendall(b"d" * size)

    backends(hosts / name / "tls-socket", handle)
    proxy = proxies("fastsni", hosts, twin)
    for size in (10, DOWNLOAD):
        with proxy.connect() as sock:
            sock.sendall(hello + b"%08d" % size + b"u" * size)
            assert recv_until_eof(sock) == b"d" * size
    for payload in (b"GET / HTTP/1.1\r\n\r\n", client_hello("nobody.test")):
        with proxy.connect() as sock:
            sock.sendall(payload)
            assert len(recv_until_eof(sock)) == 7  # one alert
    with proxy.connect() as sock:
        sock.sendall(hello[:10])  # then closes before naming a host
    fields = counters(proxy)
    assert int(fields["pid"]) == proxy.process.pid and fields["uptime"].endswith("s")
    assert (fields["accepted"], fields["open"]) == ("5", "0")
    assert (fields["routed"], fields["closed_early"]) == ("2", "1")
    assert (fields["alert_10"], fields["alert_112"]) == ("1", "1")
    assert int(fields["bytes_up"]) == 2 * (len(hello) + 8) + 10 + DOWNLOAD
    assert int(fields["bytes_down"]) == 10 + DOWNLOAD
    # splice(2) towards the backend only: from it (AF_UNIX) the relay copies (SPLICE_DOWN)
    assert 0 < int(fields["bytes_up_spliced"]) <= DOWNLOAD and fields["bytes_down_spliced"] == "0"


def test_fasthttpdir_counters(twin, hosts, proxies, backends):
    seen = bytearray()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    def handle(conn):
        buffer = b""
        while chunk := conn.recv(65536):
            seen.extend(chunk)
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                conn.sendall(answer)

    backends(hosts / "a.test" / "http-socket", handle)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert recv_exactly(sock, len(answer)) == answer
        sock.sendall(b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
        assert recv_exactly(sock, 12) == b"HTTP/1.1 404"
    with proxy.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n")
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 400")
    fields = counters(proxy, open_wanted=0)
    assert (fields["accepted"], fields["open"], fields["routed"]) == ("2", "0", "2")
    assert (fields["status_400"], fields["status_404"]) == ("1", "1")
    assert int(fields["bytes_up"]) == len(seen) and int(fields["bytes_down"]) == 2 * len(answer)
    assert fields["bytes_up_spliced"] == fields["bytes_down_spliced"] == "0"
