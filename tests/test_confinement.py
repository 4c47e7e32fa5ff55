"""Confinement, seen by strace: each proxy runs under ``strace -f -e trace=%file,%network``
and gets valid and hostile names (by SNI for fastsni, by Host for fasthttpdir), one
connection at a time.  A hostile name must cause no filesystem call at all; a valid name
may touch only paths inside its own entry (relative, first component the name itself)
or, when that entry is absent, its one-label wildcard entry ``*.<rest>``.

The trace is read strictly: every line must parse, every string argument is a path
unless the call is known to carry none, every lookup is relative to the hosts
directory's descriptor (opened at start) and resolved beneath it (openat2
RESOLVE_BENEATH), and no path is absolute: the socket file is connected as N, the
descriptor openat2 opened just before, from /proc/self/fd, the working directory the
proxy moved to at start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
from attack_kit import (
    LEAF,
    PROGRAMS,
    UnixHttpServer,
    drain_log,
    no_tracebacks,
    raw_hello,
    wait_for,
)
from backends import UnixBackend, recv_until_eof

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

NAME = "app.example.test"
LONG = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 bytes: reached through /proc/self/fd

# A label of 64 bytes: RFC 1035 §2.3.4 allows 63, but the README's rules set no label
# limit; it is still one safe path component, so it is looked up (confined) like any name.
LONG_LABEL = "a" * 64 + ".test"
# (what is sent, the directory name it must be confined to)
VALID = {
    "fastsni": [
        (b"app.example.test", NAME),
        (b"APP.Example.TEST", NAME),  # lowercased first
        (b"nobody.example.test", "nobody.example.test"),  # valid but absent: looked up, ENOENT
        (LONG.encode(), LONG),
        (LONG_LABEL.encode(), LONG_LABEL),
    ],
    "fasthttpdir": [
        (b"app.example.test", NAME),
        (b"APP.Example.TEST:8080", NAME),
        (b"app.example.test.", NAME),  # one trailing dot is dropped
        (b"nobody.example.test", "nobody.example.test"),
        (LONG.encode(), LONG),
        (LONG_LABEL.encode(), LONG_LABEL),
    ],
}
HOSTILE_NAMES = [
    b"..",
    b".",
    b"/",
    b"/etc",
    b"a/b",
    b"../etc",
    b"app.example.test/../..",
    b"%2e%2e",
    b"%2e",
    b"..%2f..%2fetc",
    b"a\x00b",
    b"\x00",
    b"app.example.test\x00.evil",
    b"a" * 254,
    ".".join(["a" * 63] * 4).encode(),  # 255 bytes
    "bücher.example".encode(),
    b"\xff\xfe.test",
    b"a\x01b.test",
    b"a\tb.test",
    b"a\nb.test",
    b"a b.test",
    b"a\x7fb.test",
    b"-lead.test",
    b"a..b.test",
    b".app.example.test",
]
HOSTILE = {
    "fastsni": HOSTILE_NAMES + [b"", b"app.example.test."],  # no trailing dot in SNI (RFC 6066 §3)
    "fasthttpdir": HOSTILE_NAMES + [b"", b"[::1]", b"app.example.test:80x", b"app.example.test:80:80"],
}
ABSOLUTE_FORM = [  # the request line names a hostile host while Host names a valid one
    b"GET http://../ HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
    b"GET http://%2e%2e/ HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
    b"GET http://a%2fb/ HTTP/1.1\r\nHost: app.example.test\r\n\r\n",
]

LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (.*)$")
EXITED = re.compile(r"^\d+ +\+\+\+ (exited with|killed by) .* \+\+\+$")
STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
# %network calls that name no path; socket() is allowed only while a valid name connects.
PATHLESS_NETWORK = {"accept", "accept4", "getpeername", "getsockname", "getsockopt", "setsockopt", "shutdown"}


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def connections(trace: Path, pid: int) -> tuple[str, list[list[tuple[str, str, str]]]]:
    """The hosts directory's descriptor, opened at start (O_PATH, "."), and the proxy's
    calls after each successful accept, as (syscall, arguments, result); nothing else
    before the first accept is looked at."""
    hosts = ""
    entered = False  # the working directory made /proc/self/fd
    segments: list[list] = []
    for raw in trace.read_text().splitlines():
        if EXITED.match(raw):
            continue
        match = LINE.match(raw)
        assert match, f"unparsed strace line: {raw!r}"
        if int(match[1]) != pid:
            continue
        call, args, result = match[2], match[3], match[4]
        if not segments and call == "openat" and args.startswith('AT_FDCWD, "\\x2e",') and "O_PATH" in args:
            hosts = result.split()[0]
        if not segments and call == "chdir":  # once the tree is held: connect through "N"
            assert unhex(STRING.findall(args)[0]) == b"/proc/self/fd" and result == "0", (args, result)
            entered = True
        if call in ("accept", "accept4") and not result.startswith("-1"):
            segments.append([])
        if segments:
            segments[-1].append((call, args, result))
    assert hosts, "no O_PATH descriptor of the hosts directory opened at start"
    assert entered, "no chdir to /proc/self/fd at start"
    return hosts, segments


def check_confined(segment, name: str | None, hosts: str) -> list[str]:
    """Every path this connection's calls touched, checked to lie inside ``name``'s entry
    (``name`` None: a hostile name, no path at all): each lookup relative to the hosts
    descriptor ``hosts`` (the entry's lstat, openat2 with RESOLVE_BENEATH), the socket
    reached only as N from /proc/self/fd (the working directory since start) of a
    descriptor openat2 gave."""
    held: set[str] = set()  # O_PATH descriptors openat2 opened for this name
    touched: list[str] = []
    for call, args, result in segment:
        first = args.split(",", 1)[0]
        paths = [unhex(found).decode("latin-1") for found in STRING.findall(args)]
        if call in PATHLESS_NETWORK:
            assert "AF_UNIX" not in args, (call, args)  # only the client's TCP addresses
            continue
        assert name is not None, f"a hostile name caused {call}({args}) = {result}"
        if call == "socket":
            assert first == "AF_UNIX", args
            continue
        assert len(paths) == 1, f"{call}({args})"
        path = paths[0]
        touched.append(path)
        if call == "connect":
            assert path in held, args  # N, from /proc/self/fd: the descriptor openat2 gave
            continue
        if path == "":  # the socket file's owner, from its O_PATH descriptor
            assert call == "newfstatat" and first in held and "AT_EMPTY_PATH" in args, f"{call}({args})"
            continue
        assert first == hosts, f"{call}({args}) not relative to the hosts descriptor {hosts}"
        parts = path.split("/")
        wildcard = "*." + name.partition(".")[2]  # the one entry that may serve name besides its own
        assert parts[0] in (name, wildcard) and ".." not in parts and "" not in parts, (
            f"{call}({args}) outside {name}"
        )
        if call == "openat2":
            assert "RESOLVE_BENEATH" in args and "O_PATH" in args, args
            if not result.startswith("-1"):
                held.add(result.split()[0])
        else:  # the entry itself, not followed
            lstat = call == "newfstatat" and "AT_SYMLINK_NOFOLLOW" in args
            assert lstat and len(parts) == 1, f"{call}({args})"
    return touched


def answer_routed(conn: socket.socket) -> None:
    """A TLS backend stand-in: take the hello, answer, and close only after the proxy
    did (closing with the hello unread would reset the connection)."""
    conn.recv(65536)
    conn.sendall(b"routed")
    conn.shutdown(socket.SHUT_WR)
    recv_until_eof(conn)


def sockets(pid: int) -> int:
    """The proxy's sockets other than the listening one (fd 0)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += fd.name != "0" and os.readlink(fd).startswith("socket:")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


def closed(pid: int) -> None:
    """Wait until the proxy holds no socket for the last connection, so the next one's
    calls cannot mix with its calls."""
    wait_for(lambda: sockets(pid) == 0, 5, "the proxy closing the connection")


def exchange(program: str, proxy, sent: bytes, absolute: bytes | None = None) -> bytes:
    """One connection: send a hello or request naming ``sent``, read the answer to EOF."""
    with proxy.connect() as sock:
        if program == "fastsni":
            sock.sendall(raw_hello(sent))
        else:
            sock.sendall(absolute or b"GET / HTTP/1.1\r\nHost: " + sent + b"\r\nConnection: close\r\n\r\n")
        try:
            return recv_until_eof(sock)
        except ConnectionResetError:
            return b"(reset)"


@pytest.mark.parametrize("program", PROGRAMS)
def test_names_are_confined_to_their_entry(program, twin, hosts, proxies, tmp_path):
    servers = []
    for name in (NAME, LONG):
        path = hosts / name / LEAF[program]
        if program == "fasthttpdir":
            servers.append(UnixHttpServer(path))
        else:
            servers.append(UnixBackend(path, answer_routed))
    trace = tmp_path / "strace.txt"
    wrapper = (
        "strace",
        "-f",
        "-qq",
        "-xx",
        "-s",
        "1024",
        "-e",
        "trace=%file,%network",
        "-e",
        "signal=none",
        "-o",
        str(trace),
    )
    proxy = proxies(program, hosts, twin, wrapper=wrapper)
    tracer = proxy.process.pid
    children = Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()
    assert len(children) == 1, children
    pid = int(children[0])  # the proxy, traced
    try:
        cases: list[tuple[bytes, str | None, bytes]] = []
        for sent, name in VALID[program]:
            cases.append((sent, name, exchange(program, proxy, sent)))
            closed(pid)
        for sent in HOSTILE[program]:
            cases.append((sent, None, exchange(program, proxy, sent)))
            closed(pid)
        if program == "fasthttpdir":
            for request in ABSOLUTE_FORM:
                cases.append((request, None, exchange(program, proxy, b"", request)))
                closed(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        proxy.stop()
        for server in servers:
            server.close()
    hosts_fd, segments = connections(trace, pid)
    assert len(segments) == len(cases), (len(segments), len(cases))
    paths: set[str] = set()
    for (sent, name, answer), segment in zip(cases, segments, strict=True):
        if name is None:
            refused = answer[:1] == b"\x15" if program == "fastsni" else answer.startswith(b"HTTP/1.1 400 ")
            assert refused, (sent, answer)
        elif name in (NAME, LONG):
            assert b"routed" in answer or b"200 OK" in answer, (sent, answer)
        try:
            touched = check_confined(segment, name, hosts_fd)
        except AssertionError as exc:
            raise AssertionError(f"{program} given {sent!r}: {exc}") from None
        assert (name is None) == (not touched), (sent, touched)
        paths.update(touched)
    no_tracebacks(drain_log(proxy))
    hostile = sum(name is None for _, name, _ in cases)
    print(f"\n{program} {twin.name}: {hostile} hostile names, no path; valid ones touched {sorted(paths)}")
