"""Tenant isolation (issue 16), end to end on hostile hosts trees, for both proxies and
both twins: no path leads out of the hosts tree, and a name is served only through its
owner's socket.

Each case is a small tree (directories, symlinks and their owners, backends) and the
names asked of the proxy, in order, each either routed to one backend or refused with a
log line.  Every backend is a child process that switches to its owner's uid before it
binds, so the socket file and SO_PEERCRED are that uid's; it counts the connections it
accepted, drained from its queue when asked, so "never connected" is exact.  Next to the
tree, a listener outside it (in this process, non-blocking) must never see a connection.

The proxy runs as the test's user (root in CI, FASTSNI_ALLOW_ROOT=1: it could connect
anywhere, so only the rules refuse) and, as root, once more dropped to nobody (neither
root nor an owner): the rules hold without privileges.  Other owners need root (setuid,
lchown); without it only the cases owned by the test's user run.

Also the start-up refusal: without openat2(2) (a seccomp filter answers ENOSYS) or
without /proc/self/fd (a private mount namespace hides /proc), the proxy exits 1 with
one line saying why.
"""

from __future__ import annotations

import ctypes.util
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack_kit import LEAF, PROGRAMS, drain_log, http_get, no_tracebacks, raw_hello
from backends import reap, recv_until_eof
from test_privileges import AS_NOBODY

TESTS = Path(__file__).resolve().parent
IS_ROOT = os.geteuid() == 0
ALICE, BOB, ROOT = 51001, 51002, 0  # owners; no /etc/passwd entry needed
ALERT_112 = bytes.fromhex("15030300020270")  # unrecognized_name: fastsni's "no backend"
LONG = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 bytes: connected through /proc/self/fd
OUT = "{outside}"  # in a link target: the absolute path of the directory outside the tree
EXDEV = "leads out of the hosts tree (EXDEV): not followed"


def foreign(socket_uid: int, entry_uid: int) -> str:
    return f"socket owned by uid {socket_uid}, not by the entry's owner uid {entry_uid}: not served"


# A tree is a tuple of these, built in order; "@" in a path stands for the proxy's leaf
# (tls-socket or http-socket).  Owner None: the test's user, nothing changed.
@dataclass(frozen=True)
class Dir:
    path: str
    owner: int | None = None
    mode: int = 0o755


@dataclass(frozen=True)
class Link:
    path: str
    target: str
    owner: int | None = None  # the link's own owner (lchown): the entry's owner if it is one


@dataclass(frozen=True)
class Sock:
    path: str
    owner: int | None = None  # the uid the backend runs as, from before bind


@dataclass(frozen=True)
class Routed:
    backend: str  # the Sock path that must answer


@dataclass(frozen=True)
class Refused:
    log: str  # what the proxy's log line says


@dataclass(frozen=True)
class Case:
    tree: tuple
    asks: tuple  # (name, Routed | Refused), asked in this order


ALICE_RELEASE = (  # the README's deploy layout: alice's link to alice's release, alice's socket
    Dir("_releases"),
    Dir("_releases/alice-v3", ALICE),
    Sock("_releases/alice-v3/@", ALICE),
    Link("alice.test", "_releases/alice-v3", ALICE),
)
ALICE_SITE = (Dir("alice.test", ALICE), Sock("alice.test/@", ALICE))
TO_ALICE_RELEASE = ("alice.test", Routed("_releases/alice-v3/@"))
TO_ALICE_SITE = ("alice.test", Routed("alice.test/@"))

ESCAPES = {
    "socket link absolute": Case(
        (Dir("abs.test"), Link("abs.test/@", OUT + "/@")),
        (("abs.test", Refused(EXDEV)),),
    ),
    "socket link relative": Case(
        (Dir("rel.test"), Link("rel.test/@", "../../outside/@")),
        (("rel.test", Refused(EXDEV)),),
    ),
    "socket link out and back in": Case(  # a ".." above the tree is refused even if it comes back
        (
            Dir("inner.test"),
            Sock("inner.test/@"),
            Dir("back.test"),
            Link("back.test/@", "../../hosts/inner.test/@"),
        ),
        (("back.test", Refused(EXDEV)), ("inner.test", Routed("inner.test/@"))),
    ),
    "entry link absolute": Case((Link("out.test", OUT),), (("out.test", Refused(EXDEV)),)),
    "entry link relative": Case((Link("out.test", "../outside"),), (("out.test", Refused(EXDEV)),)),
    "wildcard link": Case((Link("*.wild.test", "../outside"),), (("x.wild.test", Refused(EXDEV)),)),
    "long name linked outside": Case((Dir(LONG), Link(LONG + "/@", OUT + "/@")), ((LONG, Refused(EXDEV)),)),
}
FOREIGN = {
    "foreign socket in a writable entry": Case(
        (Dir("alice.test", ALICE, 0o777), Sock("alice.test/@", BOB)),
        (("alice.test", Refused(foreign(BOB, ALICE))),),
    ),
    "entry linked to another owner's release": Case(
        (*ALICE_RELEASE, Link("mirror.test", "_releases/alice-v3", BOB)),
        (("mirror.test", Refused(foreign(ALICE, BOB))), TO_ALICE_RELEASE),
    ),
    "socket linked to another owner's sibling": Case(
        (*ALICE_SITE, Dir("bob.test", BOB), Link("bob.test/@", "../alice.test/@", BOB)),
        (("bob.test", Refused(foreign(ALICE, BOB))), TO_ALICE_SITE),
    ),
    "wildcard linked to another owner's release": Case(
        (*ALICE_RELEASE, Link("*.bob.test", "_releases/alice-v3", BOB)),
        (("x.bob.test", Refused(foreign(ALICE, BOB))), TO_ALICE_RELEASE),
    ),
}
ROUTED = {
    "owner's deploy layout": Case(ALICE_RELEASE, (TO_ALICE_RELEASE,)),
    "socket link to a sibling of the same owner": Case(
        (*ALICE_SITE, Dir("www.alice.test", ALICE), Link("www.alice.test/@", "../alice.test/@", ALICE)),
        (("www.alice.test", Routed("alice.test/@")), TO_ALICE_SITE),
    ),
    "root's entry, another uid's socket": Case(  # the documented way to serve another uid's backend
        (
            Dir("_releases"),
            Dir("_releases/bob-v1", BOB),
            Sock("_releases/bob-v1/@", BOB),
            Link("team.test", "_releases/bob-v1", ROOT),
        ),
        (("team.test", Routed("_releases/bob-v1/@")),),
    ),
    "wildcard entry of one owner": Case(
        (Dir("*.alice.test", ALICE), Sock("*.alice.test/@", ALICE)),
        (("x.alice.test", Routed("*.alice.test/@")),),
    ),
    "long name": Case((Dir(LONG, ALICE), Sock(LONG + "/@", ALICE)), ((LONG, Routed(LONG + "/@")),)),
}
CASES = {**ESCAPES, **FOREIGN, **ROUTED}
assert len(CASES) == len(ESCAPES) + len(FOREIGN) + len(ROUTED), "a label used twice"

# The backend: started as root, it switches uid before it binds (the interpreter may live
# where other uids cannot read it, so everything is imported first).  It answers a TLS
# stand-in (the hello read, one line back) or plain HTTP; a line on stdin makes it
# accept what is queued and print how many connections it accepted so far.
BACKEND = """
import os, selectors, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from backends import http_backend, recv_until_eof
directory, name, program, uid = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
os.chdir(directory)
if uid != os.geteuid():
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.umask(0)  # any uid may connect: only the proxies' rules refuse
label = f"uid {os.getuid()}"
answer = f"backend {label}\\n".encode()

def tls_stand_in(conn):
    conn.recv(65536)
    conn.sendall(answer)
    conn.shutdown(socket.SHUT_WR)
    recv_until_eof(conn)

handle = http_backend(label) if program == "fasthttpdir" else tls_stand_in

def serve(conn):
    conn.settimeout(30)
    try:
        with conn:
            handle(conn)
    except OSError:
        pass

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(name)
listener.listen(64)
listener.setblocking(False)
accepted = 0

def take():
    global accepted
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        accepted += 1
        conn.setblocking(True)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

print("ready", flush=True)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
selector.register(sys.stdin, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if key.fileobj is listener:
            take()
        elif not sys.stdin.readline():
            sys.exit(0)
        else:
            take()
            print(accepted, flush=True)
"""


class UidBackend:
    """A backend process at ``path`` running as ``uid`` (None: the test's user)."""

    def __init__(self, path: Path, program: str, uid: int | None) -> None:
        self.path = path
        self.uid = os.geteuid() if uid is None else uid
        command = [
            sys.executable,
            "-c",
            BACKEND,
            str(TESTS),
            str(path.parent),
            path.name,
            program,
            str(self.uid),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self) -> bytes:
        return f"backend uid {self.uid}\n".encode()

    def readline(self, timeout: float = 20) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"the backend at {self.path.name} said nothing in {timeout} s"
        line = self.process.stdout.readline()
        assert line, f"the backend at {self.path.name} exited: {self.process.wait()}"
        return line.strip()

    def ready(self) -> None:
        assert self.readline() == "ready"
        assert os.lstat(self.path).st_uid == self.uid  # the socket file is the backend's uid's

    def connections(self) -> int:
        """Connections accepted so far, including any still queued."""
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self.readline())

    def close(self) -> None:
        self.process.stdin.close()
        reap(self.process)


class Tree:
    """A hosts directory and a directory beside it (outside the tree) under /tmp, both
    searchable by every uid (pytest's tmp_path is root's only)."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.top = Path(tempfile.mkdtemp(prefix="fastsni-isolation-"))
        self.top.chmod(0o755)
        self.hosts = self.top / "hosts"
        self.outside = self.top / "outside"
        self.hosts.mkdir(mode=0o755)
        self.outside.mkdir(mode=0o755)
        self.backends: dict[str, UidBackend] = {}
        # What an escape would reach: any uid could connect to it, and its owner is the
        # entries' (the test's user), so only leaving the tree is wrong with it.
        self.escaped = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.escaped.bind(str(self.outside / LEAF[program]))
        os.chmod(self.outside / LEAF[program], 0o666)
        self.escaped.listen(16)
        self.escaped.setblocking(False)

    def build(self, tree: tuple) -> None:
        leaf = LEAF[self.program]
        for item in tree:
            path = self.hosts / item.path.replace("@", leaf)
            if isinstance(item, Dir):
                path.mkdir(mode=item.mode)
                path.chmod(item.mode)  # whatever the umask
                if item.owner is not None:
                    os.chown(path, item.owner, item.owner)
            elif isinstance(item, Link):
                path.symlink_to(item.target.replace("@", leaf).replace(OUT, str(self.outside)))
                if item.owner is not None:
                    os.lchown(path, item.owner, item.owner)
            else:
                self.backends[item.path] = UidBackend(path, self.program, item.owner)
        for backend in self.backends.values():
            backend.ready()

    def nothing_escaped(self) -> None:
        try:
            conn, _ = self.escaped.accept()
        except BlockingIOError:
            return
        conn.close()
        raise AssertionError("the listener outside the hosts tree got a connection")

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.escaped.close()
        shutil.rmtree(self.top)


@pytest.fixture
def trees():
    made: list[Tree] = []

    def make(program: str) -> Tree:
        made.append(Tree(program))
        return made[-1]

    yield make
    for tree in made:
        tree.close()


def ask(program: str, proxy, name: str):
    """One connection naming ``name``: fastsni's whole answer, or fasthttpdir's (status, body)."""
    if program == "fasthttpdir":
        return http_get(proxy.port, name)
    with proxy.connect() as sock:
        sock.sendall(raw_hello(name.encode()))
        return recv_until_eof(sock)


def refused(program: str) -> object:
    return ALERT_112 if program == "fastsni" else (404, b"404 Not Found\n")


def routed(program: str, backend: UidBackend) -> object:
    return backend.answer() if program == "fastsni" else (200, backend.answer())


def needs_other_uids(case: Case) -> bool:
    return any(item.owner is not None for item in case.tree)


def case_params() -> list:
    """One param per case (a list: pytest will refuse a generator here)."""
    params = []
    for label, case in CASES.items():
        marks = []
        if needs_other_uids(case) and not IS_ROOT:
            marks.append(
                pytest.mark.skip(reason="needs root: backends switch to other uids, entries are lchown'd")
            )
        params.append(pytest.param(case, id=label, marks=marks))
    return params


# The proxy as the test's user, or (as root) dropped to nobody once everything is imported
# (test_privileges.AS_NOBODY, which reads the program from its first argument; ctypes too:
# the pure twin's openat2 imports it at start).  The Proxy appends "python -m program".
PROXY_USERS = [
    pytest.param(None, id="test-user"),
    pytest.param(
        "nobody",
        id="nobody",
        marks=pytest.mark.skipif(not IS_ROOT, reason="needs root to drop the proxy to nobody"),
    ),
]


@pytest.mark.parametrize("user", PROXY_USERS)
@pytest.mark.parametrize("case", case_params())
@pytest.mark.parametrize("program", PROGRAMS)
def test_isolation(program, case, user, twin, trees, proxies):
    tree = trees(program)
    tree.build(case.tree)
    wrapper = (sys.executable, "-c", "import ctypes\n" + AS_NOBODY, program) if user else ()
    proxy = proxies(program, tree.hosts, twin, wrapper=wrapper)
    expected = {path: 0 for path in tree.backends}
    for name, outcome in case.asks:
        got = ask(program, proxy, name)
        if isinstance(outcome, Refused):
            assert got == refused(program), (name, got)
            line = proxy.expect(f" {name}: ")
            assert outcome.log in line, line
        else:
            backend = tree.backends[outcome.backend]
            assert got == routed(program, backend), (name, got)
            expected[outcome.backend] += 1
        tree.nothing_escaped()
        seen = {path: backend.connections() for path, backend in tree.backends.items()}
        assert seen == expected, f"after {name}: connections {seen}, expected {expected}"
    assert proxy.process.poll() is None
    no_tracebacks(drain_log(proxy))


# Start-up without openat2 or without /proc/self/fd: a wrapper makes the kernel so, then
# execs the proxy.  openat2: a seccomp filter (libseccomp, as tests/unit_sandbox.py loads
# them) answers ENOSYS, as a kernel before 5.6 or a container runtime's filter would.
# /proc: a private mount namespace with an empty tmpfs on /proc (root only; exit 77 if
# the kernel refuses the namespace).
WITHOUT = """
import errno, os, sys
sys.path.insert(0, sys.argv[1])
import unit_sandbox as sandbox
if sys.argv[2] == "openat2":
    refuse = sandbox.Filter(sandbox.SCMP_ACT_ALLOW)
    refuse.rule(sandbox.scmp_errno(errno.ENOSYS), "openat2")
    refuse.load()
else:
    try:
        sandbox.check(sandbox.libc.unshare(sandbox.CLONE_NEWNS), "unshare")
        sandbox.mount("none", "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
        sandbox.mount("tmpfs", "/proc", "tmpfs", 0)
    except OSError as exc:
        print(exc, file=sys.stderr)
        sys.exit(77)
os.execv(sys.argv[3], sys.argv[3:])
"""
WHY = {  # the cause, as the one line names it
    "openat2": "openat2(2) with RESOLVE_BENEATH failed (ENOSYS)",
    "proc": "/proc/self/fd is not there (ENOENT)",
}
WITHOUT_PARAMS = [
    pytest.param(
        "openat2",
        marks=pytest.mark.skipif(
            not ctypes.util.find_library("seccomp"), reason="needs libseccomp (libseccomp2)"
        ),
    ),
    pytest.param("proc", marks=pytest.mark.skipif(not IS_ROOT, reason="needs root for a mount namespace")),
]


@pytest.mark.parametrize("missing", WITHOUT_PARAMS)
@pytest.mark.parametrize("program", PROGRAMS)
def test_refuses_to_start_without(program, missing, twin, hosts):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        done = subprocess.run(
            [sys.executable, "-c", WITHOUT, str(TESTS), missing, sys.executable, "-m", program],
            stdin=listener.fileno(),
            cwd=hosts,
            env=twin.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    if done.returncode == 77:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{program}: {WHY[missing]}: ") and lines[0].endswith("; refusing to start"), (
        lines
    )
