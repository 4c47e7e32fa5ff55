"""Fixtures shared by the whole suite.

Every behavioural test runs against both twins: ``twin`` is parametrised over
"compiled" and "pure".  In-process tests take the twin's modules from it; tests that
run a proxy as a process pass ``twin.env`` (FASTSNI_NO_EXTENSIONS set or not).
"""

from __future__ import annotations

import importlib
import os
import queue
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_COMPILED = os.environ.get("FASTSNI_REQUIRE_COMPILED", "") not in ("", "0")
ROOT = Path(__file__).resolve().parent.parent  # the source tree
# Processes the tests start import ROOT's packages, unless FASTSNI_TEST_INSTALLED=1: then
# they import whatever the interpreter has installed (CI's run against the built wheel).
TEST_INSTALLED = os.environ.get("FASTSNI_TEST_INSTALLED", "") not in ("", "0")
# The time the proxies put in front of a line when stderr is not the journal (fastsni/logs.py)
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


@dataclass(frozen=True)
class Twin:
    name: str  # "compiled" or "pure"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("FASTSNI_NO_EXTENSIONS", None)
        if self.name == "pure":
            env["FASTSNI_NO_EXTENSIONS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        if os.geteuid() == 0:  # the proxies refuse root otherwise (tests/test_privileges.py)
            env["FASTSNI_ALLOW_ROOT"] = "1"
        if not TEST_INSTALLED:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def module(self, pure: str, compiled: str):
        """The twin's module: e.g. twin.module("fastsni.tls", "fastsni._tls")."""
        if self.name == "pure":
            return importlib.import_module(pure)
        try:
            return importlib.import_module(compiled)
        except ImportError:
            if REQUIRE_COMPILED:
                raise
            pytest.skip(f"{compiled} is not built")


@pytest.fixture(params=["compiled", "pure"], scope="session")
def twin(request) -> Twin:
    return Twin(request.param)


@pytest.fixture
def hosts(tmp_path) -> Path:
    """An empty hosts directory (the proxies' current directory)."""
    path = tmp_path / "hosts"
    path.mkdir()
    return path


class Proxy:
    """A proxy process with a listening socket on fd 0 and ``hosts`` as its current directory."""

    def __init__(
        self,
        program: str,
        hosts: Path,
        twin: Twin,
        address: str = "127.0.0.1",
        nofile: int | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, 0))
        self.listener.listen(1024)
        self.address = address
        self.port = self.listener.getsockname()[1]
        self.program = program
        self.hosts = hosts
        self.twin = twin
        self.nofile = nofile  # RLIMIT_NOFILE, soft and hard, for the proxy process
        self.wrapper = wrapper  # a command that runs the proxy: strace, a unit's restrictions
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []  # the lines expect() went past, without their time
        self.stamped: list[str] = []  # every line as written, with its time if any
        self.process: subprocess.Popen | None = None  # the newest copy
        self.processes: list[subprocess.Popen] = []
        self.start()

    def start(self) -> subprocess.Popen:
        """Start one more copy of the proxy on the same listening socket."""
        process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", self.program],
            stdin=self.listener.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.hosts,
            env=self.twin.env,
            text=True,
            preexec_fn=self._limit if self.nofile else None,
        )
        threading.Thread(target=self._read, args=(process,), daemon=True).start()
        self.process = process
        self.processes.append(process)
        line = self.expect("listening on", timeout=20)
        assert f"({self.twin.name}," in line, line
        if os.environ.get("FASTSNI_NO_CONFINE", "") in ("", "0"):  # every test runs confined
            assert "; confined: no_new_privs " in line and " seccomp(" in line, line
        return process

    def _limit(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.stamped.append(line.rstrip("\n"))
            self.lines.put(STAMP.sub("", line.rstrip("\n")))

    def expect(self, text: str, timeout: float = 10) -> str:
        """Wait (bounded) for a stderr line containing ``text``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no stderr line with {text!r} in {timeout} s; got {self.log}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.log.append(line)
            if text in line:
                return line

    def connect(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection((self.address, self.port), timeout=timeout)

    def reset_before_accept(self, data: bytes) -> int:
        """A client that sends ``data`` and resets (close with SO_LINGER 0), all while the
        proxy is stopped (SIGSTOP): it accepts a connection reset already, whose bytes it
        can still read but whose address getpeername(2) no longer gives.  The client's port."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            with self.connect() as sock:
                port = sock.getsockname()[1]
                sock.sendall(data)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.process.send_signal(signal.SIGCONT)
        return port

    def stop(self, process: subprocess.Popen | None = None) -> int:
        from backends import reap

        return reap(process or self.process, 15)


@pytest.fixture
def proxies():
    """Factory: proxies("fastsni", hosts, twin) -> Proxy; every process is reaped at teardown."""
    started: list[Proxy] = []

    def start(program: str, hosts: Path, twin: Twin, address: str = "127.0.0.1", **options) -> Proxy:
        proxy = Proxy(program, hosts, twin, address, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        for process in proxy.processes:
            proxy.stop(process)
        proxy.listener.close()


@pytest.fixture
def backends():
    """Factory: backends(path, handle) -> a backends.UnixBackend serving ``path``; all closed at teardown."""
    from backends import UnixBackend

    started = []

    def start(path: Path, handle):
        backend = UnixBackend(path, handle)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


@pytest.fixture(scope="session")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()
