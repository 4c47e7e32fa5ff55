"""Root is refused unless allowed; either way no symlink leads a connection out of the
hosts tree (tests/test_isolation.py has the full set).  Run unprivileged, the proxies
reach only what their user may connect to."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from backends import UnixBackend, client_hello, recv_exactly, recv_until_eof

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a proxy as root and as nobody")
NOBODY = 65534

# Starts a proxy as root, imports everything it runs, then drops to nobody before serving:
# the interpreter may live where nobody cannot read it (pyenv under a 0700 /root).
AS_NOBODY = f"""
import os, sys
from fastsni import server, twins
import fastsni.__main__, fasthttpdir.__main__
twins.load("fastsni.engine", "fastsni._engine")
twins.load("fastsni.proxy", "fastsni._proxy")
twins.load("fasthttpdir.proxy", "fasthttpdir._http")
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
(fastsni.__main__ if sys.argv[1] == "fastsni" else fasthttpdir.__main__).main([])
"""


def without_allow_root(twin) -> dict[str, str]:
    return {k: v for k, v in twin.env.items() if k != "FASTSNI_ALLOW_ROOT"}


@needs_root
@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_root_is_refused_with_what_to_do(twin, program, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        done = subprocess.run(
            [sys.executable, "-m", program],
            stdin=listener.fileno(),
            cwd=tmp_path,
            env=without_allow_root(twin),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: refusing to run as root"), done.stderr
    assert "fastsni-listen --user" in lines[0] and "FASTSNI_ALLOW_ROOT=1" in lines[0]


@pytest.fixture
def tree():
    """A hosts directory nobody can search, with a public backend socket (0666) and a
    host owner's symlink to a root-only socket (0600 in a 0700 directory)."""
    top = Path(tempfile.mkdtemp(prefix="fastsni-privileges-"))
    hosts, private = top / "hosts", top / "private"
    hosts.mkdir()
    private.mkdir(mode=0o700)
    os.chmod(top, 0o755)
    os.chmod(hosts, 0o755)
    yield top, hosts, private
    shutil.rmtree(top)


def answering(word: bytes, expect: int):
    def handle(conn: socket.socket) -> None:
        recv_exactly(conn, expect)
        conn.sendall(word)

    return handle


def start(program: str, hosts: Path, env: dict, as_nobody: bool) -> tuple[subprocess.Popen, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    command = [sys.executable, "-c", AS_NOBODY, program] if as_nobody else [sys.executable, "-m", program]
    process = subprocess.Popen(command, stdin=listener.fileno(), cwd=hosts, env=env, stderr=subprocess.PIPE)
    line = process.stderr.readline()
    assert b"listening on" in line and b"; confined: no_new_privs " in line and b" seccomp(" in line, line
    return process, listener


def stop(process: subprocess.Popen, listener: socket.socket) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        listener.close()
    return err.decode()


@needs_root
@pytest.mark.parametrize("as_nobody", [False, True], ids=["root-allowed", "nobody"])
def test_symlink_to_a_root_only_socket(twin, tree, as_nobody):
    """The old hole: a host owner's symlink to a root-only socket outside the tree is not
    followed, as root (allowed by FASTSNI_ALLOW_ROOT=1) or as nobody: alert 112 (EXDEV),
    the socket never connected, while a public socket works.  As nobody, a root-only
    socket inside the tree is refused by the kernel (EACCES)."""
    top, hosts, private = tree
    hello_public, hello_evil = client_hello("public.test"), client_hello("evil.test")
    public = UnixBackend(hosts / "public.test" / "tls-socket", answering(b"public", len(hello_public)))
    secret = UnixBackend(private / "socket", answering(b"secret", len(hello_evil)))
    try:
        os.chmod(hosts / "public.test", 0o755)
        os.chmod(public.path, 0o666)
        os.chmod(secret.path, 0o600)
        (hosts / "evil.test").mkdir(mode=0o755)
        os.symlink(secret.path, hosts / "evil.test" / "tls-socket")
        (hosts / "private.test").mkdir(mode=0o755)
        os.symlink("../evil.test/tls-socket", hosts / "private.test" / "tls-socket")
        inside = UnixBackend(hosts / "root.test" / "tls-socket", answering(b"root", len(hello_evil)))
        os.chmod(inside.path, 0o600)
        process, listener = start("fastsni", hosts, twin.env, as_nobody)
        port = listener.getsockname()[1]
        if as_nobody:
            status = Path(f"/proc/{process.pid}/status").read_text()
            assert f"Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}" in status
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(hello_public)
            assert recv_exactly(sock, 6) == b"public"
        answers = {}
        for name in ("evil.test", "private.test", "root.test"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(client_hello(name))
                answers[name] = recv_until_eof(sock)
        log = stop(process, listener)
    finally:
        public.close()
        secret.close()
        inside.close()
    unrecognized_name = bytes.fromhex("15030300020270")
    assert answers["evil.test"] == answers["private.test"] == unrecognized_name, answers
    assert secret.accepted == 0
    assert "evil.test: evil.test/tls-socket: leads out of the hosts tree (EXDEV)" in log, log
    assert "private.test: private.test/tls-socket: leads out of the hosts tree (EXDEV)" in log, log
    if as_nobody:
        assert answers["root.test"] == unrecognized_name
        assert "root.test: root.test/tls-socket: EACCES: the proxy's user may not connect" in log, log
    else:
        assert answers["root.test"] == b"root"


@needs_root
def test_fasthttpdir_as_nobody_cannot_reach_a_root_only_socket(twin, tree):
    top, hosts, private = tree
    request = b"GET / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    secret = UnixBackend(private / "socket", answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1))
    try:
        os.chmod(secret.path, 0o600)
        (hosts / "evil.test").mkdir(mode=0o755)
        os.symlink(secret.path, hosts / "evil.test" / "http-socket")
        process, listener = start("fasthttpdir", hosts, twin.env, as_nobody=True)
        with socket.create_connection(listener.getsockname(), timeout=10) as sock:
            sock.sendall(request)
            got = recv_until_eof(sock)
        log = stop(process, listener)
    finally:
        secret.close()
    assert got.startswith(b"HTTP/1.1 404 "), got
    assert secret.accepted == 0
    assert "evil.test: evil.test/http-socket: leads out of the hosts tree (EXDEV)" in log, log
