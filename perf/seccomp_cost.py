"""What the proxies' seccomp filter adds to each system call (fastsni/confine.py).

    python3 perf/seccomp_cost.py [--rounds N] [--count N]

Forks three children that each time COUNT one-byte reads of /dev/zero per round: one
without a filter, one under the proxies' filter, one under a filter that allows every
call.  Prints the best round of each in ns per read, and the filter's cost.  The
proxies' filter costs what the allow-all one costs when the kernel caches its verdict
for calls allowed whatever their arguments (Linux 5.11+); the rest is seccomp's own
entry path.  Bounded: ROUNDS x COUNT reads per child.
"""

from __future__ import annotations

import argparse
import os
import struct
import time

from fastsni import confine


def timed(program: bytes | None, rounds: int, count: int) -> float:
    """Best ns per read(2) of one byte, in a child under ``program`` (None: no filter)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(reader)
            if program is not None:
                confine.prctl(confine.PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
                confine.install_seccomp(program, os.uname().machine)
            fd = os.open("/dev/zero", os.O_RDONLY)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter_ns()
                for _ in range(count):
                    os.read(fd, 1)
                best = min(best, (time.perf_counter_ns() - start) / count)
            os.write(writer, repr(best).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        best = float(pipe.read())
    os.waitpid(pid, 0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per child (the best is printed)")
    parser.add_argument("--count", type=int, default=200000, help="reads per round")
    args = parser.parse_args()
    machine = os.uname().machine
    proxies, _ = confine.seccomp_program(machine, os.getpid())
    allow_all = struct.pack("<HBBI", confine.BPF_RET_K, 0, 0, confine.SECCOMP_RET_ALLOW)
    none = timed(None, args.rounds, args.count)
    ours = timed(proxies, args.rounds, args.count)
    every = timed(allow_all, args.rounds, args.count)
    print(f"no filter         {none:7.1f} ns per read")
    print(f"proxies' filter   {ours:7.1f} ns per read  (+{ours - none:.1f})")
    print(f"allow-all filter  {every:7.1f} ns per read  (+{every - none:.1f})")


if __name__ == "__main__":
    main()
