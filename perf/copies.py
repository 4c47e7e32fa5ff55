"""One copy of fastsni against two on one listening socket: new connections per second
and proxy CPU per connection (bench.py's workload A: a real ClientHello, the backend's
2-byte answer, close; 32 in flight).

    python3 perf/copies.py            # 8 s per run
    python3 perf/copies.py --quick    # 2.5 s per run
    python3 perf/copies.py --smoke    # 200 connections per run: checks the script, measures nothing
    python3 perf/copies.py --pure     # the pure twin (FASTSNI_NO_EXTENSIONS=1)

The copies run under ``fastsni-listen --cpus``: one copy on CPU 1, then two copies on
CPUs 1 and 0.  The load generator and the backend (perf/loadgen.c, perf/backend.c,
as bench.py builds them) stay on CPU 0.  The proxy CPU is that of fastsni-listen and all
its copies.

Caveat on a 2-core machine: the second copy shares CPU 0 with the load generator and the
backend, so the rate cannot double; the comparable figure is proxy CPU per connection,
which stays flat when each connection wakes one copy (EPOLLEXCLUSIVE) and grows when
every copy wakes for every connection.  On a machine with more cores, give the copies
CPUs of their own.  A wall-clock benchmark: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (perf/bench.py: its backend, load generator and /proc helpers)

COPY_CPUS = ["1", "0"]  # copy i runs on COPY_CPUS[i]; bench.LOAD_CPU is "0"
START_TIMEOUT = 30.0


def start_copies(
    copies: int, pure: bool, hosts: Path, log: Path, procs: bench.Procs
) -> tuple[int, list[int]]:
    """fastsni-listen with ``copies`` copies on 127.0.0.1; returns (port, pids of the tree)."""
    port = bench.free_port()
    env = dict(os.environ, FASTSNI_ALLOW_ROOT="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bench.REPO), env.get("PYTHONPATH")]))
    env.pop("FASTSNI_NO_EXTENSIONS", None)
    if pure:
        env["FASTSNI_NO_EXTENSIONS"] = "1"
    cpus = (
        ["--cpus", ",".join(COPY_CPUS[:copies])] if (os.cpu_count() or 1) >= 2 else ["--copies", str(copies)]
    )
    command = [
        sys.executable,
        "-m",
        "fastsni.listen",
        *cpus,
        f"127.0.0.1:{port}",
        sys.executable,
        "-m",
        "fastsni",
    ]
    with log.open("w") as stderr:
        proc = procs.spawn(command, cwd=hosts, env=env, stderr=stderr)
    deadline = time.monotonic() + START_TIMEOUT
    while "serving" not in log.read_text():  # fastsni-listen's line once every copy listens
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"fastsni-listen did not start: {bench.tail(log)}")
        time.sleep(0.05)
    return port, bench.process_tree(proc.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2.5 s per run")
    parser.add_argument(
        "--smoke", action="store_true", help="200 connections per run: checks the script only"
    )
    parser.add_argument("--pure", action="store_true", help="the pure twin")
    args = parser.parse_args(argv)
    bench.raise_nofile()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    settings = bench.Settings.for_run(args.quick, args.smoke)
    if args.smoke:
        settings.conn_count = 200
    procs = bench.Procs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastsni-copies-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            tools = bench.build(tmp)
            sockets, backend_pids = bench.start_backends(tmp, tools, procs)
            runner = bench.Bench(settings, tools, bench.write_hellos(tmp), sockets, backend_pids)
            for copies in (1, 2):
                port, pids = start_copies(
                    copies, args.pure, tmp / "hosts", tmp / f"copies-{copies}.log", procs
                )
                result = runner.connections(f"tcp:127.0.0.1:{port}", pids)
                procs.stop(procs.running[-1])
                rows.append((copies, result))
        finally:
            procs.stop_all()
    twin = "pure" if args.pure else "compiled"
    print(f"fastsni ({twin}): new connections, {settings.concurrency} in flight, {settings.conn_seconds:g} s")
    print(f"{'copies':>6} {'conn/s':>10} {'proxy µs/conn':>14} {'cpu% proxy/lg/be':>18}")
    for copies, result in rows:
        shares = "/".join(str(result["cpu_pct"][key]) for key in ("proxy", "loadgen", "backend"))
        errors = f"  {result['errors']} errors" if result["errors"] else ""
        rate, cost = result["conn_per_s"], result["proxy_cpu_us_per_conn"]
        print(f"{copies:>6} {rate:>10.0f} {cost:>14.1f} {shares:>18}{errors}")
    if args.smoke:
        print("(--smoke: a check of the script, not a measurement)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
