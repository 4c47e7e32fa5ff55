"""fastsni-listen: names, privileged ports, --user, and the socket holder (--copies, --cpus,
SIGHUP upgrades); and the listener waking one copy per connection (EPOLLEXCLUSIVE).

Every proxy here runs from fastsni-listen with the listening socket it bound; fastsni-listen
binds port 0 and the port is read from the start line.  Real connections through real
proxies to backends on Unix sockets, both twins.
"""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from backends import UnixBackend, client_hello, reap, recv_exactly, recv_until_eof, tls_http_backend
from test_fasthttpdir import echo, exchange, get
from test_fasthttpdir_e2e import uvicorn_backend  # noqa: F401  (a fixture)

NAME = "app.example.test"
NOBODY = 65534
PROBE = b"GET / HTTP/1.0\r\n\r\n"  # not TLS: fastsni answers one alert and closes
UNEXPECTED = bytes.fromhex("1503030002020a")
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="changing user needs root")


class Listen:
    """fastsni-listen as a process; its stderr, and its copies', read line by line by a thread."""

    def __init__(self, args: list[str], env: dict, cwd: Path, python: str = sys.executable, **popen) -> None:
        env = dict(env, FASTSNI_ALLOW_ROOT="1")  # the proxies refuse root without it
        self.process = subprocess.Popen(
            [python, "-m", "fastsni.listen", *args],
            cwd=cwd,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        """The next stderr line matching ``pattern`` (a regex), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no stderr line matching {pattern!r}; got {self.seen}")

    def children(self) -> list[int]:
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
            return [int(pid) for pid in children.read().split()]

    def stop(self) -> int:
        return reap(self.process, 30)


@pytest.fixture
def listens():
    """Factory: listens(args, env, cwd) -> Listen; every fastsni-listen is stopped and reaped."""
    started: list[Listen] = []

    def start(*args, **options) -> Listen:
        started.append(Listen(*args, **options))
        return started[-1]

    yield start
    for listen in started:
        listen.stop()


def peer(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket: the proxy copy."""
    import struct

    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def echo_backend(hello_length: int, peers: list):
    """A handler: note the proxy copy's pid, read the hello, then echo."""

    def handle(conn: socket.socket) -> None:
        peers.append(peer(conn))
        recv_exactly(conn, hello_length)
        while data := conn.recv(65536):
            conn.sendall(data)

    return handle


def start_proxies(listens, args, twin, hosts: Path, copies: int | None = None, program="fastsni", **options):
    """fastsni-listen ARGS 127.0.0.1:0 PROGRAM; returns (listen, port) once every copy listens."""
    listen = listens([*args, "127.0.0.1:0", sys.executable, "-m", program], twin.env, hosts, **options)
    if copies is None:
        port = int(listen.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    else:
        port = int(listen.expect(rf"{copies} cop(y|ies) of .* serving 127\.0\.0\.1:(\d+)").group(2))
    return listen, port


def probe(port: int, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(PROBE)
        return recv_until_eof(sock)


def echo_once(port: int, hello: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(hello + b"ping")
        assert recv_exactly(sock, 4) == b"ping"


class Load:
    """Client threads making connections in a loop until stopped (bounded in count and time)."""

    def __init__(self, connect, threads: int = 4, limit: int = 3000, seconds: float = 60) -> None:
        self.connect = connect
        self.limit = limit
        self.deadline = time.monotonic() + seconds
        self.done = 0
        self.failures: list[BaseException] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set() and self.done < self.limit and time.monotonic() < self.deadline:
            try:
                self.connect()
            except Exception as exc:
                self.failures.append(exc)
            with self.lock:
                self.done += 1

    def wait_for(self, condition, timeout: float = 30) -> None:
        """Keep the load going until ``condition()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met under load"
            assert self.done < self.limit, "load ran out before the condition was met"
            time.sleep(0.02)

    def stop(self) -> int:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        return self.done


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as lines:
        return dict(line.rstrip("\n").split(":\t", 1) for line in lines if ":\t" in line)


def exited(pid: int) -> bool:
    try:
        return status(pid)["State"].startswith("Z")  # a zombie not yet reaped by its parent
    except FileNotFoundError:
        return True


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["--user", "no-such-user-here", "8443", "true"], "no such user; create one"),
        (["--user", "root", "8443", "true"], "that is root"),
        (["--copies", "0", "8443", "true"], "--copies '0'"),
        (["--copies", "3", "--cpus", "0", "8443", "true"], "give one CPU per copy"),
        (["--cpus", "4096", "8443", "true"], "CPU 4096 is not available"),
        (["--cpus", "0,0", "8443", "true"], "names a CPU twice"),
        (["--colour", "8443", "true"], "unknown option"),
        (["::1:8443", "true"], "an IPv6 address goes in brackets: [::1]:8443"),
        (["no-such-host.invalid:8443", "true"], "cannot resolve 'no-such-host.invalid'"),
        (["8443"], "expected [HOST:]PORT and a COMMAND"),
    ],
)
def test_bad_command_lines_exit_2_saying_why(args, says):
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.listen", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "usage: fastsni-listen" in result.stderr


def test_a_host_name_is_resolved(twin, hosts, listens):
    """localhost:PORT listens on the loopback address the name resolves to."""
    first = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0][4][0]
    listen = listens(["localhost:0", sys.executable, "-m", "fastsni"], twin.env, hosts)
    where = re.escape(f"[{first}]" if ":" in first else first)
    port = int(listen.expect(rf"listening on {where}:(\d+)").group(1))
    assert probe(port, "localhost") == UNEXPECTED


# -- privileges ---------------------------------------------------------------------------


AS_NOBODY = {"user": NOBODY, "group": NOBODY, "extra_groups": []}  # subprocess options
SOURCE_TREE = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def python_for_nobody(env: dict[str, str] = SOURCE_TREE) -> str:
    """An interpreter uid 65534 can run and import fastsni with, in ``env`` (sys.executable
    may live under an unreadable /root; an installed wheel is only in its own venv)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            check = subprocess.run([python, "-c", "import fastsni.proxy"], env=env, cwd="/", **AS_NOBODY)
        except OSError:
            continue
        if check.returncode == 0:
            return python
    pytest.skip("no Python interpreter that uid 65534 can run with fastsni importable")


@pytest.fixture
def open_hosts():
    """A hosts directory anyone may search (tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="fastsni-hosts-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


@needs_root
def test_a_port_below_1024_unprivileged_says_what_to_do(open_hosts):
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start == 0:
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0: every port is unprivileged")
    python = python_for_nobody()
    result = subprocess.run(
        [python, "-m", "fastsni.listen", f"127.0.0.1:{start - 1}", "true"],
        env=SOURCE_TREE,
        cwd=open_hosts,
        capture_output=True,
        **AS_NOBODY,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    message = result.stderr
    assert "Permission denied" in message and f"below {start}" in message
    for advice in ("--user USER", "ip_unprivileged_port_start=", "CAP_NET_BIND_SERVICE", ".socket unit"):
        assert advice in message, message


@needs_root
def test_user_needs_root(open_hosts):
    result = subprocess.run(
        [python_for_nobody(), "-m", "fastsni.listen", "--user", "nobody", "127.0.0.1:0", "true"],
        env=SOURCE_TREE,
        cwd=open_hosts,
        capture_output=True,
        text=True,
        timeout=30,
        **AS_NOBODY,
    )
    assert result.returncode == 2
    assert "only root can change user" in result.stderr


def test_a_connection_is_handed_over_with_its_first_bytes():
    """TCP_DEFER_ACCEPT on the socket fastsni-listen binds (tcp(7)): the listener wakes when
    the client's first bytes are there, so the proxy's read at accept finds them; a client
    that stays silent is still handed over, after one SYN-ACK retransmit."""
    from fastsni.listen import bind

    with (
        bind(socket.AF_INET, ("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname(), timeout=5) as speaker,
        socket.create_connection(listener.getsockname(), timeout=5) as silent,
    ):
        assert not select.select([listener], [], [], 0.3)[0], "handed over before any byte"
        speaker.sendall(b"\x16")
        assert select.select([listener], [], [], 5)[0]
        conn, peer = listener.accept()
        with conn:
            assert peer == speaker.getsockname() and conn.recv(1) == b"\x16"
        assert select.select([listener], [], [], 10)[0], "a silent client was never handed over"
        conn, peer = listener.accept()
        with conn:
            assert peer == silent.getsockname()


def test_a_port_in_use_points_to_copies_and_sighup(hosts):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fastsni.listen", f"127.0.0.1:{port}", "true"],
            cwd=hosts,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "Address already in use" in result.stderr and "--copies" in result.stderr


def free_low_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024 on 127.0.0.1")


@needs_root
@pytest.mark.parametrize("mode", [[], ["--copies", "1"]], ids=["exec", "supervised"])
def test_user_binds_as_root_then_serves_as_that_user_with_its_groups(
    twin, open_hosts, listens, backends, mode
):
    python = python_for_nobody(twin.env)
    hello = client_hello(NAME)
    peers: list = []
    backend = backends(open_hosts / NAME / "tls-socket", echo_backend(len(hello), peers))
    backend.path.chmod(0o666)  # connecting needs write permission on the socket
    port = free_low_port()
    listen = listens(
        ["--user", "nobody", *mode, f"127.0.0.1:{port}", python, "-m", "fastsni"],
        twin.env,
        open_hosts,
        python=python,
        extra_groups=[0, 4, 27],  # root's own supplementary groups must not survive
    )
    listen.expect(rf"\({twin.name}, epoll\) listening on 127\.0\.0\.1:{port}")
    echo_once(port, hello)
    proxy_pid, uid, gid = peers[0]
    assert (uid, gid) == (NOBODY, NOBODY)
    processes = [proxy_pid] if not mode else [proxy_pid, listen.process.pid]
    if not mode:
        assert proxy_pid == listen.process.pid  # exec: fastsni-listen became the proxy
    for pid in processes:
        fields = status(pid)
        assert fields["Uid"].split() == [str(NOBODY)] * 4, fields["Uid"]
        assert fields["Gid"].split() == [str(NOBODY)] * 4, fields["Gid"]
        assert fields["Groups"].split() == [str(NOBODY)], fields["Groups"]  # nobody's groups: nogroup
        assert int(fields["CapEff"], 16) == 0


# -- several copies on one socket ---------------------------------------------------------


def test_two_copies_both_serve_under_load_and_a_sighup_leaves_the_other(twin, hosts, listens, backends):
    hello = client_hello(NAME)
    peers: list = []
    backends(hosts / NAME / "tls-socket", echo_backend(len(hello), peers))
    listen, port = start_proxies(listens, ["--copies", "2"], twin, hosts, copies=2)
    first, second = listen.children()
    served = lambda: {pid for pid, _, _ in peers}  # noqa: E731
    # A new copy gets a connection only while the others are busy (EPOLLEXCLUSIVE wakes
    # the first idle waiter): on an idle machine that can take thousands, so the count is
    # generous and the 60 s deadline is what bounds the load.
    load = Load(lambda: echo_once(port, hello), limit=30000)
    try:
        load.wait_for(lambda: {first, second} <= served())  # each copy accepts some
        os.kill(first, signal.SIGHUP)  # the first drains and exits; the second keeps serving
        listen.expect(rf"copy {first} exited with status 0; starting another in 1 s")
        before = load.done
        load.wait_for(lambda: load.done > before + 50)
        assert {pid for pid, _, _ in peers[-20:]} == {second}  # until the new one listens
        listen.expect(r"listening on")  # the first one's replacement
        third = (set(listen.children()) - {second}).pop()
        load.wait_for(lambda: third in served())
    finally:
        done = load.stop()
    assert not load.failures, f"{len(load.failures)} of {done} failed: {load.failures[:3]}"
    assert listen.stop() == 0
    listen.expect(r"every copy has exited; exiting")
    assert all(exited(pid) for pid in (first, second, third))


def tls_get(ca, port: int) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(sock, server_hostname=NAME) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        answer = recv_until_eof(tls)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert answer.endswith(f"backend {NAME} alpn http/1.1\n".encode()), answer


@pytest.mark.parametrize("copies", [1, 2])
def test_sighup_replaces_every_copy_without_failing_a_connection(twin, hosts, listens, backends, ca, copies):
    """Real TLS clients through fastsni to a real TLS backend, while the copies are
    replaced twice: not one connection fails."""
    peers: list = []
    handle = tls_http_backend(ca, NAME)
    backends(hosts / NAME / "tls-socket", lambda conn: (peers.append(peer(conn)), handle(conn)))
    listen, port = start_proxies(listens, ["--copies", str(copies)], twin, hosts, copies=copies)
    load = Load(lambda: tls_get(ca, port))
    generations = [set(listen.children())]
    try:
        for _ in range(2):
            load.wait_for(lambda: len(peers) >= 20)
            listen.process.send_signal(signal.SIGHUP)
            old = generations[-1]
            listen.expect(r"new copies .* ready; SIGHUP to old copies")
            load.wait_for(lambda old=old: old.isdisjoint(listen.children()))  # drained and reaped, under load
            generations.append(set(listen.children()))
            assert len(generations[-1]) == copies
            peers.clear()
            load.wait_for(lambda: generations[-1] <= {pid for pid, _, _ in peers})
    finally:
        done = load.stop()
    assert not load.failures, f"{len(load.failures)} of {done} failed: {load.failures[:3]}"
    assert done >= 40


def test_fasthttpdir_drain_answers_a_connection_whose_first_request_is_still_coming(twin, hosts, proxies):
    """A connection accepted but not yet sent to when SIGHUP arrives is not idle: the
    client has a request on its way, and the draining copy must answer it."""
    (hosts / "a").mkdir()
    backend = UnixBackend(hosts / "a" / "http-socket", echo())
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect(timeout=5) as fresh, proxy.connect(timeout=5) as later:
            [(status, _, _)] = exchange(later, get("a"))  # accepted in order: so was `fresh`
            assert status == 200
            proxy.process.send_signal(signal.SIGHUP)
            proxy.expect("draining 2 connections")
            fresh.sendall(get("a", extra="Connection: close\r\n"))
            answer = recv_until_eof(fresh)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    finally:
        backend.close()


@pytest.mark.usefixtures("uvicorn_backend")
def test_sighup_replaces_fasthttpdir_copies_under_httpx_load(twin, hosts, listens):
    """httpx, a new connection per request, through two copies of fasthttpdir to uvicorn,
    while the copies are replaced: not one request fails."""
    httpx = pytest.importorskip("httpx")
    listen, port = start_proxies(listens, ["--copies", "2"], twin, hosts, copies=2, program="fasthttpdir")

    def get() -> None:
        answer = httpx.get(f"http://127.0.0.1:{port}/up", headers={"Host": "app.example"}, timeout=10)
        assert answer.status_code == 200 and answer.text.startswith("GET /up 0 127.0.0.1"), answer.text

    load = Load(get)
    old = set(listen.children())
    try:
        load.wait_for(lambda: load.done >= 20)
        listen.process.send_signal(signal.SIGHUP)
        listen.expect(r"new copies .* ready; SIGHUP to old copies")
        load.wait_for(lambda: old.isdisjoint(listen.children()))
        before = load.done
        load.wait_for(lambda: load.done >= before + 20)  # the new copies serve
    finally:
        done = load.stop()
    assert not load.failures, f"{len(load.failures)} of {done} failed: {load.failures[:3]}"


def test_an_upgrade_whose_new_copy_fails_keeps_the_old_copy(twin, hosts, listens):
    """The second start of COMMAND fails (as a broken new version would): the old copy
    keeps serving, and is not told to drain."""
    start = f"if [ -e started ]; then exit 3; fi; touch started; exec {sys.executable} -m fastsni"
    listen = listens(["--copies", "1", "127.0.0.1:0", "sh", "-c", start], twin.env, hosts)
    port = int(listen.expect(r"1 copy of .* serving 127\.0\.0\.1:(\d+)").group(1))
    (old,) = listen.children()
    listen.process.send_signal(signal.SIGHUP)
    listen.expect(r"upgrade abandoned: new copy \d+ exited with status 3 before it was ready")
    assert listen.children() == [old]
    assert probe(port) == UNEXPECTED


def test_a_copy_that_is_killed_is_restarted(twin, hosts, listens):
    listen, port = start_proxies(listens, ["--copies", "1"], twin, hosts, copies=1)
    (old,) = listen.children()
    os.kill(old, signal.SIGKILL)
    listen.expect(rf"copy {old} was killed by SIGKILL; starting another in 1 s")
    listen.expect(r"listening on")
    assert probe(port) == UNEXPECTED
    assert listen.children() != [old]


def test_the_copies_stop_when_fastsni_listen_is_killed(twin, hosts, listens):
    """Their stderr is a pipe to fastsni-listen: rather than serve on unable to log, they
    get SIGTERM (PR_SET_PDEATHSIG)."""
    listen, port = start_proxies(listens, ["--copies", "2"], twin, hosts, copies=2)
    copies = listen.children()
    listen.process.kill()
    listen.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while not all(exited(pid) for pid in copies):
        assert time.monotonic() < deadline, "a copy outlived fastsni-listen"
        time.sleep(0.02)


def test_signals_reach_any_command_and_its_start_line_counts_as_ready(hosts, listens):
    """A COMMAND other than the proxies: SIGUSR1 is passed on; "listening on" makes it ready."""
    script = 'trap "echo got USR1 >&2" USR1; echo "sh listening on fd 0" >&2; while :; do sleep 0.05; done'
    listen = listens(["--copies", "1", "127.0.0.1:0", "sh", "-c", script], dict(os.environ), hosts)
    listen.expect(r"1 copy of sh -c .* serving 127\.0\.0\.1:\d+")
    listen.process.send_signal(signal.SIGUSR1)
    listen.expect(r"^got USR1$")
    assert listen.stop() == 0


def test_cpus_pins_each_copy_to_its_own_cpu(twin, hosts, listens):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    listen, port = start_proxies(listens, ["--cpus", ",".join(map(str, cpus))], twin, hosts, copies=len(cpus))
    pinned = sorted(status(pid)["Cpus_allowed_list"] for pid in listen.children())
    assert pinned == [str(cpu) for cpu in cpus]
    assert probe(port) == UNEXPECTED


# -- EPOLLEXCLUSIVE: one copy wakes per new connection ------------------------------------


def asleep_in_epoll(pid: int) -> bool:
    with open(f"/proc/{pid}/wchan") as wchan:
        return "epoll" in wchan.read()


def wakeups(pid: int) -> int:
    """Times the process went to sleep: a copy never woken keeps the same count."""
    return int(status(pid)["voluntary_ctxt_switches"])


def settle(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait (bounded) until every copy sleeps in epoll_wait; their wakeup counts."""
    deadline = time.monotonic() + timeout
    while not all(asleep_in_epoll(pid) for pid in pids):
        if time.monotonic() > deadline:
            if all(Path(f"/proc/{pid}/wchan").read_text() == "0" for pid in pids):
                pytest.skip("/proc/PID/wchan does not say where tasks sleep here")
            raise AssertionError("the copies did not go back to epoll_wait")
        time.sleep(0.005)
    return [wakeups(pid) for pid in pids]


def test_a_new_connection_wakes_one_copy_not_all(twin, hosts, listens):
    """Three copies asleep in epoll_wait on one socket; each new connection wakes exactly
    one of them (without EPOLLEXCLUSIVE on the listener, all three wake)."""
    listen, port = start_proxies(listens, ["--copies", "3"], twin, hosts, copies=3)
    copies = listen.children()
    woken = []
    for _ in range(20):
        before = settle(copies)
        assert probe(port) == UNEXPECTED
        after = settle(copies)
        woken.append(sum(b != a for b, a in zip(before, after, strict=True)))
    assert woken == [1] * 20
