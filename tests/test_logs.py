"""The failure log's rate bound (fastsni/logs.py, shared by both proxies), on a fake clock."""

from __future__ import annotations

import time

from fastsni.logs import BURST, RATE, REPORT_AFTER, FailureLog, timestamp


def test_burst_then_rate_then_one_counting_line(capsys):
    now = [100.0]
    scheduled: list = []
    log = FailureLog(clock=lambda: now[0])
    log.start("fasthttpdir", lambda delay, callback: scheduled.append((delay, callback)))
    log.stamped = False  # as under the journal: the lines as given (tests/test_metrics.py: the time)
    for i in range(BURST + 50):  # all at one instant: the burst passes, the rest is held
        log.write(f"line {i}\n")
    assert scheduled and scheduled[0][0] == REPORT_AFTER and len(scheduled) == 1
    now[0] += REPORT_AFTER
    scheduled.pop()[1]()  # the loop runs the report
    out = capsys.readouterr().err.splitlines()
    assert out[:BURST] == [f"line {i}" for i in range(BURST)]
    assert out[BURST:] == [
        f"fasthttpdir: 50 more failure lines not written in the last {REPORT_AFTER:.1f} s "
        f"(at most {RATE:g} a second, {BURST} at once)"
    ]
    # Two seconds after the burst the bucket holds 2 * RATE tokens: that many lines pass.
    now[0] += 2.0 - REPORT_AFTER
    for i in range(int(2 * RATE) + 1):
        log.write(f"again {i}\n")
    assert len(capsys.readouterr().err.splitlines()) == 2 * RATE
    assert log.held == 1 and len(scheduled) == 1


def test_quiet_times_write_every_line(capsys):
    now = [0.0]
    log = FailureLog(clock=lambda: now[0])
    for i in range(10 * BURST):  # one failure every 1/RATE s, forever: never held back
        log.write(f"{i}\n")
        now[0] += 1 / RATE
    assert len(capsys.readouterr().err.splitlines()) == 10 * BURST
    log.flush()
    assert capsys.readouterr().err == ""


def test_timestamps_across_seconds_and_back():
    """RFC 3339 UTC with milliseconds; strftime's text is remembered per second, so each
    second (and a clock that steps back) must still get its own."""
    for now in (1764979801.0, 1764979801.1239, 1764979801.9999, 1764979802.0005, 1764979801.5, 0.25):
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        assert timestamp(now) == expected
