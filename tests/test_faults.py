"""Backends that misbehave, behind both running proxies, both twins: killed mid-stream in
each direction, accepting and never reading, resetting at once, answering garbage, their
host entry renamed or socket replaced while connections are made, the hosts directory
itself replaced.  Each time the proxy must stay up, close only the affected connection
(a healthy connection to another host, open throughout, keeps working) and log at most
one line for it (fasthttpdir, which answers such failures itself: exactly one)."""

from __future__ import annotations

import http.client
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from attack_kit import (
    LEAF,
    PROGRAMS,
    UnixHttpServer,
    drain_log,
    no_tracebacks,
    raise_nofile,
    rss_kib,
    wait_for,
)
from backends import UnixBackend, client_hello, recv_exactly, recv_until_eof

SICK = "sick.test"
WELL = "well.test"
BLOCK = bytes(range(256)) * 256  # 64 KiB

# A backend process the test can SIGKILL: it takes one connection, reads the hello (or
# the request head), then either reads everything (sink) or streams forever (source).
KILLABLE = r"""
import socket, sys
path, mode, http = sys.argv[1], sys.argv[2], sys.argv[3] == "http"
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(16)
print("ready", flush=True)
conn, _ = server.accept()
head = b""
while (b"\r\n\r\n" not in head) if http else not head:
    head += conn.recv(65536)
if mode == "sink":
    while conn.recv(1 << 20):
        pass
else:
    if http:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    block = b"x" * 65536
    while True:
        conn.sendall(block)
"""


@pytest.fixture(autouse=True)
def _descriptors():
    raise_nofile()


@pytest.fixture
def cleanup():
    """Callbacks run at teardown, last first (backends, processes)."""
    callbacks: list = []
    yield callbacks.append
    for callback in reversed(callbacks):
        callback()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 20):
        conn.sendall(data)


class Healthy:
    """A connection to the healthy host, open for the whole test: an echo through fastsni
    (the backend echoes the hello too), keep-alive requests through fasthttpdir."""

    def __init__(self, program: str, proxy) -> None:
        self.program = program
        if program == "fasthttpdir":
            self.conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        else:
            self.sock = proxy.connect()
            hello = client_hello(WELL)
            self.sock.sendall(hello)
            assert recv_exactly(self.sock, len(hello)) == hello
        self.exchange()
        self.port = (self.conn.sock if program == "fasthttpdir" else self.sock).getsockname()[1]

    def exchange(self) -> None:
        if self.program == "fasthttpdir":
            self.conn.request("GET", "/healthy", headers={"Host": WELL})
            response = self.conn.getresponse()
            assert (response.status, response.read()) == (200, b"well /healthy\n")
        else:
            self.sock.sendall(b"still here")
            assert recv_exactly(self.sock, 10) == b"still here"


def setup(program, twin, hosts, proxies, cleanup):
    """The healthy backend and host, the proxy, and the healthy connection through it."""
    path = hosts / WELL / LEAF[program]
    backend = UnixHttpServer(path, tag="well") if program == "fasthttpdir" else UnixBackend(path, echo)
    cleanup(backend.close)
    proxy = proxies(program, hosts, twin)
    return proxy, Healthy(program, proxy)


def lines_about(proxy, port: int) -> list[str]:
    return [line for line in drain_log(proxy) if f"127.0.0.1:{port} " in line]


def check_unharmed(program, proxy, healthy, victim_port: int | None) -> None:
    """The proxy is up, the healthy connection works, no traceback, and the victim got at
    most one log line (fasthttpdir: exactly one)."""
    healthy.exchange()
    assert proxy.process.poll() is None
    log = drain_log(proxy)
    no_tracebacks(log)
    assert not lines_about(proxy, healthy.port), log
    if victim_port is not None:
        if program == "fasthttpdir":  # written before the answer; our reader thread may lag
            wait_for(lambda: lines_about(proxy, victim_port), 10, f"a line about 127.0.0.1:{victim_port}")
        about = lines_about(proxy, victim_port)
        assert len(about) == (1 if program == "fasthttpdir" else len(about[:1])), log
        print(f"\n{program}: logged {about}")


def victim_connect(program: str, proxy, head: bytes = b"") -> socket.socket:
    sock = proxy.connect(timeout=10)
    if program == "fastsni":
        sock.sendall(client_hello(SICK) + head)
    else:
        sock.sendall(head or f"GET / HTTP/1.1\r\nHost: {SICK}\r\n\r\n".encode())
    return sock


def start_killable(hosts, program: str, mode: str, cleanup) -> subprocess.Popen:
    path = hosts / SICK / LEAF[program]
    path.parent.mkdir()
    kind = "http" if program == "fasthttpdir" else "tls"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(path), mode, kind], stdout=subprocess.PIPE, text=True
    )
    cleanup(lambda: (process.kill(), process.wait()))
    assert process.stdout.readline() == "ready\n"
    return process


def answer_or_end(sock: socket.socket) -> bytes:
    """What arrives before the connection ends (a reset counts as an end)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        data += b"(reset)"
    return data


# -- killed mid-stream ----------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
def test_backend_killed_mid_upload(program, twin, hosts, proxies, cleanup):
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    backend = start_killable(hosts, program, "sink", cleanup)
    head = f"POST /up HTTP/1.1\r\nHost: {SICK}\r\nContent-Length: {1 << 34}\r\n\r\n".encode()
    sock = victim_connect(program, proxy, head if program == "fasthttpdir" else b"")
    port = sock.getsockname()[1]
    sent = []
    stop = threading.Event()

    def upload():
        try:
            for _ in range(1 << 14):  # at most 1 GiB
                if stop.is_set():
                    return
                sock.sendall(BLOCK)
                sent.append(len(BLOCK))
        except OSError:
            pass

    sender = threading.Thread(target=upload)
    sender.start()
    wait_for(lambda: len(sent) >= 64, 20, "4 MiB uploaded through the proxy")
    healthy.exchange()
    backend.kill()
    backend.wait()
    answer = answer_or_end(sock)
    stop.set()
    sock.close()
    sender.join(10)
    if program == "fasthttpdir":
        assert answer.startswith(b"HTTP/1.1 502 "), answer[:100]
    else:
        assert answer in (b"", b"(reset)"), answer[:100]
    check_unharmed(program, proxy, healthy, port)


@pytest.mark.parametrize("program", PROGRAMS)
def test_backend_killed_mid_download(program, twin, hosts, proxies, cleanup):
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    backend = start_killable(hosts, program, "source", cleanup)
    sock = victim_connect(program, proxy)
    port = sock.getsockname()[1]
    received = recv_exactly(sock, 4 << 20)
    if program == "fasthttpdir":
        assert received.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
    healthy.exchange()
    backend.kill()
    backend.wait()
    started = time.monotonic()
    rest = answer_or_end(sock)
    assert time.monotonic() - started < 5
    assert len(received) + len(rest) < 1000000000  # cut short, not completed
    sock.close()
    check_unharmed(program, proxy, healthy, port)


# -- accepts and never reads ------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
def test_backend_that_never_reads(program, twin, hosts, proxies, cleanup):
    """The upload stalls with bounded memory in the proxy; the healthy connection goes on;
    after the client resets its connection, the proxy closes the backend's too (once the
    backend reads: until then the proxy is not reading the client, see below)."""
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    held: list[socket.socket] = []
    accepted = threading.Event()
    release = threading.Event()

    def never_read(conn: socket.socket) -> None:
        held.append(conn)
        accepted.set()
        release.wait(30)  # until the test ends

    backend = UnixBackend(hosts / SICK / LEAF[program], never_read)
    cleanup(backend.close)
    cleanup(release.set)
    head = f"POST /up HTTP/1.1\r\nHost: {SICK}\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
    sock = victim_connect(program, proxy, head if program == "fasthttpdir" else b"")
    before = rss_kib(proxy.process.pid)
    sock.settimeout(0.5)
    sent = 0
    try:
        for _ in range(1 << 14):  # at most 1 GiB; it stops long before
            sent += sock.send(BLOCK)
    except TimeoutError:
        pass
    assert accepted.wait(5)
    grown = rss_kib(proxy.process.pid) - before
    assert sent < 64 << 20, f"{sent} bytes taken: nothing pushed back"
    assert grown < 4096, f"the proxy grew {grown} KiB for one stalled upload"
    healthy.exchange()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: "a reset or error on either side closes both"
    # While the backend reads nothing the proxy cannot even see the reset (it reads the
    # client only as the backend makes room) and keeps what it holds for the backend.
    still_open = not backend_closed(held[0])
    # Once the backend reads, the proxy goes on, meets the reset and closes both.
    held[0].setblocking(False)
    deadline = time.monotonic() + 5
    while not backend_closed(held[0]):
        assert time.monotonic() < deadline, "the proxy kept the backend connection after the client's reset"
        try:
            held[0].recv(1 << 20)
        except BlockingIOError:
            time.sleep(0.01)
    check_unharmed(program, proxy, healthy, None)
    print(
        f"\n{program} {twin.name}: {sent >> 10} KiB taken before the upload stalled; RSS +{grown} KiB; "
        f"after the client's reset the backend connection stayed open until the backend read: {still_open}"
    )


def backend_closed(conn: socket.socket) -> bool:
    """Whether the proxy closed its end, seen without reading (reading would make room
    and let the proxy go on): the peer's shutdown shows as POLLRDHUP."""
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


# -- resets at once, answers garbage ------------------------------------------------------------


def reset_at_once(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def garbage(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"\x00\xffNOT HTTP, NOT TLS\r\n\r\n" * 8)
    conn.shutdown(socket.SHUT_WR)
    recv_until_eof(conn)


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("handler", [reset_at_once, garbage], ids=["reset", "garbage"])
def test_backend_resets_or_answers_garbage(program, handler, twin, hosts, proxies, cleanup):
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    backend = UnixBackend(hosts / SICK / LEAF[program], handler)
    cleanup(backend.close)
    for _ in range(3):
        sock = victim_connect(program, proxy)
        port = sock.getsockname()[1]
        sock.settimeout(10)
        answer = answer_or_end(sock)
        sock.close()
        if program == "fasthttpdir":
            assert answer.startswith(b"HTTP/1.1 502 "), answer
        elif handler is garbage:
            assert (
                answer == b"\x00\xffNOT HTTP, NOT TLS\r\n\r\n" * 8
            )  # relayed untouched: TLS is the backend's
        else:
            assert answer in (b"", b"(reset)"), answer
        check_unharmed(program, proxy, healthy, port)
    if program == "fastsni" and handler is reset_at_once:
        # A backend that resets ends the relay: ECONNRESET if it closed with the hello unread,
        # EPIPE if it was gone before the hello was written (a race either way); counted, not
        # logged (nobody can act on it).
        from test_counters import counters

        assert counters(proxy, open_wanted=0)["relay_resets"] == "3"
        assert not [line for line in proxy.log if "while relaying" in line], proxy.log


# -- the host entry renamed, its socket replaced, the hosts directory replaced -------------------

MOVING = "moving.test"


def one_connection(program: str, proxy, name: str) -> str:
    """served, refused (the proxy's documented answer for a missing backend) or a failure."""
    with proxy.connect(timeout=10) as sock:
        if program == "fastsni":
            hello = client_hello(name)
            sock.sendall(hello + b"ping")
            sock.shutdown(socket.SHUT_WR)  # the echo backend closes after our EOF
            answer = answer_or_end(sock)
            if answer == hello + b"ping":
                return "served"
            return "refused" if answer == bytes.fromhex("15030300020270") else f"failed: {answer[:60]!r}"
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        answer = answer_or_end(sock)
        if answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b" /x\n"):
            return "served"
        refused = answer.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 503 "))
        return "refused" if refused else f"failed: {answer[:60]!r}"


def moving_backend(program: str, path, cleanup):
    if program == "fasthttpdir":
        backend = UnixHttpServer(path)
    else:
        backend = UnixBackend(path, echo)  # the hello too
    cleanup(backend.close)
    return backend


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("change", ["rename-entry", "replace-socket", "recreate-socket"])
def test_host_entry_changing_under_load(program, change, twin, hosts, proxies, cleanup):
    """Connections made while the entry is renamed away and back, or its socket replaced
    by rename(2) or by unlink and bind (old listeners keep serving what they queued):
    each is served or cleanly refused, none fails otherwise, nothing else is hurt."""
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    entry = hosts / MOVING
    path = entry / LEAF[program]
    moving_backend(program, path, cleanup)
    outcomes: list[str] = []
    stop = threading.Event()

    def load():
        for _ in range(150):
            if stop.is_set():
                return
            try:
                outcomes.append(one_connection(program, proxy, MOVING))
            except OSError as exc:
                outcomes.append(f"failed: {exc!r}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    changes = 0
    deadline = time.monotonic() + 20
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline and changes < 200:
        changes += 1
        if change == "rename-entry":
            entry.rename(hosts / f"{MOVING}.away")
            time.sleep(0.005)
            (hosts / f"{MOVING}.away").rename(entry)
        elif change == "replace-socket":
            moving_backend(program, entry / ".next", cleanup)
            os.rename(entry / ".next", path)  # atomic: every connect finds a listener
        else:
            path.unlink()
            time.sleep(0.002)
            moving_backend(program, path, cleanup)
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(30)
    failed = [outcome for outcome in outcomes if outcome.startswith("failed")]
    assert not failed, failed[:5]
    served, refused = outcomes.count("served"), outcomes.count("refused")
    assert served > 50, (served, refused)
    if change == "replace-socket":
        assert refused == 0, refused
    check_unharmed(program, proxy, healthy, None)
    print(f"\n{program} {twin.name} {change}: {changes} changes, {served} served, {refused} refused")


@pytest.mark.parametrize("program", PROGRAMS)
def test_hosts_directory_replaced(program, twin, hosts, proxies, cleanup):
    """``mv hosts hosts.old && mkdir hosts``: the proxy's current directory is the old one,
    so it goes on serving hosts.old (names only in the new directory are not found) until
    a new copy is started in the new directory and the old one gets SIGHUP."""
    proxy, healthy = setup(program, twin, hosts, proxies, cleanup)
    old = hosts.with_name("hosts.old")
    hosts.rename(old)
    hosts.mkdir()
    moving_backend(program, hosts / MOVING / LEAF[program], cleanup)
    assert one_connection(program, proxy, WELL) == "served"  # from hosts.old
    assert one_connection(program, proxy, MOVING) == "refused"  # only in the new hosts
    healthy.exchange()
    first = proxy.process
    proxy.start()  # a new copy, started in the new directory
    first.send_signal(signal.SIGHUP)
    proxy.expect("SIGHUP")
    assert one_connection(program, proxy, MOVING) == "served"
    assert one_connection(program, proxy, WELL) == "refused"
    if program == "fastsni":
        healthy.exchange()  # the old copy still relays what it had
        healthy.sock.close()
    else:
        healthy.conn.close()  # fasthttpdir closed it at SIGHUP: it was idle between requests
    assert first.wait(15) == 0
    no_tracebacks(drain_log(proxy))
