"""fastsni end to end: real clients, real TLS backends on Unix sockets, both twins."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from backends import (
    client_hello,
    read_proxy_line,
    recv_exactly,
    recv_until_eof,
    tls_http_backend,
)
from test_tls import extension, hello, largest_hello, padded_hello, records, sni

NAME = "app.example.test"


def alert_from(sock: socket.socket) -> bytes:
    """What fastsni answers before closing: expected to be exactly one 7-byte alert."""
    return recv_until_eof(sock)


def tls_client(ca, proxy, name: str, alpn=("h2", "http/1.1")) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(list(alpn))
    return context.wrap_socket(proxy.connect(), server_hostname=name)


def http_get(tls: ssl.SSLSocket, name: str) -> bytes:
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    return recv_until_eof(tls)


# -- real clients verify the backend's certificate through fastsni ------------------------


def test_python_ssl_verifies_and_negotiates_h2(twin, hosts, proxies, backends, ca):
    backends(hosts / NAME / "tls-socket", tls_http_backend(ca, NAME))
    proxy = proxies("fastsni", hosts, twin)
    with tls_client(ca, proxy, NAME) as tls:
        assert tls.selected_alpn_protocol() == "h2"
    with tls_client(ca, proxy, NAME, alpn=("http/1.1",)) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert b"backend app.example.test alpn http/1.1" in http_get(tls, NAME)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl(twin, hosts, proxies, backends, ca, tmp_path):
    backends(hosts / NAME / "tls-socket", tls_http_backend(ca, NAME))
    proxy = proxies("fastsni", hosts, twin)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    resolve = f"{NAME}:{proxy.port}:127.0.0.1"
    url = f"https://{NAME}:{proxy.port}/"
    result = subprocess.run(
        ["curl", "-sS", "--http1.1", "--cacert", ca_file, "--resolve", resolve, url],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"backend {NAME} alpn http/1.1\n".encode()
    # curl offers h2 by default; the backend chooses it and curl reports it.
    result = subprocess.run(
        ["curl", "-sv", "--cacert", ca_file, "--resolve", resolve, url], capture_output=True, timeout=30
    )
    assert b"ALPN: server accepted h2" in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client(twin, hosts, proxies, backends, ca, tmp_path, version):
    backends(hosts / NAME / "tls-socket", tls_http_backend(ca, NAME))
    proxy = proxies("fastsni", hosts, twin)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = subprocess.run(
        ["openssl", "s_client", version, "-connect", f"127.0.0.1:{proxy.port}", "-servername", NAME]
        + ["-CAfile", ca_file, "-verify_return_error", "-alpn", "h2", "-brief"],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert b"Verification: OK" in output, output
    assert b"ALPN protocol: h2" in output or b"Protocol version" in output, output


# -- failures: one alert, one log line ----------------------------------------------------


def test_unknown_name_gets_unrecognized_name(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(client_hello("nobody.example.test"))
        assert alert_from(sock) == bytes.fromhex("15030300020270")
    line = proxy.expect("nobody.example.test")
    assert "127.0.0.1:" in line and "ENOENT" in line


def test_python_ssl_sees_the_alert(twin, hosts, proxies, ca):
    proxy = proxies("fastsni", hosts, twin)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_client(ca, proxy, "nobody.example.test")


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 10),
        (b"\x16\x03\x01\x40\x01" + b"\x00" * 16385, 22),
        (b"\x16\x03\x01\x00\x00", 50),
        (client_hello(None), 112),
    ],
)
def test_malformed_hellos_get_their_alert(twin, hosts, proxies, payload, code):
    (hosts / "a.test").mkdir()  # an entry, so no start warning says there is none
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(payload)
        assert alert_from(sock) == bytes((0x15, 3, 3, 0, 2, 2, code))
        port = sock.getsockname()[1]
    assert proxy.stop() == 0
    proxy.expect("exiting")
    about_it = [line for line in proxy.log if f"127.0.0.1:{port} " in line]
    assert len(about_it) == 1, proxy.log  # exactly one concise line per failed connection
    # the start line, that line, the last counters line, the exit line: no tracebacks
    assert len(proxy.log) == 4 and "counters" in proxy.log[2], proxy.log


def test_connect_errors_map_to_alerts(twin, hosts, proxies):
    (hosts / "refused.test").mkdir()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(hosts / "refused.test" / "tls-socket"))
    dead.close()  # the file stays, nobody listens: ECONNREFUSED
    (hosts / "file.test").write_text("")  # ENOTDIR
    (hosts / "loop.test").mkdir()
    os.symlink("tls-socket", hosts / "loop.test" / "tls-socket")  # ELOOP: no backend either
    proxy = proxies("fastsni", hosts, twin)
    for name, code, reason in [
        ("refused.test", 112, "ECONNREFUSED"),
        ("file.test", 112, "ENOTDIR"),
        ("loop.test", 112, "ELOOP"),
    ]:
        with proxy.connect() as sock:
            sock.sendall(client_hello(name))
            assert alert_from(sock) == bytes((0x15, 3, 3, 0, 2, 2, code)), name
        assert reason in proxy.expect(name)


def test_client_closing_early_is_just_closed(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin)
    hello = client_hello(NAME)
    with proxy.connect() as sock:
        sock.sendall(hello[:20])
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(64) == b""


def test_a_client_that_resets_at_once_keeps_its_address(twin, hosts, proxies):
    """A client gone before its failure line is written (here: reset before it was even
    accepted) is shown by the address accept returned, not as one that could not be read."""
    (hosts / "a.test").mkdir()  # an entry, so no start warning says there is none
    proxy = proxies("fastsni", hosts, twin)
    port = proxy.reset_before_accept(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a ClientHello
    line = proxy.expect("before ClientHello")
    assert line == f"fastsni: 127.0.0.1:{port} -: record type 71 before ClientHello", line


def test_hello_deadline_is_user_canceled(twin, hosts, proxies):
    """The deadline runs from the first incomplete read, however the hello trickles in:
    pieces at 0, 4 and 8 s still get the alert at 10 s, not 10 s after the last piece."""
    proxy = proxies("fastsni", hosts, twin)
    hello = client_hello(NAME)
    with proxy.connect(timeout=20) as sock:
        sock.sendall(hello[:30])
        started = time.monotonic()
        for piece in (hello[30:40], hello[40:50]):
            time.sleep(4)
            sock.sendall(piece)
        assert alert_from(sock) == bytes.fromhex("1503030002025a")
        assert 9 < time.monotonic() - started < 13
    proxy.expect("no ClientHello within 10 s")


# -- routing -------------------------------------------------------------------------------


def echo_after_hello(hello_size: int, seen: list | None = None):
    """Handler: check the forwarded hello's size, then echo everything until EOF, then close."""

    def handle(conn: socket.socket) -> None:
        first = recv_exactly(conn, hello_size)
        if seen is not None:
            seen.append(first)
        while data := conn.recv(1 << 20):
            conn.sendall(data)

    return handle


def test_longest_hostname_routes(twin, hosts, proxies, backends):
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    hello = client_hello(name)
    seen: list[bytes] = []
    backends(hosts / name / "tls-socket", echo_after_hello(len(hello), seen))
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(hello + b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    assert seen == [hello]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(records(largest_hello(NAME.encode())), id="largest-legal-hello-in-16KiB-records"),
        pytest.param(records(padded_hello(30_000, NAME.encode()), [1]), id="30KB-hello-in-1-byte-records"),
    ],
)
def test_big_legal_hellos_are_routed_untouched(twin, hosts, proxies, backends, stream):
    """Legal hellos of more than 128 KiB on the wire reach the backend byte for byte."""
    seen: list[bytes] = []
    backends(hosts / NAME / "tls-socket", echo_after_hello(len(stream), seen))
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(stream + b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    assert seen == [stream]


def test_routed_once_the_name_is_known(twin, hosts, proxies, backends):
    """With the server_name in the first record, the backend is connected before the rest
    of the hello is sent, and the rest is relayed as it comes."""
    stream = records(hello(sni(NAME.encode()) + extension(21, b"\x00" * 60000)))
    first = 5 + 16384

    def handle(conn):
        recv_exactly(conn, first)
        conn.sendall(b"connected")
        rest = recv_exactly(conn, len(stream) - first)
        conn.sendall(hashlib.sha256(rest).digest())

    backends(hosts / NAME / "tls-socket", handle)
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(stream[:first])
        assert recv_exactly(sock, 9) == b"connected"
        sock.sendall(stream[first:])
        assert recv_exactly(sock, 32) == hashlib.sha256(stream[first:]).digest()


@pytest.mark.parametrize(
    "address, client_address, family",
    [
        ("127.0.0.1", "127.0.0.1", "TCP4"),
        ("::1", "::1", "TCP6"),
        ("::", "127.0.0.1", "TCP4"),  # dual-stack: IPv4-mapped addresses are written as IPv4
    ],
)
def test_proxy_v1_header(twin, hosts, proxies, backends, address, client_address, family):
    hello = client_hello(NAME)
    lines: list[bytes] = []

    def handle(conn):
        lines.append(read_proxy_line(conn))
        recv_exactly(conn, len(hello))
        conn.sendall(b"ok")

    backends(hosts / NAME / "tls-socket", handle)
    (hosts / NAME / "send-proxy-v1").write_text("")
    proxy = proxies("fastsni", hosts, twin, address=address)
    with socket.create_connection((client_address, proxy.port), timeout=10) as sock:
        sock.sendall(hello)
        assert recv_exactly(sock, 2) == b"ok"
        client_port = sock.getsockname()[1]
    ip = client_address
    expected = f"PROXY {family} {ip} {ip} {client_port} {proxy.port}\r\n".encode()
    assert lines == [expected]


def test_symlink_switch_under_load_loses_nothing(twin, hosts, proxies, backends):
    hello = client_hello(NAME)

    def answer(tag):
        def handle(conn):
            recv_exactly(conn, len(hello))
            conn.sendall(tag)

        return handle

    backends(hosts / "blue" / "tls-socket", answer(b"blue"))
    backends(hosts / "green" / "tls-socket", answer(b"green"))
    os.symlink("blue", hosts / NAME)
    proxy = proxies("fastsni", hosts, twin)
    answers: list[bytes] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load():
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                with proxy.connect() as sock:
                    sock.sendall(hello)
                    data = recv_until_eof(sock)
                    answers.append(data)
                    if data not in (b"blue", b"green"):
                        failures.append(AssertionError(data))
            except OSError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for target in ["green", "blue", "green"] * 10:
        while len(answers) < 20 and not failures:  # let some traffic through before each switch
            time.sleep(0.005)
        os.symlink(target, hosts / "next")
        os.replace(hosts / "next", hosts / NAME)  # rename(2): atomic switch
        answers_before = len(answers)
        deadline = time.monotonic() + 10
        while len(answers) < answers_before + 10 and time.monotonic() < deadline and not failures:
            time.sleep(0.005)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:3]
    assert b"blue" in answers and b"green" in answers
    assert len(answers) > 100


# -- the relay ---------------------------------------------------------------------------


def test_64_mib_each_way(twin, hosts, proxies, backends):
    size = 64 << 20
    hello = client_hello(NAME)
    received = {}

    def handle(conn):
        recv_exactly(conn, len(hello))
        digest = hashlib.sha256()

        def send():
            block = bytes(range(256)) * 4096
            for _ in range(size // len(block)):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        total = 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            total += len(data)
        received["backend"] = (total, digest.hexdigest())
        sender.join()

    backends(hosts / NAME / "tls-socket", handle)
    proxy = proxies("fastsni", hosts, twin)
    payload = os.urandom(1 << 20)
    with proxy.connect(timeout=60) as sock:
        sock.sendall(hello)

        def upload():
            for _ in range(size // len(payload)):
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        uploader = threading.Thread(target=upload)
        uploader.start()
        digest = hashlib.sha256()
        total = 0
        while data := sock.recv(1 << 20):
            digest.update(data)
            total += len(data)
        uploader.join()
    expected_down = hashlib.sha256(bytes(range(256)) * 4096 * (size // (256 * 4096))).hexdigest()
    assert (total, digest.hexdigest()) == (size, expected_down)
    assert received["backend"] == (size, hashlib.sha256(payload * (size // len(payload))).hexdigest())


def test_half_close_both_directions(twin, hosts, proxies, backends):
    hello = client_hello(NAME)
    events: list[str] = []

    def handle(conn):
        recv_exactly(conn, len(hello))
        request = b""
        while data := conn.recv(65536):  # until the client's EOF arrives as our EOF
            request += data
        events.append("backend saw EOF")
        conn.sendall(b"reply to " + request)  # the other direction still flows
        conn.shutdown(socket.SHUT_WR)

    backends(hosts / NAME / "tls-socket", handle)
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(hello + b"question")
        sock.shutdown(socket.SHUT_WR)
        data = recv_until_eof(sock)
    assert data == b"reply to question"
    assert events == ["backend saw EOF"]


def test_half_close_under_load(twin, hosts, proxies, backends):
    """Many short connections that each half-close: uvloop once crashed on write_eof() here."""
    hello = client_hello(NAME)
    backends(hosts / NAME / "tls-socket", echo_after_hello(len(hello)))
    proxy = proxies("fastsni", hosts, twin)
    failures: list[BaseException] = []
    done = []

    def load():
        for _ in range(150):
            try:
                with proxy.connect() as sock:
                    sock.sendall(hello + b"x" * 1000)
                    sock.shutdown(socket.SHUT_WR)
                    data = recv_until_eof(sock)
                    if data != b"x" * 1000:
                        failures.append(AssertionError(len(data)))
                    done.append(1)
            except OSError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:3]
    assert len(done) == 1200
    assert proxy.process.poll() is None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_stops_reading_keeps_memory_bounded(twin, hosts, proxies, backends):
    hello = client_hello(NAME)
    sent = []
    backend_blocked = threading.Event()

    def handle(conn):
        recv_exactly(conn, len(hello))
        conn.settimeout(2)
        block = b"z" * (1 << 20)
        try:
            for _ in range(512):  # up to 512 MiB if nothing pushed back
                conn.sendall(block)
                sent.append(len(block))
        except (TimeoutError, OSError):
            backend_blocked.set()

    backends(hosts / NAME / "tls-socket", handle)
    proxy = proxies("fastsni", hosts, twin)
    before = rss_kib(proxy.process.pid)
    with proxy.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(hello)
        assert backend_blocked.wait(30), "the backend was never slowed down"
        grown = rss_kib(proxy.process.pid) - before
    assert sum(sent) < 64 << 20
    assert grown < 8 * 1024, f"proxy grew {grown} KiB"


def test_sighup_drains_while_a_second_copy_serves(twin, hosts, proxies, backends):
    hello = client_hello(NAME)
    backends(hosts / NAME / "tls-socket", echo_after_hello(len(hello)))
    proxy = proxies("fastsni", hosts, twin)
    old = proxy.process
    with proxy.connect() as open_conn:
        open_conn.sendall(hello + b"before")
        assert recv_exactly(open_conn, 6) == b"before"
        new = proxy.start()  # a second copy on the same listening socket
        old.send_signal(signal.SIGHUP)
        proxy.expect("SIGHUP")
        for _ in range(20):  # new connections are served (by the new copy)
            with proxy.connect() as sock:
                sock.sendall(hello + b"new")
                assert recv_exactly(sock, 3) == b"new"
        open_conn.sendall(b"after")  # the draining copy still relays the old one
        assert recv_exactly(open_conn, 5) == b"after"
        assert old.poll() is None
    assert old.wait(timeout=15) == 0
    assert new.poll() is None


def test_many_failed_connections_do_not_leak(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin)
    inputs = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x00",
        client_hello("nobody.test"),
        client_hello(None),
    ]

    def hammer(count: int) -> None:
        for i in range(count):
            with proxy.connect() as sock:
                sock.sendall(inputs[i % len(inputs)])
                assert len(alert_from(sock)) == 7

    hammer(500)  # warm up allocators and caches
    before = rss_kib(proxy.process.pid)
    hammer(2000)
    assert rss_kib(proxy.process.pid) - before < 1024
    assert proxy.process.poll() is None
