"""Handover and switching under load, the short version of perf/soak.py: new connections
and paced long streams (sha256 checked end to end) through both proxies while a second
copy starts on the same socket and the first gets SIGHUP, over and over, and the host's
symlink switches between two backends every 100 ms.  Both twins."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "perf" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_handover_and_switching_under_load(program, twin):
    soak = load_soak()
    options = argparse.Namespace(
        twin=twin.name,
        programs=program,
        rss_connections=0,
        connections=1500,
        streams=8,
        stream_kib=1024,
        pace=0.02,  # a stream takes about 0.3 s: longer than the time between handovers
        concurrency=8,
        handover_every=0.2,
        switch_every=0.1,
        seconds=60,
    )
    result = asyncio.run(soak.soak(options))
    assert not result.get("timed_out"), result
    assert list(result["handover"]) == [program]
    for program, figures in result["handover"].items():
        assert figures["failed"] == 0, (program, figures["first_failures"])
        assert figures["connections"] == 1500
        assert (figures["streams"], figures["corrupted"]) == (8, 0), figures
        assert figures["handovers"] >= 3, figures
        assert all(figures["tags"].values()), figures  # both backends served
    for program, copies in result["copies"].items():
        assert copies["started"] >= 4, (program, copies)
        assert copies["exit_status_not_0"] == [] and copies["drains_that_cut"] == 0, (program, copies)
        assert not copies["other_log_lines"], (program, copies)
    assert result["switches"] >= 10
    assert result["status"] == 0


def test_sighup_answers_a_new_connection_accepted_before_it(twin, hosts, proxies):
    """A connection the old copy accepted just before SIGHUP, whose request it has not read
    yet, is not an idle keep-alive connection: closing it at once loses that request
    (the soak saw such connections end with no answer).  Its first request is answered."""
    from attack_kit import UnixHttpServer, open_descriptors, wait_for
    from backends import recv_until_eof

    backend = UnixHttpServer(hosts / "app.example" / "http-socket")
    try:
        proxy = proxies("fasthttpdir", hosts, twin)
        old = proxy.process
        idle = open_descriptors(old.pid)
        with proxy.connect() as sock:
            wait_for(lambda: open_descriptors(old.pid) > idle, 5, "the old copy accepting")
            proxy.start()
            old.send_signal(signal.SIGHUP)
            proxy.expect("SIGHUP")
            try:
                sock.sendall(b"GET /late HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
                answer = recv_until_eof(sock)
            except ConnectionResetError:
                answer = b"(reset)"
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"backend /late\n"), answer
        assert old.wait(15) == 0
    finally:
        backend.close()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_a_signal_right_after_the_listening_line_is_handled(program, signum, twin, hosts):
    """The "listening on" line is what a supervisor (or the soak) waits for before the
    next handover; a SIGHUP or SIGTERM sent as soon as it appears must drain or stop the
    copy and exit 0, not kill it by the signal's default action (the soak saw -15)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        for _ in range(3):
            process = subprocess.Popen(
                [sys.executable, "-m", program],
                stdin=listener.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=hosts,
                env=twin.env,
            )
            try:
                assert b"listening on" in process.stderr.readline()
                process.send_signal(signum)
                assert process.wait(15) == 0
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
                process.stderr.close()
