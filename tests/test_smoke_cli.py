"""Invocation contract of fastsni: options, fd 0 checks, start line."""

from __future__ import annotations

import socket
import subprocess
import sys


def run(args, twin, stdin=subprocess.DEVNULL, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastsni", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        env=twin.env,
        cwd=cwd,
        timeout=30,
    )


def test_version_names_the_twin(twin):
    result = run(["--version"], twin)
    assert result.returncode == 0
    assert result.stdout.startswith("fastsni ")
    assert f"({twin.name})" in result.stdout


def test_help_exits_zero(twin):
    result = run(["--help"], twin)
    assert result.returncode == 0
    assert "tls-socket" in result.stdout


def test_any_other_argument_is_a_usage_error(twin):
    result = run(["--port", "443"], twin)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_fd0_not_a_socket(twin, tmp_path):
    regular = tmp_path / "file"
    regular.write_bytes(b"")
    with open(regular) as f:
        result = run([], twin, stdin=f)
    assert result.returncode == 2
    assert "fd 0 is a regular file" in result.stderr
    assert result.stderr.count("\n") == 1
    result = run([], twin, stdin=subprocess.PIPE)
    assert result.returncode == 2 and "fd 0 is a pipe" in result.stderr


def test_fd0_socket_of_the_wrong_kind(twin):
    unix, other = socket.socketpair()
    with unix, other:
        result = run([], twin, stdin=unix)
    assert result.returncode == 2 and "fd 0 is a Unix socket" in result.stderr
    with socket.socket() as tcp:
        result = run([], twin, stdin=tcp)
    assert result.returncode == 2 and "not listening" in result.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        result = run([], twin, stdin=udp)
    assert result.returncode == 2 and "UDP" in result.stderr


def test_start_line(twin, hosts, proxies):
    proxy = proxies("fastsni", hosts, twin)
    line = proxy.log[-1]
    assert f"listening on 127.0.0.1:{proxy.port}" in line
    assert str(hosts) in line
