"""How many copies of a proxy wake up for one new connection, counted with strace.

N copies of fastsni (or fasthttpdir) share one listening socket on 127.0.0.1, as under
``fastsni-listen --copies N``.  COUNT connections are made one after another; each sends
a plain-HTTP line, which fastsni answers with one TLS alert (fasthttpdir: a 400) and
closes.  First, with every copy asleep in epoll_wait before each connection, the copies
whose voluntary context switches changed are counted: the copies woken.  Then strace
follows every copy (``-ff``: one trace per process) for COUNT more connections, counting
per copy the returns of epoll_wait, the accepts that got a connection and those that
found none (EAGAIN).  strace undercounts the wakeups: a copy woken for a connection
another copy already took goes back to sleep inside epoll_wait, unseen.  Without
EPOLLEXCLUSIVE on the listener every copy wakes for every connection; with it, one does.

    python3 perf/wakeups.py --copies 4 --connections 200 [--program fasthttpdir] [--pure]

strace counts are repeatable under load, so this may run at any time (it is no benchmark).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALL = re.compile(r"^(epoll_wait|epoll_pwait2?|accept4?)\(.*\)\s+=\s+(-?\d+)")
PROBE = b"GET / HTTP/1.0\r\n\r\n"  # fastsni: not TLS, one alert; fasthttpdir: no Host, 400
START_TIMEOUT = 20.0  # seconds for a copy to print its start line, for strace to attach


def environment(pure: bool) -> dict[str, str]:
    env = dict(os.environ, FASTSNI_ALLOW_ROOT="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("FASTSNI_NO_EXTENSIONS", None)
    if pure:
        env["FASTSNI_NO_EXTENSIONS"] = "1"
    return env


def start_copy(program: str, listener: socket.socket, hosts: str, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", program],
        stdin=listener.fileno(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=hosts,
        env=env,
        text=True,
        start_new_session=True,
    )
    line = process.stderr.readline()  # blocking, but the copy prints it or dies (EOF)
    if "listening on" not in line:
        raise SystemExit(f"{program} did not start: {line!r}")
    return process


def attach_strace(pids: list[int], prefix: str) -> subprocess.Popen:
    """strace -ff on every pid; returns once each is attached."""
    calls = "trace=epoll_wait,epoll_pwait,epoll_pwait2,accept,accept4"
    command = ["strace", "-ff", "-o", prefix, "-e", calls]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    attached = 0
    deadline = time.monotonic() + START_TIMEOUT
    while attached < len(pids) and time.monotonic() < deadline:
        line = tracer.stderr.readline()
        if not line:
            break
        attached += "attached" in line
    if attached < len(pids):
        tracer.kill()
        raise SystemExit(f"strace attached to {attached} of {len(pids)} copies")
    return tracer


def connect_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(PROBE)
        while sock.recv(4096):
            pass


def count(trace: Path) -> dict[str, int]:
    figures = {"wakeups": 0, "accepted": 0, "empty accepts": 0}
    for line in trace.read_text().splitlines():
        match = CALL.match(line)
        if not match:
            continue
        call, result = match.group(1), int(match.group(2))
        if call.startswith("epoll"):
            figures["wakeups"] += result > 0
        elif result >= 0:
            figures["accepted"] += 1
        elif "EAGAIN" in line:
            figures["empty accepts"] += 1
    return figures


def asleep_in_epoll_wait(pid: int) -> bool:
    with open(f"/proc/{pid}/wchan") as wchan:
        return "epoll" in wchan.read()


def context_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise ValueError(f"no voluntary_ctxt_switches for {pid}")


def copies_woken(pids: list[int], port: int, connections: int) -> float:
    """Per connection, how many copies went back to sleep after it (without strace, whose
    stops are context switches too): each is first left asleep in epoll_wait."""
    woken = 0
    for _ in range(connections):
        counts = []
        for _ in range(2):  # before the connection, after it
            deadline = time.monotonic() + START_TIMEOUT
            while not all(asleep_in_epoll_wait(pid) for pid in pids):
                if time.monotonic() > deadline:
                    raise SystemExit("the copies do not go back to epoll_wait")
                time.sleep(0.002)
            counts.append([context_switches(pid) for pid in pids])
            if len(counts) == 1:
                connect_once(port)
        woken += sum(before != after for before, after in zip(*counts, strict=True))
    return woken / connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--program", choices=["fastsni", "fasthttpdir"], default="fastsni")
    parser.add_argument("--pure", action="store_true", help="the pure twin (FASTSNI_NO_EXTENSIONS=1)")
    options = parser.parse_args()
    env = environment(options.pure)
    copies: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as workdir, socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        try:
            for _ in range(options.copies):
                copies.append(start_copy(options.program, listener, workdir, env))
            woken = copies_woken([copy.pid for copy in copies], port, options.connections)
            prefix = f"{workdir}/trace"
            tracer = attach_strace([copy.pid for copy in copies], prefix)
            for _ in range(options.connections):
                connect_once(port)
            time.sleep(0.5)  # let copies woken late for the last connection show up in the trace
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
            totals = dict.fromkeys(("wakeups", "accepted", "empty accepts"), 0)
            for copy in copies:
                figures = count(Path(f"{prefix}.{copy.pid}"))
                print(f"copy {copy.pid}: " + ", ".join(f"{key} {value}" for key, value in figures.items()))
                for key, value in figures.items():
                    totals[key] += value
            per = options.connections
            print(
                f"{options.program} ({'pure' if options.pure else 'compiled'}), {options.copies} copies, "
                f"{per} connections, per connection: {woken:.2f} copies woken; under strace "
                f"{totals['wakeups'] / per:.2f} epoll_wait returns and "
                f"{totals['empty accepts'] / per:.2f} empty accepts ({totals['accepted']} accepted)"
            )
        finally:
            for copy in copies:
                copy.terminate()
            for copy in copies:
                try:
                    copy.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    copy.kill()
                    copy.wait()


if __name__ == "__main__":
    main()
