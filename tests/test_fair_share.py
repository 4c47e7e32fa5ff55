"""Fair share under descriptor pressure (issue 21), both proxies, both twins: one source
cannot take the port from everyone.

While fewer than half of RLIMIT_NOFILE's descriptors are in use nothing is tracked;
beyond that a source (IPv4 address, IPv6 /64) holding max(8, limit / (2 x (sources +
1))) connections gets no more: each new one is refused at once (fastsni: an
internal_error alert; fasthttpdir: 503 with Connection: close), counted as
``refused_fair_share`` and logged once per episode.  Out of descriptors, the heaviest
sources' unrouted connections are closed first, oldest first (``shed_fair_share``).

Every source is a loopback address; every loop is bounded in count; every process is
reaped by the fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest
from attack_kit import PROGRAMS, drain_log, no_tracebacks, raise_nofile, rss_kib
from backends import client_hello, recv_exactly, recv_until_eof
from test_counters import counters

NOFILE = 512  # the proxy's RLIMIT_NOFILE: pressure from 256 descriptors in use, over below 128
HEAVY = "127.0.0.2"
LIGHT = ("127.0.0.3", "127.0.0.4")
HEAVY_AT_MOST = 700  # connections the heavy source opens: more than the proxy has descriptors
LIGHT_EVERY = 10  # one request from each light source after this many heavy connections
COUNTED = ("accepted", "open", "refused_fair_share", "shed_fair_share")
LEAF = {"fastsni": "tls-socket", "fasthttpdir": "http-socket"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
REFUSED = {
    "fastsni": bytes.fromhex("15030300020250"),  # fatal internal_error
    "fasthttpdir": b"HTTP/1.1 503 Service Unavailable\r\n",
}


@pytest.fixture(autouse=True)
def _descriptors():
    raise_nofile()  # hundreds of client sockets in the test process


class Holder:
    """A backend that accepts and holds every connection, reading nothing, answering nothing:
    one thread for all, so hundreds of held connections cost the test little."""

    def __init__(self, path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1024)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def release(self) -> None:
        """Close the connections held so far (the relays through the proxy end with them)."""
        for conn in self.held:
            conn.close()
        self.held.clear()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        self.release()


def answering(program: str):
    """The ordinary site's backend: ``ok`` to each client, then close."""
    hello = client_hello("light.example")

    def handle(conn: socket.socket) -> None:
        if program == "fastsni":
            recv_exactly(conn, len(hello))
            conn.sendall(b"ok")
            return
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            data = conn.recv(65536)
            if not data:
                return
            head += data
        conn.sendall(OK)

    return handle


def connect(proxy, source: str) -> socket.socket:
    return socket.create_connection((proxy.address, proxy.port), timeout=10, source_address=(source, 0))


def counters_now(proxy) -> dict[str, str]:
    """One counters line (SIGUSR1), as it is."""
    proxy.process.send_signal(signal.SIGUSR1)
    line = proxy.expect(f"{proxy.program}: counters ")
    return dict(field.split("=", 1) for field in line.split(" counters ", 1)[1].split())


def until_closed(sock: socket.socket) -> bytes:
    """What the peer sent before it closed, by FIN or by reset (a refused connection is
    closed with the client's bytes unread, which resets it after the refusal went out)."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def ordinary(program: str, proxy, source: str) -> bool:
    """One ordinary routed exchange from ``source``; whether it got its whole answer."""
    try:
        with connect(proxy, source) as sock:
            if program == "fastsni":
                sock.sendall(client_hello("light.example"))
                return recv_until_eof(sock) == b"ok"
            sock.sendall(b"GET / HTTP/1.1\r\nHost: light.example\r\n\r\n")
            return recv_until_eof(sock) == OK
    except OSError:
        return False


def opening(program: str, kind: str) -> bytes:
    """What a heavy connection sends: half a hello or head (stalled), or all of one for
    the name whose backend holds connections forever (held)."""
    if program == "fastsni":
        hello = client_hello("held.example")
        return hello if kind == "held" else hello[:20]
    if kind == "held":
        return b"GET / HTTP/1.1\r\nHost: held.example\r\n\r\n"
    return b"GET / HTTP/1.1\r\nHost: held.exa"


def connect_from(proxy, source: str, data: bytes) -> socket.socket | None:
    """A connection from ``source`` that sent ``data``; None if it was refused already."""
    sock = connect(proxy, source)
    try:
        sock.sendall(data)
    except OSError:
        sock.close()
        return None
    return sock


@pytest.mark.parametrize("kind", ["stalled", "held"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_one_heavy_source_cannot_take_the_port(program, kind, twin, hosts, proxies, backends):
    backends(hosts / "light.example" / LEAF[program], answering(program))
    holder = Holder(hosts / "held.example" / LEAF[program])
    heavy: list[socket.socket] = []
    try:
        proxy = proxies(program, hosts, twin, nofile=NOFILE)
        rss_before = rss_kib(proxy.process.pid)
        good = failed = 0
        data = opening(program, kind)
        for count in range(1, HEAVY_AT_MOST + 1):
            sock = connect_from(proxy, HEAVY, data)
            if sock is not None:
                heavy.append(sock)
            if count % LIGHT_EVERY == 0:
                for source in LIGHT:
                    if ordinary(program, proxy, source):
                        good += 1
                    else:
                        failed += 1
        rss_peak = rss_kib(proxy.process.pid)
        fields = counters_now(proxy)
        refused = int(fields["refused_fair_share"])
        # what a refused heavy connection got: the proxy's refusal, then the end
        answers = [until_closed(sock) for sock in heavy[-5:]]
        log = drain_log(proxy)
        for sock in heavy:
            sock.close()
        heavy.clear()
        holder.release()  # a held relay ends when its backend closes too
        after = counters(proxy, open_wanted=0)
        # Back to normal: the heavy source is served like anyone, and nobody is refused.
        again = [ordinary(program, proxy, source) for source in (HEAVY, *LIGHT) for _ in range(5)]
        final = counters(proxy, open_wanted=0)
    finally:
        for sock in heavy:
            sock.close()
        holder.close()
    print(
        f"\n{program} {twin.name} {kind}: light {good} of {good + failed} served; heavy refused {refused} of "
        f"{HEAVY_AT_MOST}, open at the end {fields['open']}; RSS {rss_before} -> {rss_peak} KiB",
        *[line for line in log if "fair share:" in line],
        sep="\n",
    )
    assert good >= 0.99 * (good + failed) and good > 0, (good, failed)
    assert refused > 0, fields
    assert all(answer.startswith(REFUSED[program]) for answer in answers), answers
    lines = [line for line in log if "fair share:" in line]
    assert len(lines) == 1 and f"first {HEAVY}, holding" in lines[0], lines
    no_tracebacks(log)
    assert after["open"] == "0"
    assert all(again), again
    assert final["refused_fair_share"] == after["refused_fair_share"]
    assert rss_peak - rss_before < 32 * 1024, (rss_before, rss_peak)


@pytest.mark.parametrize("program", PROGRAMS)
def test_many_sources_each_holding_little_are_not_refused(program, twin, hosts, proxies, backends):
    """40 sources holding 7 stalled connections each put the proxy under pressure (280 of
    512 descriptors): the share is the floor, 8, so nobody is refused."""
    backends(hosts / "light.example" / LEAF[program], answering(program))
    held: list[socket.socket] = []
    sources = [f"127.0.1.{index}" for index in range(1, 41)]
    try:
        proxy = proxies(program, hosts, twin, nofile=NOFILE)
        data = opening(program, "stalled")
        for source in sources:
            for _ in range(7):
                sock = connect_from(proxy, source, data)
                assert sock is not None
                held.append(sock)
        fields = counters(proxy, open_wanted=len(held))
        served = [ordinary(program, proxy, source) for source in sources]  # the 8th of each
        after = counters(proxy, open_wanted=len(held))
        # the rule was in force: a source's 9th connection is refused (8 is the floor)
        extra = [connect_from(proxy, sources[0], data) for _ in range(2)]
        held += [sock for sock in extra if sock is not None]
        ninth = until_closed(extra[1]) if extra[1] is not None else b""
        last = counters_now(proxy)
    finally:
        for sock in held:
            sock.close()
    assert fields["open"] == str(len(held) - 2), fields
    assert all(served), served.count(False)
    assert after["refused_fair_share"] == "0", after
    assert after["open"] == str(len(held) - 2), after  # every stalled one still open
    assert ninth.startswith(REFUSED[program]) and last["refused_fair_share"] == "1", (ninth, last)
    lines = [line for line in drain_log(proxy) if "fair share:" in line]
    assert len(lines) == 1 and "holding 8 or more" in lines[0], lines


@pytest.mark.parametrize("program", PROGRAMS)
def test_out_of_descriptors_the_heaviest_sources_unrouted_go_first(program, twin, hosts, proxies, backends):
    """RLIMIT_NOFILE 64: a heavy source's stalled connections (as many as it got in before
    pressure), then five sources with 7 each, more than the descriptors left: when accept
    finds none, the heavy source's oldest unrouted connections are closed, and everyone
    else gets in, a light request after them too."""
    backends(hosts / "light.example" / LEAF[program], answering(program))
    data = opening(program, "stalled")
    held: list[socket.socket] = []
    try:
        proxy = proxies(program, hosts, twin, nofile=64)
        heavy = [connect_from(proxy, HEAVY, data) for _ in range(40)]
        held += [sock for sock in heavy if sock is not None]
        for index in range(1, 6):
            held += [connect_from(proxy, f"127.0.2.{index}", data) for _ in range(7)]
        assert None not in held[len(held) - 35 :]
        served = ordinary(program, proxy, LIGHT[0])  # accepted after every one above
        fields = counters_now(proxy)
        oldest = until_closed(heavy[0])
        log = drain_log(proxy)
        lines = [line for line in log if "fair share:" in line or "out of descriptors" in line]
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
    print(
        f"\n{program} {twin.name}: " + " ".join(f"{key}={fields[key]}" for key in COUNTED), *lines, sep="\n"
    )
    assert served
    assert int(fields["shed_fair_share"]) >= 1 and int(fields["refused_fair_share"]) >= 1, fields
    assert oldest == b""  # closed without a word
    assert any(f"unrouted connections of {HEAVY} (holding" in line for line in lines), lines
    no_tracebacks(log)


# --- in process: the rule itself, both twins --------------------------------------------


@pytest.fixture
def engine(twin):
    return twin.module("fastsni.engine", "fastsni._engine")


@pytest.fixture
def Connection(engine):  # noqa: N802 (a class)
    class Connection(StandIn, engine.Handler):  # a Handler of this twin's engine, as Service needs
        pass

    StandIn.made = []
    return Connection


class StandIn:
    """A stand-in for a proxy's connection: holds its descriptor; ``routed`` ones cannot be shed."""

    REFUSED = b"refused"
    made: list[StandIn] = []

    def __init__(self, service, fd: int, peer: tuple) -> None:
        self.service = service
        self.fd = fd
        self.peer = peer
        self.routed = False
        self.closed = False
        StandIn.made.append(self)

    def ready(self, fd: int, events: int) -> None:
        """Service reads a new connection at once: a stand-in leaves its bytes unread."""

    def shed(self) -> bool:
        if self.routed or self.closed:
            return False
        self.closed = True
        os.close(self.fd)
        self.service.closed(self)
        return True


def clients(listening: socket.socket, source: str, count: int) -> list[socket.socket]:
    address = listening.getsockname()
    return [socket.create_connection(address, timeout=5, source_address=(source, 0)) for _ in range(count)]


def test_source_of_groups_ipv4_addresses_and_ipv6_64s(engine):
    for family, listen_on, connect_from, source in [
        (socket.AF_INET, "127.0.0.1", "127.0.0.2", bytes([127, 0, 0, 2])),
        (socket.AF_INET6, "::1", "::1", bytes(8)),
        (socket.AF_INET6, "::", "127.0.0.3", bytes([127, 0, 0, 3])),  # IPv4-mapped: as IPv4
    ]:
        listener = socket.socket(family)
        try:
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((listen_on, 0))
            listener.listen()
            connect_to = "::1" if connect_from == "::1" else "127.0.0.1"
            address = (connect_to, listener.getsockname()[1])
            with socket.create_connection(address, timeout=5, source_address=(connect_from, 0)):
                accepted, _ = listener.accept()
                with accepted:
                    assert engine.source_of(accepted.getpeername(), family) == source
        finally:
            listener.close()
    assert engine.source_of(None, socket.AF_INET) is None  # a connection without an address
    assert engine.source_of("", socket.AF_UNIX) is None


def test_source_text():
    from fastsni.engine import source_text

    assert source_text(bytes([192, 0, 2, 1])) == "192.0.2.1"
    assert source_text(bytes.fromhex("20010db800010002")) == "2001:db8:1:2::/64"


def test_refused_at_its_share_in_process(engine, Connection, capfd):
    """Under pressure (made to start at once here), a source's connections beyond the
    share get REFUSED and EOF; another source is still admitted."""
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    service = engine.Service(listening, Connection)
    service.limit = 16  # share: max(8, 16 // (2 x (sources + 1))) = 8
    service.pressure_above = 0
    service.listener.start()
    heavy = clients(listening, "127.0.0.2", 10)
    light = clients(listening, "127.0.0.3", 2)
    try:
        service.listener.accept()
        assert len(Connection.made) == 10  # 8 of the heavy source, both light ones
        for sock in heavy[8:]:
            assert recv_until_eof(sock) == b"refused"
        assert service.sources == {bytes([127, 0, 0, 2]): 8, bytes([127, 0, 0, 3]): 2}
        assert engine.fair_share_counts()["refused_fair_share"] >= 2
        assert "fair share: " in capfd.readouterr().err
        for connection in list(Connection.made):  # all gone: the table is empty
            connection.shed()
        assert service.sources is None  # fewer than a quarter in use: pressure is over
        assert not service.live and not service.owners
    finally:
        service.listener.close()
        for sock in heavy + light:
            sock.close()


def test_shed_closes_the_heaviest_sources_unrouted_connections_oldest_first(engine, Connection, capfd):
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    service = engine.Service(listening, Connection)
    service.listener.start()
    heavy = clients(listening, "127.0.0.2", 24)
    light = clients(listening, "127.0.0.3", 3)
    try:
        service.listener.accept()
        made = list(Connection.made)
        assert len(made) == 27
        for connection in made[:3]:
            connection.routed = True  # the heavy source's oldest three named their backend
        service.pressure_below = 0  # stay under pressure, whatever this process holds
        service.shed()
        closed = [connection for connection in made if connection.closed]
        assert closed == made[3:19]  # 16, the oldest unrouted ones, all the heavy source's
        assert service.sources == {bytes([127, 0, 0, 2]): 8, bytes([127, 0, 0, 3]): 3}
        assert engine.fair_share_counts()["shed_fair_share"] >= 16
        assert "closed 16 unrouted connections of 127.0.0.2 (holding 24)" in capfd.readouterr().err
        for sock in heavy[3:19]:
            assert recv_until_eof(sock) == b""
    finally:
        service.listener.close()
        for connection in Connection.made:
            if not connection.closed:
                os.close(connection.fd)
        for sock in heavy + light:
            sock.close()


IPV6_SCRIPT = r"""
import json, os, socket, subprocess, sys
from fastsni import twins
engine = twins.load("fastsni.engine", "fastsni._engine")
for address in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:3::1"):
    subprocess.run(["ip", "-6", "addr", "add", address + "/64", "dev", "lo", "nodad"], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

class Connection(engine.Handler):
    REFUSED = b"refused"
    def __init__(self, service, fd, peer):
        self.fd = fd
        self.peer = peer
    def ready(self, fd, events):
        pass

listening = socket.create_server(("2001:db8:1:2::1", 0), family=socket.AF_INET6)
listening.setblocking(False)
service = engine.Service(listening, Connection)
service.limit = 16  # share: max(8, 16 // (2 x (sources + 1))) = 8
service.pressure_above = 0  # under pressure at once
service.listener.start()
address = listening.getsockname()[:2]
clients = []
for source in ["2001:db8:1:2::1", "2001:db8:1:2::2"] * 5 + ["2001:db8:1:3::1"] * 2:
    clients.append(socket.create_connection(address, timeout=5, source_address=(source, 0)))
service.listener.accept()
answers = []
for sock in clients:
    sock.setblocking(False)
    try:
        answers.append(sock.recv(100).decode())
    except BlockingIOError:
        answers.append("open")
print(json.dumps({"sources": {key.hex(): held for key, held in service.sources.items()}, "answers": answers}))
"""


def test_an_ipv6_64_is_one_source(twin):
    """In a network namespace of its own (root, unshare, ip): two addresses of one /64 count
    as one source, an address of the next /64 as another."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare(1) and ip(8) for a network namespace")
    if twin.name == "compiled":
        twin.module("fastsni.engine", "fastsni._engine")  # skips if not built
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", IPV6_SCRIPT],
        env=twin.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sources"] == {"20010db800010002": 8, "20010db800010003": 2}
    # the /64's 9th and 10th connections are refused (refusals are written before close;
    # which two of the ten depends only on the order they were accepted: the last two)
    assert result["answers"] == ["open"] * 8 + ["refused"] * 2 + ["open"] * 2
