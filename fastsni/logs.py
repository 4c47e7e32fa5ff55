"""Failure lines on stderr (the journal), one per failed connection, at a bounded rate.

Every failed connection is worth one line in normal times, but a flood of bad clients
must not fill the journal or the disk: lines are let through by a token bucket (BURST
at once after a quiet spell, RATE a second on average), and what it holds back is
counted and reported in one line at most once a second.  Each line starts with the time
(UTC) unless stderr is the journal, which stamps lines itself.  Not hot: pure only.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

RATE = 20.0  # failure lines a second, on average
BURST = 100  # failure lines at once, after a quiet spell
REPORT_AFTER = 1.0  # seconds from the first line held back to the line that counts them


_second = [-1, ""]  # the last whole second timestamp() wrote, and its text up to the seconds


def timestamp(now: float) -> str:
    """``2026-12-05T23:50:01.123Z``: UTC with milliseconds (RFC 3339); strftime once a second."""
    second = int(now)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def under_journal() -> bool:
    """Whether stderr is the journal: systemd sets JOURNAL_STREAM to its device:inode
    (systemd.exec(5)); a stderr passed on elsewhere (a pipe, a file) is not it."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return bool(stream) and stream == f"{info.st_dev}:{info.st_ino}"


class FailureLog:
    """``write(line)`` for failure lines; ``flush()`` reports what was held back now."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.program = "fastsni"
        self.tokens = float(BURST)
        self.updated = clock()
        self.held = 0  # lines held back since the last report
        self.held_since = 0.0
        self.call_later: Callable | None = None  # the loop's, once the server runs one
        self.stamped = False  # lines start with the time (stderr is not the journal)

    def start(self, program: str, call_later: Callable) -> None:
        """Report held-back lines through ``call_later(delay, callback)`` (the server's loop)."""
        self.program = program
        self.call_later = call_later
        self.stamped = not under_journal()

    def say(self, line: str) -> None:
        """Write ``line`` now, stamped like failure lines (start warnings, counters)."""
        sys.stderr.write(f"{timestamp(time.time())} {line}" if self.stamped else line)

    def write(self, line: str) -> None:
        now = self.clock()
        self.tokens = min(float(BURST), self.tokens + (now - self.updated) * RATE)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.say(line)
            return
        if not self.held:
            self.held_since = now
            if self.call_later is not None:
                self.call_later(REPORT_AFTER, self.flush)
        self.held += 1

    def flush(self) -> None:
        if self.held:
            seconds = self.clock() - self.held_since
            self.say(
                f"{self.program}: {self.held} more failure lines not written in the last {seconds:.1f} s "
                f"(at most {RATE:g} a second, {BURST} at once)\n"
            )
            self.held = 0


failures = FailureLog()
