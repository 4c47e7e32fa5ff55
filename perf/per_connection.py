"""Per-connection cost of one proxy tree, in user instructions (callgrind) and system
calls (strace): not a wall-clock benchmark, repeatable on a busy machine.

    python3 perf/per_connection.py TREE [--tool callgrind|strace] [--pure] [--case CASE ...] [--keep DIR]
    python3 perf/per_connection.py TREE --peer PEER [--tool callgrind|strace] [--case CASE ...]

TREE is a source tree with its extensions built in place (``setup.py build_ext
--inplace``); the compiled twin runs (the pure one with ``--pure``).  Each case runs the
proxy twice, for FEW and for MANY sequential connections (or keep-alive requests), and
prints the difference divided by MANY - FEW, so start-up and shut-down cancel out.  Only
loopback and Unix sockets.  The ``-log`` cases give the entry an owner's log socket
(docs/logs.md), read by a receiver.  With ``--keep DIR`` the raw outputs stay in DIR
(``callgrind_annotate --inclusive=yes DIR/callgrind-tls-600.out`` shows where the
instructions go).  With ``--peer`` a peer of perf/bench.py (its perf/perf_peers.py
configuration, routing echo.test) runs instead, for its system calls and user
instructions per connection side by side with ours.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import client_hello, recv_until_eof  # noqa: E402 (a real Python ssl ClientHello, as bench.py uses)
from perf_peers import PEERS, peer_command, write_peer_config  # noqa: E402

FEW, MANY = 100, 600
NAME = "app.example.test"
PEER_NAME = "echo.test"  # the name perf_peers.py's configurations route


HELLOS = {NAME: client_hello(NAME), PEER_NAME: client_hello(PEER_NAME)}
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"

# case: (program, directory entry that serves NAME, files in it, what a client does); the
# files are send-proxy markers, or LOG: the owner's log socket, with a receiver that reads
LOG = "log-socket"
CASES = {
    "tls": ("fastsni", NAME, (), "hello"),
    "tls-v1": ("fastsni", NAME, ("send-proxy-v1",), "hello"),
    "tls-v2": ("fastsni", NAME, ("send-proxy-v2",), "hello"),
    "tls-wildcard": ("fastsni", "*.example.test", (), "hello"),
    "tls-log": ("fastsni", NAME, (LOG,), "hello"),
    "http-keepalive": ("fasthttpdir", NAME, (), "keepalive"),
    "http-conn": ("fasthttpdir", NAME, (), "close"),
    "http-close": ("fasthttpdir", NAME, (), "last"),  # with "Connection: close", as bench.py E-new
    "http-conn-v2": ("fasthttpdir", NAME, ("send-proxy-v2",), "close"),
    "http-keepalive-log": ("fasthttpdir", NAME, (LOG,), "keepalive"),
    # no backend for NAME (only another name's): fastsni's alert, fasthttpdir's 404
    "tls-absent": ("fastsni", "other.test", (), "refused"),
    "http-absent": ("fasthttpdir", "other.test", (), "refused"),
}


def serve_backend(path: Path, program: str, markers: tuple, hello: bytes) -> socket.socket:
    """A Unix-socket backend in this process's threads: OK after the hello, or per request."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1024)

    def handle(conn: socket.socket) -> None:
        with conn:
            if "send-proxy-v2" in markers:  # skip the header: 16 bytes and what they announce
                recv_exactly(conn, int.from_bytes(recv_exactly(conn, 16)[14:16], "big"))
            elif "send-proxy-v1" in markers:  # a v1 line
                while not recv_exactly(conn, 1) == b"\n":
                    pass
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                if program == "fastsni":
                    if len(data) >= len(hello):
                        conn.sendall(b"OK")
                        data = b""
                    continue
                while b"\r\n\r\n" in data:
                    _, data = data.split(b"\r\n\r\n", 1)
                    conn.sendall(HTTP_ANSWER)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def serve_owner_log(path: Path) -> socket.socket:
    """An owner's log receiver at ``path`` that reads every line, in a thread."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))

    def read() -> None:
        try:
            while receiver.recv(65536):
                pass
        except OSError:
            return

    threading.Thread(target=read, daemon=True).start()
    return receiver


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} bytes")
        data += chunk
    return data


def recv_answer(sock: socket.socket) -> bytes:
    """One HTTP answer's body (peers add fields of their own to the head)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += recv_exactly(sock, 1)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    return recv_exactly(sock, length)


def drive(port: int, how: str, count: int, port_is_tls: bool, name: str) -> None:
    request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode()
    hello = HELLOS[name]
    if how == "keepalive":
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for _ in range(count):
                sock.sendall(request)
                assert recv_answer(sock) == b"OK"
        return
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            if how == "hello":
                sock.sendall(hello)
                assert recv_exactly(sock, 2) == b"OK"
            elif how == "refused":
                sock.sendall(hello if port_is_tls else request)
                assert sock.recv(65536)
            elif how == "last":
                sock.sendall(request[:-2] + b"Connection: close\r\n\r\n")
                assert recv_until_eof(sock).endswith(b"\r\n\r\nOK")
            else:
                sock.sendall(request)
                assert recv_answer(sock) == b"OK"


def wait_listening(port: int, process: subprocess.Popen) -> None:
    """Until a peer accepts on ``port`` (30 s at most)."""
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"the peer exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            threading.Event().wait(0.1)
    raise SystemExit("the peer did not listen within 30 s")


def proxy_pid(process: subprocess.Popen, tool: str) -> int:
    """The proxy's own pid: valgrind runs in the process it starts, strace forks it."""
    if tool == "callgrind":
        return process.pid
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return int(children[0])


def run(
    tree: Path, tool: str, case: str, count: int, work: Path, peer: str | None, pure: bool = False
) -> collections.Counter:
    program, entry, markers, how = CASES[case]
    name = NAME if peer is None else PEER_NAME
    if peer is not None:
        entry = PEER_NAME if entry == NAME else entry
    hosts = work / f"hosts-{case}-{count}"
    (hosts / entry).mkdir(parents=True)
    for marker in set(markers) - {LOG}:
        (hosts / entry / marker).write_text("")
    leaf = "tls-socket" if program == "fastsni" else "http-socket"
    backend = serve_backend(hosts / entry / leaf, program, markers, HELLOS[name])
    out = work / f"{tool}-{case}-{count}.out"
    if peer is not None:
        return run_peer(peer, tool, hosts / entry / leaf, how, count, program == "fastsni", out, backend)
    if tool == "callgrind":
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--log-file={out}.log"]
    else:
        wrapper = ["strace", "-f", "-c", "-o", str(out)]
    receivers = [serve_owner_log(hosts / entry / LOG)] if LOG in markers else []
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)  # as fastsni-listen binds it
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    env = dict(os.environ, PYTHONPATH=str(tree), FASTSNI_ALLOW_ROOT="1")
    env.pop("FASTSNI_NO_EXTENSIONS", None)
    if pure:
        env["FASTSNI_NO_EXTENSIONS"] = "1"
    if tool == "callgrind":  # valgrind's translated code needs executable memory the filter refuses
        env["FASTSNI_NO_CONFINE"] = "1"
    process = subprocess.Popen(
        wrapper + [sys.executable, "-m", program],
        stdin=listener.fileno(),
        stderr=subprocess.PIPE,
        cwd=hosts,
        env=env,
        text=True,
    )
    try:
        for line in process.stderr:  # until the proxy says it listens
            if "listening on" in line:
                assert f"({'pure' if pure else 'compiled'}," in line, line
                break
        else:
            raise SystemExit(f"{program} did not start")
        drive(listener.getsockname()[1], how, count, program == "fastsni", name)
    finally:
        os.kill(proxy_pid(process, tool), signal.SIGTERM)
        process.wait(timeout=300)
        listener.close()
        backend.close()
        for receiver in receivers:
            receiver.close()
    return read_counts(out, tool)


def run_peer(
    name: str, tool: str, path: Path, how: str, count: int, tls: bool, out: Path, backend: socket.socket
) -> collections.Counter:
    """The same connections through a peer of perf/bench.py, under strace -f -c, or
    callgrind (every process it forks counted: nginx's worker, for one)."""
    [peer] = [peer for peer in PEERS if peer.name == name]
    work = out.parent / f"{name}-{out.stem}"
    work.mkdir()
    for directory in (out.parent, *path.parents[:2]):  # peers' workers drop root
        directory.chmod(0o755)
    path.chmod(0o777)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    write_peer_config(peer, work, port, {kind: path for kind in ("echo", "source", "source-1m", "http")})
    argv, env, cwd = peer_command(peer, work, port, path.parent.parent)
    if tool == "callgrind":  # workers that dropped root write their own output: let them
        out.parent.chmod(0o1777)
        if peer.kind == "sniproxy":  # callgrind opens its output (0600) before sniproxy drops root
            conf = work / "sniproxy.conf"
            conf.write_text("user root\n" + conf.read_text())
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", f"--log-file={out}.log"]
    else:
        wrapper = ["strace", "-f", "-c", "-o", str(out)]
    process = subprocess.Popen(
        [*wrapper, *argv],
        cwd=cwd,
        env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        umask=0,
    )
    try:
        wait_listening(port, process)
        drive(port, how, count, tls, PEER_NAME)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=300)
        for _ in range(600):  # nginx's worker, say, writes its own output as it exits
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            threading.Event().wait(0.1)
        backend.close()
    if tool == "callgrind":
        counts: collections.Counter = collections.Counter()
        for each in out.parent.glob(f"{out.name}.*[0-9]"):
            counts += read_counts(each, tool)
        return counts  # wait_listening's probe: one connection more in FEW and MANY alike
    counts = read_counts(out, "strace")
    counts["connect"] -= 1  # wait_listening's probe is the one connection more
    return counts


def read_counts(out: Path, tool: str) -> collections.Counter:
    text = out.read_text()
    counts: collections.Counter = collections.Counter()
    if tool == "callgrind":
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        counts["Ir"] = int(total.group(1)) if total else 0  # a process killed before it dumped
        return counts
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1].isidentifier() and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])  # % time, seconds, usecs/call, calls, [errors,] name
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--tool", choices=("callgrind", "strace"), default="callgrind")
    parser.add_argument("--pure", action="store_true", help="run the pure twin (FASTSNI_NO_EXTENSIONS=1)")
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--keep", type=Path, help="an empty directory for the raw outputs")
    parser.add_argument("--peer", choices=sorted(peer.name for peer in PEERS), help="run this peer instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        for case in args.case or CASES:
            few = run(args.tree.resolve(), args.tool, case, FEW, Path(tmp), args.peer, args.pure)
            many = run(args.tree.resolve(), args.tool, case, MANY, Path(tmp), args.peer, args.pure)
            per = {key: (many[key] - few[key]) / (MANY - FEW) for key in sorted(set(few) | set(many))}
            shown = ", ".join(f"{key} {value:.2f}" for key, value in per.items() if abs(value) >= 0.05)
            if args.tool == "callgrind":
                shown = f"{per['Ir'] / 1000:.1f}k user instructions"
            print(f"{case}: {shown}", flush=True)


if __name__ == "__main__":
    main()
