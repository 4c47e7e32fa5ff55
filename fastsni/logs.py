"""Failure lines on stderr (the journal), one per failed connection, at a bounded rate.

Every failed connection is worth one line in normal times, but a flood of bad clients
must not fill the journal or the disk: lines are let through by a token bucket (BURST
at once after a quiet spell, RATE a second on average), and what it holds back is
counted and reported in one line at most once a second.  Not hot: pure only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

RATE = 20.0  # failure lines a second, on average
BURST = 100  # failure lines at once, after a quiet spell
REPORT_AFTER = 1.0  # seconds from the first line held back to the line that counts them


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

    def start(self, program: str, call_later: Callable) -> None:
        """Report held-back lines through ``call_later(delay, callback)`` (the server's loop)."""
        self.program = program
        self.call_later = call_later

    def write(self, line: str) -> None:
        now = self.clock()
        self.tokens = min(float(BURST), self.tokens + (now - self.updated) * RATE)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            sys.stderr.write(line)
            return
        if not self.held:
            self.held_since = now
            if self.call_later is not None:
                self.call_later(REPORT_AFTER, self.flush)
        self.held += 1

    def flush(self) -> None:
        if self.held:
            seconds = self.clock() - self.held_since
            sys.stderr.write(
                f"{self.program}: {self.held} more failure lines not written in the last {seconds:.1f} s "
                f"(at most {RATE:g} a second, {BURST} at once)\n"
            )
            self.held = 0


failures = FailureLog()
