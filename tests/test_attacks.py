"""Attacks on the running proxies, both programs and both twins: stalled clients by the
thousand, and running out of descriptors.  Every load is bounded in count and time."""

from __future__ import annotations

import hashlib
import http.client
import selectors
import socket
import ssl
import threading
import time

import pytest
from attack_kit import (
    LEAF,
    PROGRAMS,
    USER_CANCELED,
    UnixHttpServer,
    cpu_seconds,
    drain_log,
    http_get,
    no_tracebacks,
    open_descriptors,
    raise_nofile,
    rss_kib,
    wait_for,
)
from backends import UnixBackend, client_hello, recv_exactly, recv_until_eof, tls_http_backend

NAME = "app.example.test"
DEADLINE = 10.0  # fastsni's hello deadline and fasthttpdir's head deadline
STALLED = 250  # in the default run; -m stress runs the full 1,000
# What a stalled connection may cost the proxy: its objects (connection, timer, reader
# or parser: a few KiB in CPython) plus the half hello or head it sent (< 300 bytes).
# 32 KiB each is several times that, and a quarter of one read buffer (CHUNK, 128 KiB)
# that a leak of read buffers would keep per connection.
RSS_PER_STALLED_KIB = 32
RSS_SLACK_KIB = 4096  # allocator arenas and caches warmed up by the first thousand


@pytest.fixture(autouse=True)
def _descriptors():
    raise_nofile()


@pytest.fixture
def backends():
    started: list = []

    def start(backend):
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


def stalled_bytes(program: str) -> bytes:
    """Half a request head for fasthttpdir; for fastsni, half a hello that stops before
    its server_name extension, so even a reader that routes as soon as the name is
    known must wait."""
    if program == "fasthttpdir":
        return f"GET / HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: sta".encode()
    hello = client_hello(NAME)
    return hello[: min(len(hello) // 2, hello.index(NAME.encode()) - 9)]


class GoodClient:
    """Real clients through the proxy to a real backend, one every 50 ms in a thread,
    bounded in count; every outcome recorded with its time."""

    def __init__(self, program: str, proxy, ca) -> None:
        self.program = program
        self.proxy = proxy
        self.context = ssl.create_default_context()
        ca.configure_trust(self.context)
        self.context.set_alpn_protocols(["http/1.1"])
        self.done: list[tuple[float, float]] = []  # (when it ended, how long it took)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def once(self) -> None:
        if self.program == "fasthttpdir":
            status, body = http_get(self.proxy.port, NAME, "/good")
            assert (status, body) == (200, b"backend /good\n"), (status, body)
            return
        with self.context.wrap_socket(self.proxy.connect(), server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            assert recv_until_eof(tls).endswith(b"backend app.example.test alpn http/1.1\n")

    def run(self) -> None:
        for _ in range(1000):
            if self.stop.wait(0.05):
                return
            started = time.monotonic()
            try:
                self.once()
            except Exception as exc:
                self.failures.append(exc)
            now = time.monotonic()
            self.done.append((now, now - started))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


def start_backend(program: str, hosts, backends, ca):
    path = hosts / NAME / LEAF[program]
    if program == "fasthttpdir":
        return backends(UnixHttpServer(path))
    return backends(UnixBackend(path, tls_http_backend(ca, NAME)))


def stalled_clients_closed_at_deadline(program, twin, hosts, proxies, backends, ca, count):
    start_backend(program, hosts, backends, ca)
    proxy = proxies(program, hosts, twin)
    pid = proxy.process.pid
    good = GoodClient(program, proxy, ca)
    wait_for(lambda: len(good.done) >= 5, 20, "five good connections")  # warm up
    before = rss_kib(pid)
    base_fds = open_descriptors(pid)
    payload = stalled_bytes(program)
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    received: dict[socket.socket, bytes] = {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        opened[sock] = time.monotonic()
        sock.sendall(payload)
        sock.setblocking(False)
        received[sock] = b""
        selector.register(sock, selectors.EVENT_READ)
    first = min(opened.values())
    wait_for(lambda: open_descriptors(pid) >= base_fds + count, 10, f"the proxy accepting {count} clients")
    peak = rss_kib(pid)
    closed: dict[socket.socket, float] = {}
    until = first + DEADLINE + 3
    while len(closed) < count and time.monotonic() < until:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data = b""
            if data:
                received[sock] += data
                continue
            closed[sock] = time.monotonic()
            selector.unregister(sock)
        if len(closed) < count / 2:
            peak = max(peak, rss_kib(pid))
    good_before = len(good.done)
    wait_for(lambda: len(good.done) >= good_before + 3, 10, "good connections after the stalled ones closed")
    good.finish()
    for sock in opened:
        sock.close()
    selector.close()
    assert len(closed) == count, f"{count - len(closed)} stalled connections still open"
    lifetimes = sorted(closed[sock] - opened[sock] for sock in closed)
    assert lifetimes[0] > DEADLINE - 0.1, lifetimes[:3]
    assert lifetimes[-1] < DEADLINE + 2.5, lifetimes[-3:]
    expected = USER_CANCELED if program == "fastsni" else b""
    wrong = [data for data in received.values() if data != expected]
    assert not wrong, wrong[:3]
    assert not good.failures, good.failures[:3]
    assert len(good.done) >= 20
    slowest = max(took for _, took in good.done)
    grown = peak - before
    assert grown < count * RSS_PER_STALLED_KIB + RSS_SLACK_KIB, f"{grown} KiB for {count} stalled"
    assert proxy.process.poll() is None
    no_tracebacks(drain_log(proxy))
    print(
        f"\n{program} {twin.name}: {count} stalled closed {lifetimes[0]:.2f}..{lifetimes[-1]:.2f} s after "
        f"connect; RSS {before} -> peak {peak} KiB (+{grown}); {len(good.done)} good connections, "
        f"slowest {slowest * 1000:.0f} ms"
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_stalled_clients_are_closed_at_their_deadline(program, twin, hosts, proxies, backends, ca):
    stalled_clients_closed_at_deadline(program, twin, hosts, proxies, backends, ca, STALLED)


@pytest.mark.stress
@pytest.mark.parametrize("program", PROGRAMS)
def test_1000_stalled_clients(program, twin, hosts, proxies, backends, ca, request):
    if "stress" not in (request.config.option.markexpr or ""):
        pytest.skip("the full-size run: select it with -m stress")
    stalled_clients_closed_at_deadline(program, twin, hosts, proxies, backends, ca, 1000)


# -- out of descriptors -------------------------------------------------------------------

NOFILE = 64  # the proxy's RLIMIT_NOFILE (soft and hard)
BACKLOGGED = 8  # connections beyond the limit, left in the kernel's accept queue
# The descriptors are filled by connections routed to a backend that holds them (nothing
# the fair share may close: tests/test_fair_share.py), this many from each source (under
# the share's floor, 8, so none is refused), then by silent clients of one each.
HOGS_PER_SOURCE = 6
MESSAGE = bytes(range(256)) * 4096  # 1 MiB: what the backend's /big?1048576 answers too


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_after_hello(hello_size: int):
    def handle(conn: socket.socket) -> None:
        recv_exactly(conn, hello_size)
        while data := conn.recv(1 << 20):
            conn.sendall(data)

    return handle


class Flowing:
    """An open connection through the proxy that must keep working while it starves:
    an echo through fastsni (with a 1 MiB message, big enough to want a splice pipe),
    keep-alive requests through fasthttpdir."""

    def __init__(self, program: str, proxy, hello: bytes) -> None:
        self.program = program
        if program == "fasthttpdir":
            self.conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        else:
            self.sock = proxy.connect()
            self.sock.sendall(hello)
        self.exchange()

    def exchange(self) -> None:
        if self.program == "fasthttpdir":
            self.conn.request("GET", "/big?1048576", headers={"Host": NAME})
            response = self.conn.getresponse()
            assert response.status == 200
            assert sha256(response.read()) == sha256(MESSAGE)
            return
        sender = threading.Thread(target=self.sock.sendall, args=(MESSAGE,))
        sender.start()
        assert sha256(recv_exactly(self.sock, len(MESSAGE))) == sha256(MESSAGE)
        sender.join()

    def close(self) -> None:
        (self.conn if self.program == "fasthttpdir" else self.sock).close()


def hog(proxy, source: str, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection((proxy.address, proxy.port), timeout=10, source_address=(source, 0))
    sock.sendall(data)
    return sock


@pytest.mark.parametrize("program", PROGRAMS)
def test_out_of_descriptors(program, twin, hosts, proxies, backends):
    hello = client_hello(NAME)
    path = hosts / NAME / LEAF[program]
    if program == "fasthttpdir":
        backends(UnixHttpServer(path))
    else:
        backends(UnixBackend(path, echo_after_hello(len(hello))))
    proxy = proxies(program, hosts, twin, nofile=NOFILE)
    pid = proxy.process.pid
    flowing = [Flowing(program, proxy, hello) for _ in range(2)]
    free = NOFILE - open_descriptors(pid)
    assert free > 10, f"only {free} descriptors free at start"
    # Routed connections (two descriptors each) fill all but two or three free descriptors,
    # silent clients the rest; BACKLOGGED more silent ones wait in the accept queue.
    if program == "fasthttpdir":
        holding = f"POST /hold HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 1000\r\n\r\n".encode()
    else:
        holding = hello
    routed = (free - 2) // 2
    hogs = [hog(proxy, f"127.0.3.{1 + index // HOGS_PER_SOURCE}", holding) for index in range(routed)]
    rest = free - 2 * routed
    wait_for(lambda: open_descriptors(pid) == NOFILE - rest, 5, "the routed connections in")
    hogs += [hog(proxy, f"127.0.4.{1 + index}") for index in range(rest + BACKLOGGED)]
    queued = proxy.connect()  # waits in the accept queue too, until descriptors free up
    wait_for(lambda: open_descriptors(pid) == NOFILE, 5, "the proxy using all its descriptors")
    starved_at = cpu_seconds(pid)
    time.sleep(2)  # the interval measured: the proxy must not spin while it cannot accept
    starved_cpu = cpu_seconds(pid) - starved_at
    for connection in flowing:  # open connections keep flowing, several times over
        for _ in range(3):
            connection.exchange()
    assert open_descriptors(pid) == NOFILE
    for sock in hogs:
        sock.close()
    # Accepting resumes: the backlog is taken and the queued client is served.
    wait_for(lambda: open_descriptors(pid) < NOFILE - free + BACKLOGGED + 4, 5, "descriptors freed")
    if program == "fasthttpdir":
        queued.sendall(f"GET /queued HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        assert recv_until_eof(queued).endswith(b"\r\n\r\nbackend /queued\n")
    else:
        queued.sendall(hello + b"queued")
        assert recv_exactly(queued, 6) == b"queued"
    queued.close()
    for _ in range(5):
        if program == "fasthttpdir":
            assert http_get(proxy.port, NAME, "/new") == (200, b"backend /new\n")
        else:
            with proxy.connect() as sock:
                sock.sendall(hello + b"new")
                assert recv_exactly(sock, 3) == b"new"
    for connection in flowing:
        connection.exchange()
        connection.close()
    assert proxy.process.poll() is None
    log = drain_log(proxy)
    no_tracebacks(log)
    # One line for the whole episode (not one per retry), saying what ran out and what to do.
    starved = [line for line in log if "out of descriptors" in line]
    assert len(starved) == 1, log
    assert "EMFILE" in starved[0] and f"RLIMIT_NOFILE {NOFILE}" in starved[0], starved
    assert starved_cpu < 0.1, f"{starved_cpu:.2f} s of CPU in 2 s without descriptors"
    print(f"\n{program} {twin.name}: {free} descriptors filled; CPU while starved {starved_cpu:.2f} s in 2 s")
    print(starved[0])
