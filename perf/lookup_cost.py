"""The kernel's price of the per-connection backend lookup, step by step, against the
plain connect by path that sniproxy, nginx and haproxy make (perf/lookup_cost.c); and of
an accept(2) that finds the queue empty, against reading the queue's length.

    python3 perf/lookup_cost.py [--rounds N] [--count N]

Builds perf/lookup_cost.c with gcc, runs it in a temporary hosts directory (one entry,
one Unix socket it binds and accepts on itself, nothing else) and prints, per step, the
median CPU time of the calling thread per step over the rounds, with the range.  The
proxies' lookup is the sum of the first three lines (the markers only once a second
now) plus the difference between the last two (connecting through /proc/self/fd/N
instead of by path).  The last two lines are the Listener's: what a wakeup that
accepts until EAGAIN pays at its end, and what reading the queue first pays instead.
Bounded: ROUNDS x COUNT iterations of nine steps.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per step, 1-64 (the median is printed)")
    parser.add_argument("--count", type=int, default=20000, help="iterations per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "lookup_cost"
        source = HERE / "lookup_cost.c"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(program), str(source)], check=True)
        hosts = Path(tmp) / "hosts"
        (hosts / "app.example.test").mkdir(parents=True)
        subprocess.run([str(program), str(hosts), str(args.rounds), str(args.count)], check=True, timeout=600)


if __name__ == "__main__":
    main()
