"""The fd 0 contract shared by both proxies: fastsni-listen, signals, descriptor exhaustion."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from backends import client_hello

HTTP_PROBE = b"GET / HTTP/1.0\r\n\r\n"  # not TLS: fastsni answers unexpected_message at once
UNEXPECTED = bytes.fromhex("1503030002020a")


def probe(port: int, family=socket.AF_INET, host="127.0.0.1") -> bytes:
    with socket.socket(family) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(HTTP_PROBE)
        return sock.recv(64)


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return sock.getsockname()[1]


def listen(args, twin, hosts):
    process = subprocess.Popen(
        [sys.executable, "-m", "fastsni.listen", *args],
        cwd=hosts,
        env=twin.env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stderr.readline()
    assert "listening on" in line, line + process.stderr.read()
    return process, line


@pytest.mark.parametrize(
    "where, family, host",
    [("127.0.0.1:{}", socket.AF_INET, "127.0.0.1"), ("[::1]:{}", socket.AF_INET6, "::1")],
)
def test_fastsni_listen_binds_and_execs(twin, hosts, where, family, host):
    port = free_port()
    process, line = listen([where.format(port), sys.executable, "-m", "fastsni"], twin, hosts)
    try:
        assert f"({twin.name}," in line
        assert probe(port, family, host) == UNEXPECTED
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


def test_fastsni_listen_without_host_is_dual_stack(twin, hosts):
    port = free_port()
    process, line = listen([str(port), sys.executable, "-m", "fastsni"], twin, hosts)
    try:
        assert f"listening on [::]:{port}" in line
        assert probe(port, socket.AF_INET, "127.0.0.1") == UNEXPECTED
        assert probe(port, socket.AF_INET6, "::1") == UNEXPECTED
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0


@pytest.mark.parametrize("args", [[], ["443"], ["nope:443", "true"], ["[::1:443", "true"], ["70000", "true"]])
def test_fastsni_listen_usage_errors(args):
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.listen", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage: fastsni-listen" in result.stderr


def test_sigterm_exits_zero_and_cuts_connections(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(client_hello("x.test")[:10])  # an unfinished hello keeps it open
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=15) == 0
        assert sock.recv(64) == b""
    proxy.expect("exiting, 1 connections cut")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_out_of_descriptors_keeps_serving_without_spinning(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin, nofile=48)
    # more than the proxy can accept, 4 from each source: under the fair share's floor (8),
    # so none is refused or closed for it (tests/test_fair_share.py)
    address = (proxy.address, proxy.port)
    held = [socket.create_connection(address, 10, (f"127.0.5.{1 + index // 4}", 0)) for index in range(80)]
    try:
        time.sleep(0.2)  # let the proxy hit EMFILE
        before = cpu_ticks(proxy.process.pid)
        time.sleep(1.0)
        assert cpu_ticks(proxy.process.pid) - before < 30, "the accept loop spins on EMFILE"
        held[0].sendall(HTTP_PROBE)  # an accepted connection is still served
        assert held[0].recv(64) == UNEXPECTED
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # descriptors are freed as the proxy sees the closes: accepting resumes
        try:
            assert probe(proxy.port) == UNEXPECTED
            break
        except (ConnectionError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert proxy.process.poll() is None
    os.kill(proxy.process.pid, 0)


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_sigusr1_does_not_kill_a_proxy(twin, hosts, proxies, program):
    proxy = proxies(program, hosts, twin)
    proxy.process.send_signal(signal.SIGUSR1)
    proxy.expect(f"{program}: counters pid=")  # tests/test_counters.py reads the line
    with proxy.connect() as sock:  # still serving after the signal was delivered
        sock.sendall(HTTP_PROBE)
        assert sock.recv(64)
    assert proxy.process.poll() is None


FLOOD = 600  # failed connections, as fast as the proxy answers them


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_a_flood_of_failures_writes_a_bounded_number_of_lines(twin, hosts, proxies, program):
    """One line per failure up to the burst, then at most RATE a second, and one line
    (at most once a second) counting what was held back: every failure is accounted for."""
    from fastsni.logs import BURST, RATE

    proxy = proxies(program, hosts, twin)
    bad = b"\x16\x03\x01\x00\x00" if program == "fastsni" else b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n"
    started = time.monotonic()
    for _ in range(FLOOD):
        with proxy.connect() as sock:
            sock.sendall(bad)
            assert sock.recv(64)  # the alert or the 400
    elapsed = time.monotonic() - started
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=15) == 0
    proxy.expect("exiting")
    failures = [line for line in proxy.log if line.startswith(f"{program}: 127.0.0.1:")]
    counts = [line for line in proxy.log if "more failure lines not written" in line]
    held = sum(int(line.split()[1]) for line in counts)
    assert len(failures) + held == FLOOD, proxy.log[-5:]
    assert len(failures) <= BURST + RATE * (elapsed + 1)
    assert held > 0 and 1 <= len(counts) <= elapsed + 2
