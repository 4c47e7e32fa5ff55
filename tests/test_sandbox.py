"""Self-confinement (fastsni.confine): no_new_privs, Landlock and a seccomp allow-list,
tried from inside a process confined the proxies' way (tests/confined_probe.py, run as
an unprivileged user against things the test holds) and seen from outside a running
proxy (/proc/PID/status, strace of a confined proxy under load: no refused call).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from attack_kit import PROGRAMS, UnixHttpServer, drain_log, no_tracebacks, raw_hello, wait_for
from backends import UnixBackend, reap, recv_until_eof

from fastsni import confine

PROBE = Path(__file__).with_name("confined_probe.py")


def landlock_abi() -> int:
    try:
        return confine.landlock_abi()
    except OSError:
        return 0


ABI = landlock_abi()


# --- the filter's system call numbers, checked against the kernel's own headers ----------


def header_numbers(path: Path) -> dict[str, int]:
    """``__NR_name`` -> number from a unistd header, through asm-generic's __NR3264_ aliases."""
    text = path.read_text()
    numbers = {name: int(nr) for name, nr in re.findall(r"#define __NR_(\w+)\s+(\d+)\b", text)}
    wide = {name: int(nr) for name, nr in re.findall(r"#define __NR3264_(\w+)\s+(\d+)\b", text)}
    for name, alias in re.findall(r"#define __NR_(\w+)\s+__NR3264_(\w+)", text):
        if alias in wide:
            numbers.setdefault(name, wide[alias])
    return numbers


@pytest.mark.parametrize(
    "machine, header",
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),  # arm64 uses the generic table
    ],
)
def test_system_call_numbers_match_the_kernel_headers(machine, header):
    numbers = header_numbers(Path(header))
    _, ours = confine.ARCHES[machine]
    wrong = {name: (nr, numbers.get(name)) for name, nr in ours.items() if numbers.get(name) != nr}
    assert not wrong, wrong
    checked = {"socket", "mmap", "mprotect", "openat", "ioctl", "kill", "tgkill", "prlimit64"}
    missing = [name for name in (*confine.ALLOWED, *checked) if name not in ours and name in numbers]
    assert not missing, missing  # a call the arch has (aarch64 has no epoll_wait) must be named
    # Nothing that spawns, traces, binds or writes files is allowed, whatever the arch.
    never_allowed = "execve execveat clone clone3 fork vfork ptrace bind listen unlinkat mkdirat renameat2"
    for never in never_allowed.split():
        assert never not in confine.ALLOWED and never not in ours, never


def test_the_filter_assembles_for_both_arches():
    for machine in confine.ARCHES:
        program, calls = confine.seccomp_program(machine, 4242)
        assert len(program) % 8 == 0 and len(program) // 8 < 4096  # BPF_MAXINSNS
        named = [name for name in confine.ALLOWED if name in confine.ARCHES[machine][1]]
        assert calls == len(named) + 8


def install_in_a_child(outer: bytes | None) -> tuple[str, dict[str, str]]:
    """Fork; the child installs the proxies' filter (after ``outer``, a filter of its
    own, if given) and reports what install_seccomp said and its /proc status."""
    machine = os.uname().machine
    program, _ = confine.seccomp_program(machine, 0)  # kill/tgkill: not needed here
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(reader)
            confine.prctl(confine.PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
            if outer is not None:
                buf = ctypes.create_string_buffer(outer)
                fprog = ctypes.create_string_buffer(
                    struct.pack("<H6xQ", len(outer) // 8, ctypes.addressof(buf))
                )
                confine.prctl(confine.PR_SET_SECCOMP, confine.SECCOMP_MODE_FILTER, fprog, what="outer")
            how = confine.install_seccomp(program, machine)
            seen = Path("/proc/self/status").read_text()
            os.write(writer, json.dumps([how, seen]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        how, seen = json.loads(pipe.read())
    os.waitpid(pid, 0)
    lines = dict(line.split(":\t", 1) for line in seen.splitlines() if ":\t" in line)
    return how, lines


def test_the_filter_goes_in_by_seccomp_with_spec_allow():
    """seccomp(2) with SECCOMP_FILTER_FLAG_SPEC_ALLOW, so a kernel before 5.16 does not
    force SSBD and STIBP on the proxy (strace shows the flag)."""
    how, seen = install_in_a_child(None)
    assert how == "" and seen["Seccomp"].strip() == "2" and seen["Seccomp_filters"].strip() == "1", (
        how,
        seen,
    )
    code = (
        "import os; from fastsni import confine; m = os.uname().machine; "
        "confine.prctl(confine.PR_SET_NO_NEW_PRIVS, 1, what='nnp'); "
        "print(repr(confine.install_seccomp(confine.seccomp_program(m, os.getpid())[0], m)))"
    )
    traced = subprocess.run(
        ["strace", "-e", "trace=seccomp,prctl", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW," in traced.stderr, traced.stderr
    assert "PR_SET_SECCOMP" not in traced.stderr and traced.stdout.strip() == "''", traced


def test_the_filter_goes_in_by_prctl_where_seccomp_is_refused():
    """Under an outer filter that refuses seccomp(2) with EPERM (as systemd 252's
    @system-service does), prctl(PR_SET_SECCOMP), and the start line says so."""
    machine = os.uname().machine
    arch, numbers = confine.ARCHES[machine]
    outer = confine.Program()
    outer.load(confine.DATA_NR)
    outer.jump(confine.BPF_JEQ_K, numbers["seccomp"], 0, "allow")
    outer.ret(confine.SECCOMP_RET_ERRNO | errno.EPERM)
    outer.label("allow")
    outer.ret(confine.SECCOMP_RET_ALLOW)
    how, seen = install_in_a_child(outer.assemble())
    assert how == ", prctl" and seen["Seccomp"].strip() == "2" and seen["Seccomp_filters"].strip() == "2", (
        how,
        seen,
    )


# --- from inside ---------------------------------------------------------------------------


def run_probe(twin, hosts: Path, tries: list[str]) -> dict:
    """Run the probe confined like a proxy in ``hosts``; its JSON answer.  As root, which
    the filters hold as firmly as any user (tests/test_privileges.py starts the proxies
    as nobody, confined the same way)."""
    env = dict(twin.env)
    env.pop("FASTSNI_NO_CONFINE", None)
    done = subprocess.run(
        [sys.executable, str(PROBE), str(hosts), *tries], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["twin"] == ("fastsni._engine" if twin.name == "compiled" else "fastsni.engine")
    return answer


@pytest.fixture
def world(tmp_path):
    """A directory outside the hosts tree that anyone may write, with a file anyone may read."""
    base = Path(f"/tmp/fastsni-sandbox-{os.getpid()}-{tmp_path.name}")
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    (base / "secret").write_text("outside\n")
    (base / "secret").chmod(0o666)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def tree(world):
    """A hosts tree that nobody may search, with one entry holding a listening socket."""
    hosts = world / "hosts"
    (hosts / "app.test").mkdir(parents=True)
    for path in (hosts, hosts / "app.test"):
        path.chmod(0o777)
    return hosts


def unix_listener(path: str) -> socket.socket:
    """A non-blocking listener at ``path`` (``\\0name`` for the abstract namespace) anyone may connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if not path.startswith("\0"):
        os.chmod(path, 0o777)
    sock.listen(8)
    sock.setblocking(False)
    return sock


class Targets:
    """What the probe tries to reach, held by the test: a TCP listener, an abstract and an
    in-tree Unix listener, and another process of the same user."""

    def __init__(self, tree: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.abstract_name = f"fastsni-sandbox-{os.getpid()}"
        self.abstract = unix_listener("\0" + self.abstract_name)
        self.inside = unix_listener(str(tree / "app.test" / "tls-socket"))
        self.victim = subprocess.Popen(["sleep", "60"])

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for sock in (self.tcp, self.abstract, self.inside):
            sock.close()


@pytest.fixture
def targets(tree):
    held = Targets(tree)
    yield held
    held.close()


def saw_nothing(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_from_inside_everything_outside_the_job_fails(twin, world, tree, targets):
    port, victim = targets.port, targets.victim
    (tree / "app.test" / "index.html").write_text("an owner's file\n")
    (world / "victim").write_text("keep me\n")
    interpreter_file = os.__file__
    tries = {
        # must fail:
        f"write:{world}/created": "EPERM",
        f"write:{tree}/app.test/created": "EPERM",
        f"unlink:{world}/victim": "EPERM",
        f"mkdir:{world}/made": "EPERM",
        f"tcp-connect:{port}": "EPERM",
        "tcp-bind:0": "EPERM",
        f"udp:{port}": "EPERM",
        "exec:/bin/true": "EPERM",
        "fork:": "EPERM",
        f"kill:{victim.pid}": "EPERM",
        f"ptrace:{victim.pid}": "EPERM",
        "exec-memory:": "EPERM",
        # must work: the interpreter's files, the tree's sockets, its own signals
        f"read:{interpreter_file}": "ok",
        f"unix-connect:{tree}/app.test/tls-socket": "ok",
        "signal-self:": "ok",
    }
    if ABI:
        tries[f"read:{world}/secret"] = "EACCES"  # Landlock: outside the interpreter's files
        tries[f"read:{tree}/app.test/index.html"] = "EACCES"  # the tree too, though on sys.path
    if ABI >= 6:
        tries[f"unix-connect:@{targets.abstract_name}"] = "EPERM"  # scoped
    answer = run_probe(twin, tree, list(tries))
    assert answer["results"] == tries, answer
    assert answer["confined"].startswith("confined: no_new_privs "), answer
    assert "seccomp(" in answer["confined"], answer
    if ABI:
        assert f"landlock(abi {ABI}: fs read-only" in answer["confined"], answer
    # and the other ends saw nothing, nothing changed
    assert saw_nothing(targets.tcp) and saw_nothing(targets.abstract)
    assert not (world / "created").exists() and not (tree / "app.test" / "created").exists()
    assert (world / "victim").read_text() == "keep me\n" and not (world / "made").exists()
    assert victim.poll() is None
    assert not saw_nothing(targets.inside)  # the control connected


@pytest.mark.skipif(ABI < 1, reason="no Landlock in this kernel")
def test_from_inside_landlock_alone_holds(twin, world, tree, targets):
    """Without the seccomp filter, Landlock alone still refuses writes and outside reads,
    and by its ABI TCP (4) and abstract sockets and signals outside the process (6)."""
    port, victim = targets.port, targets.victim
    tries = {
        f"write:{world}/created": "EACCES",
        f"mkdir:{world}/made": "EACCES",
        f"read:{world}/secret": "EACCES",
        f"read:{os.__file__}": "ok",
        f"unix-connect:{tree}/app.test/tls-socket": "ok",
    }
    if ABI >= 4:
        tries[f"tcp-connect:{port}"] = "EACCES"
        tries["tcp-bind:0"] = "EACCES"
    if ABI >= 6:
        tries[f"unix-connect:@{targets.abstract_name}"] = "EPERM"
        tries[f"kill:{victim.pid}"] = "EPERM"
    answer = run_probe(twin, tree, ["--landlock-only", *tries])
    assert answer["results"] == tries, answer
    assert saw_nothing(targets.tcp) and saw_nothing(targets.abstract) and not (world / "created").exists()


def test_from_inside_a_socket_outside_the_tree(twin, world, tree):
    """Landlock ABI 9 (LANDLOCK_ACCESS_FS_RESOLVE_UNIX) refuses a connect outside the tree;
    before it the kernel cannot, and the proxies' own lookup (openat2 RESOLVE_BENEATH,
    tests/test_isolation.py) is what keeps them inside."""
    outside = unix_listener(str(world / "outside.sock"))
    try:
        answer = run_probe(twin, tree, [f"unix-connect:{world}/outside.sock"])
        result = answer["results"][f"unix-connect:{world}/outside.sock"]
        if ABI >= 9:
            assert result == "EACCES" and saw_nothing(outside), answer
            assert "unix beneath the tree" in answer["confined"]
        else:
            assert result == "ok", answer  # as documented: the start line says so
            assert "unix anywhere (needs abi 9)" in answer["confined"] or not ABI, answer
            pytest.skip(f"Landlock ABI {ABI} cannot restrict connecting to pathname Unix sockets (needs 9)")
    finally:
        outside.close()


# --- from outside: a running proxy ---------------------------------------------------------


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_running_proxy_is_confined(program, twin, hosts, proxies):
    proxy = proxies(program, hosts, twin)
    line = proxy.log[-1]
    assert "; confined: no_new_privs " in line and "seccomp(" in line, line
    if ABI:
        assert f"landlock(abi {ABI}: fs read-only" in line, line
    seen = status(proxy.process.pid)
    assert seen["NoNewPrivs"].strip() == "1" and seen["Seccomp"].strip() == "2", seen
    assert seen["Seccomp_filters"].strip() == "1", seen


@pytest.mark.parametrize("program", PROGRAMS)
def test_the_escape_hatch_is_reported(program, twin, hosts, proxies, monkeypatch):
    monkeypatch.setenv("FASTSNI_NO_CONFINE", "1")
    proxy = proxies(program, hosts, twin)
    assert proxy.log[-1].endswith("; not confined (FASTSNI_NO_CONFINE is set)"), proxy.log
    assert status(proxy.process.pid)["Seccomp"].strip() == "0"


def answer_routed(conn: socket.socket) -> None:
    """A TLS backend stand-in: read the hello, answer, close."""
    conn.recv(65536)
    conn.sendall(b"routed")


def tls_round(proxy, name: bytes) -> bytes:
    with proxy.connect() as sock:
        sock.sendall(raw_hello(name))
        try:
            return recv_until_eof(sock)
        except ConnectionResetError:
            return b"(reset)"


def http_round(proxy, request: bytes) -> bytes:
    with proxy.connect() as sock:
        sock.sendall(request)
        try:
            return recv_until_eof(sock)
        except ConnectionResetError:
            return b"(reset)"


ROUNDS = 60  # of each kind of connection: enough to reach every path, bounded


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
@pytest.mark.parametrize("program", PROGRAMS)
def test_no_call_is_refused_under_load(program, twin, hosts, proxies, tmp_path):
    """strace -f from the start: after the filter is installed, no call fails with EPERM
    (a refused call in normal operation would be a hole in the allow-list), through routed,
    absent, refused and malformed connections, SIGUSR1 counters and the SIGHUP drain."""
    leaf = "tls-socket" if program == "fastsni" else "http-socket"
    (hosts / "refused.test").mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(hosts / "refused.test" / leaf))  # bound, never listening: ECONNREFUSED
    dead.close()
    (hosts / "proxied.test").mkdir()
    (hosts / "proxied.test" / "send-proxy-v2").touch()
    servers = []
    for name in ("app.test", "proxied.test"):
        path = hosts / name / leaf
        servers.append(UnixHttpServer(path) if program == "fasthttpdir" else UnixBackend(path, answer_routed))
    trace = tmp_path / "strace.txt"
    wrapper = ("strace", "-f", "-qq", "-e", "signal=none", "-o", str(trace))
    proxy = proxies(program, hosts, twin, wrapper=wrapper)
    tracer = proxy.process.pid
    pid = int(Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()[0])
    try:
        for _ in range(ROUNDS):
            if program == "fastsni":
                assert tls_round(proxy, b"app.test").endswith(b"routed")
                tls_round(proxy, b"proxied.test")
                assert tls_round(proxy, b"absent.test").startswith(b"\x15")  # an alert
                assert tls_round(proxy, b"refused.test").startswith(b"\x15")
                with proxy.connect() as sock:
                    sock.sendall(b"\x16\x03\x01\x00\x05hello")
                    recv_until_eof(sock)
            else:
                get = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                assert http_round(proxy, get % b"app.test").startswith(b"HTTP/1.1 200")
                http_round(proxy, get % b"proxied.test")
                assert http_round(proxy, get % b"absent.test").startswith(b"HTTP/1.1 404")
                assert http_round(proxy, get % b"refused.test").startswith(b"HTTP/1.1 503")
                assert http_round(proxy, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
                keep = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"
                assert http_round(proxy, keep * 3 + get % b"app.test").count(b"HTTP/1.1 200") == 4
        os.kill(pid, signal.SIGUSR1)
        proxy.expect("counters")
        idle = proxy.connect()  # held open across the drain
        os.kill(pid, signal.SIGHUP)
        proxy.expect("draining")
        idle.close()
        wait_for(lambda: proxy.process.poll() is not None, 30, "the drained proxy to exit")
    finally:
        reap(proxy.process, 15)
        for server in servers:
            server.close()
    log = drain_log(proxy)
    no_tracebacks(log)
    lines = trace.read_text().splitlines()
    installed = next(
        i for i, line in enumerate(lines) if "SECCOMP_SET_MODE_FILTER" in line or "PR_SET_SECCOMP" in line
    )
    assert "= 0" in lines[installed], lines[installed]
    after = [line for line in lines[installed + 1 :] if line.startswith(str(pid))]
    refused = [line for line in after if "= -1 EPERM" in line]
    assert not refused, refused[:20]
    accepted = sum(1 for line in after if "accept4(" in line and "= -1" not in line)
    assert accepted >= ROUNDS * 5, accepted


# --- the fuzz corpora, replayed against confined proxies -----------------------------------

FUZZ = Path(__file__).with_name("fuzz")


def corpus(name: str) -> list[bytes]:
    paths = sorted((FUZZ / "corpus" / name).iterdir()) + sorted((FUZZ / "regressions" / name).glob("*"))
    return [path.read_bytes() for path in paths]


def replay(proxy, sent: bytes) -> None:
    """One connection: send, half-close (so no deadline is waited out), read to the end."""
    with proxy.connect() as sock:
        try:
            sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            recv_until_eof(sock)
        except (ConnectionResetError, BrokenPipeError):
            pass


def still_confined_and_clean(proxy) -> None:
    seen = status(proxy.process.pid)
    assert proxy.process.poll() is None and seen["Seccomp"].strip() == "2", seen
    log = drain_log(proxy)
    no_tracebacks(log)
    assert not [line for line in log if "EPERM" in line], log  # a call the filter refused


def test_fuzz_corpora_replayed_against_confined_proxies(twin, hosts, proxies):
    """Every seed and regression of the three fuzz corpora (hellos, requests, backend
    responses) through a running confined proxy: it answers each and nothing is refused."""
    sys.path.insert(0, str(FUZZ))
    try:
        from fuzz_hello import stream_of
        from fuzzing import cut, split_pattern
    finally:
        sys.path.remove(str(FUZZ))
    for name in ("a.example", "h", "example.com"):
        (hosts / name).mkdir()
    echo = [UnixBackend(hosts / name / "tls-socket", answer_routed) for name in ("a.example", "example.com")]
    http = [UnixHttpServer(hosts / name / "http-socket") for name in ("h", "example.com")]
    responses = corpus("response")
    answers = iter(responses)

    def answer_from_corpus(conn: socket.socket) -> None:
        conn.recv(65536)
        sizes, rest = split_pattern(next(answers, b""))
        for piece in cut(rest[1:], sizes):
            conn.sendall(piece)

    raw = UnixBackend(hosts / "a.example" / "http-socket", answer_from_corpus)
    try:
        fastsni = proxies("fastsni", hosts, twin)
        for data in corpus("hello"):
            replay(fastsni, b"".join(stream_of(data)))
        still_confined_and_clean(fastsni)
        fasthttpdir = proxies("fasthttpdir", hosts, twin)
        for data in corpus("request"):
            replay(fasthttpdir, split_pattern(data)[1][1:])
        for _ in responses:
            replay(fasthttpdir, b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        still_confined_and_clean(fasthttpdir)
    finally:
        for server in (*echo, *http, raw):
            server.close()


def test_perf_seccomp_cost_measures_three_children():
    """perf/seccomp_cost.py, a bounded slice: a figure for each of its three children."""
    script = Path(__file__).resolve().parent.parent / "perf" / "seccomp_cost.py"
    ran = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--count", "2000"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    line = r"^(no filter|proxies' filter|allow-all filter) +([\d.]+) ns per read"
    figures = re.findall(line, ran.stdout, re.M)
    assert [name for name, _ in figures] == ["no filter", "proxies' filter", "allow-all filter"], ran.stdout
    assert all(float(value) > 0 for _, value in figures), ran.stdout
