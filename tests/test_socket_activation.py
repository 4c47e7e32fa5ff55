"""systemd's ways of passing the listening socket: on fd 0 (StandardInput=socket, or
systemd-socket-activate --inetd) and natively on fd 3 (LISTEN_FDS=1 with LISTEN_PID, as a
socket unit without StandardInput=socket or plain systemd-socket-activate passes it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
from backends import client_hello
from conftest import Twin

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
UNEXPECTED = bytes.fromhex("1503030002020a")  # fastsni's alert for a non-TLS first record
PROBES = {  # what each proxy answers on its own, with no backend at all
    "fastsni": (b"GET / HTTP/1.0\r\n\r\n", UNEXPECTED),
    "fasthttpdir": (b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n", b"HTTP/1.1 404"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def activate(program: str, twin, hosts, *options: str) -> tuple[subprocess.Popen, int]:
    """systemd-socket-activate listening on a free loopback port, execing the proxy."""
    env = dict(twin.env, FASTSNI_ALLOW_ROOT="1")
    # systemd-socket-activate gives its child only the variables named with -E.
    passed = [f"--setenv={name}" for name in env if name.startswith(("FASTSNI_", "PYTHON"))]
    for _attempt in range(3):  # another process may take the free port first
        port = free_port()
        process = subprocess.Popen(
            [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", *passed, *options, sys.executable, "-m", program],
            cwd=hosts,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = process.stderr.readline()
        if line.startswith("Listening on"):
            return process, port
        process.kill()
        process.wait()
    raise AssertionError(f"systemd-socket-activate did not listen: {line}")


def ask(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(64)


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed (Debian: systemd)")
@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
@pytest.mark.parametrize("options", [(), ("--inetd",)], ids=["LISTEN_FDS", "inetd"])
def test_systemd_socket_activate(program, options, twin, hosts):
    process, port = activate(program, twin, hosts, *options)
    try:
        request, answer = PROBES[program]
        assert ask(port, request).startswith(answer)  # the first connection starts the proxy
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        assert f"{program} " in line and f"({twin.name}," in line and f"127.0.0.1:{port}" in line, lines
        assert ask(port, request).startswith(answer)
    finally:
        process.terminate()
        code = process.wait(timeout=15)
    assert code == 0, process.stderr.read()


LISTEN_ENV = """
import os, subprocess, sys
passed, listen_pid, listen_fds = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.dup2(passed, 3)  # as systemd leaves it: the socket on fd 3, LISTEN_* set at start
os.environ.update(LISTEN_PID=listen_pid or str(os.getpid()), LISTEN_FDS=listen_fds, LISTEN_FDNAMES="x")
from fastsni import server
sock = server.listening_socket("fastsni")
print(sock.fileno(), sorted(k for k in os.environ if k.startswith("LISTEN_")), flush=True)
print(subprocess.run(["env"], capture_output=True, text=True).stdout.count("LISTEN_"), flush=True)
"""


def run_with_listen_fds(listener: socket.socket, listen_fds: str, listen_pid: str = ""):
    """LISTEN_ENV with ``listener`` on fd 3 and LISTEN_* (LISTEN_PID: its own pid by default)."""
    return subprocess.run(
        [sys.executable, "-c", LISTEN_ENV, str(listener.fileno()), listen_pid, listen_fds],
        pass_fds=[listener.fileno()],
        env=Twin("pure").env,  # server.py has no compiled twin
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_listen_fds_is_taken_and_cleared_for_children():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        result = run_with_listen_fds(listener, "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["3 []", "0"]  # fd 3; no LISTEN_* left, not even in env(1)


def test_listen_fds_for_another_pid_is_ignored():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        result = run_with_listen_fds(listener, "1", listen_pid="1")
    assert result.returncode == 2
    assert "fd 0 is a character device" in result.stderr  # /dev/null on fd 0, fd 3 not ours


def test_more_than_one_passed_socket_is_refused():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        result = run_with_listen_fds(listener, "2")
    assert result.returncode == 2
    assert "LISTEN_FDS=2" in result.stderr and "exactly one" in result.stderr


def test_listen_fds_that_is_not_a_listener_says_so():
    with socket.socket() as unbound:
        result = run_with_listen_fds(unbound, "1")
    assert result.returncode == 2
    assert "fd 3 (LISTEN_FDS=1) is a TCP socket that is not listening" in result.stderr


def test_wrong_fd0_message_names_both_ways(twin):
    result = subprocess.run(
        [sys.executable, "-m", "fastsni"],
        stdin=subprocess.DEVNULL,
        env=dict(twin.env, FASTSNI_ALLOW_ROOT="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    message = result.stderr
    assert "fd 0 is a character device" in message
    assert "StandardInput=socket" in message and "LISTEN_FDS=1" in message and "fd 3" in message
    assert "systemd-socket-activate" in message


def test_fastsni_routes_through_fd3(twin, hosts, tmp_path):
    """A full route over the natively passed socket: the hello reaches the backend."""
    backend = socket.socket(socket.AF_UNIX)
    (hosts / "a.test").mkdir()
    backend.bind(str(hosts / "a.test" / "tls-socket"))
    backend.listen()
    backend.settimeout(10)
    process, port = activate("fastsni", twin, hosts)
    try:
        hello = client_hello("a.test")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(hello)
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(10)
                got = b""
                while len(got) < len(hello):
                    chunk = conn.recv(65536)
                    assert chunk, got
                    got += chunk
                assert got == hello
    finally:
        backend.close()
        process.terminate()
        assert process.wait(timeout=15) == 0
