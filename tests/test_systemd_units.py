"""The units in systemd/: verify clean, exposure at most 2.0, restart and reload as the
units say, and the proxies really working under the units' restrictions.

There is no systemd as PID 1 here, so tests/unit_sandbox.py reproduces the directives in
its IMPLEMENTED set from each unit file (mount and network namespaces, seccomp through
libseccomp, prctl, setuid) and runs the proxy under them; NOT_EXERCISED below names every
other directive the units set, which no test here exercises.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backends import UnixBackend, client_hello, recv_exactly, recv_until_eof
from conftest import ROOT, TEST_INSTALLED
from unit_sandbox import IMPLEMENTED, service_section

from fastsni.server import DRAIN_SECONDS

UNITS = ROOT / "systemd"  # the source tree's, also when the tests run against a wheel
SERVICES = ["fastsni.service", "fasthttpdir.service", "fastsni@.service"]
SOCKETS = ["fastsni.socket", "fasthttpdir.socket", "fastsni-copies.socket"]
SANDBOX = Path(__file__).resolve().parent / "unit_sandbox.py"

# Set in the units, not reproduced by unit_sandbox.py, so no test exercises them.
NOT_EXERCISED = {
    "ProtectKernelModules",  # no module loading: needs CAP_SYS_MODULE, dropped anyway
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "RemoveIPC",
    "DevicePolicy",
    "KeyringMode",
    "Restart",  # systemd's own behaviour on failure
    "StandardOutput",  # the journal
    "StandardError",
}
# Exercised by the behaviour tests below rather than by the sandbox.
BEHAVIOUR = {"ExecStart", "KillSignal", "TimeoutStopSec"}

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian: systemd)")


def can_sandbox() -> str | None:
    """Why unit_sandbox.py cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount and network namespaces, setuid)"
    if ANALYZE is None:
        return "needs systemd-analyze to expand SystemCallFilter= groups"
    if not ctypes.util.find_library("seccomp"):
        return "needs libseccomp (Debian: libseccomp2)"
    if not shutil.which("ip"):
        return "needs ip (Debian: iproute2) to bring up the private loopback"
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount --net fails here: {probe.stderr.strip()}"
    return None


SANDBOX_MISSING = can_sandbox()
needs_sandbox = pytest.mark.skipif(SANDBOX_MISSING is not None, reason=f"unit sandbox: {SANDBOX_MISSING}")


def sandbox(unit: str, hosts: Path, instance: str | None = None) -> tuple[str, ...]:
    """The command prefix that runs a command under ``unit``'s restrictions."""
    python = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    if not TEST_INSTALLED:
        python.add(str(ROOT))  # conftest's PYTHONPATH: the source tree stands in for site-packages
    words = [sys.executable, str(SANDBOX), str(UNITS / unit), str(hosts)]
    for path in sorted(python):
        words += ["--python", path]
    if instance is not None:
        words += ["--instance", instance]
    return (*words, "--")


def run_sandboxed(unit: str, hosts: Path, stdin, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*sandbox(unit, hosts), sys.executable, "-c", code, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def grant(path: Path) -> Path:
    """What a site owner does for the proxy user: write permission on the socket."""
    path.chmod(0o666)
    return path


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


# -- the unit files --------------------------------------------------------------------


@needs_analyze
def test_units_verify_clean(tmp_path):
    """systemd-analyze verify prints nothing; ExecStart's /opt/fastsni/bin/* exist only in
    a private mount namespace (a tmpfs on /opt), so the machine is left untouched."""
    script = (
        "set -e; mount -t tmpfs tmpfs /opt; mkdir -p /opt/fastsni/bin /opt/fastsni/root; "
        "for p in fastsni fasthttpdir; do printf '#!/bin/sh\\n' > /opt/fastsni/bin/$p; "
        "chmod +x /opt/fastsni/bin/$p; done; "
        'cd "$1"; shift; exec systemd-analyze verify "$@"'
    )
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace with /opt/fastsni")
    units = [f"./{name}" for name in SERVICES + SOCKETS if "@." not in name]
    units += ["./fastsni@0.service", "./fastsni@1.service"]  # the template, instantiated
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "verify", str(UNITS), *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def exposure(paths: list[str]) -> dict[str, float]:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.findall(r"Overall exposure level for (\S+): (\d+\.\d)", result.stdout + result.stderr)
    return {name: float(score) for name, score in found}


@needs_analyze
def test_units_exposure_at_most_2(tmp_path):
    instance = tmp_path / "fastsni@0.service"  # the template as systemd runs it: an instance
    shutil.copy(UNITS / "fastsni@.service", instance)
    scores = exposure([str(UNITS / "fastsni.service"), str(UNITS / "fasthttpdir.service"), str(instance)])
    assert set(scores) == {"fastsni.service", "fasthttpdir.service", "fastsni@0.service"}, scores
    assert all(score <= 2.0 for score in scores.values()), scores


@needs_analyze
def test_debian_units_measured_beside_ours():
    """The README's comparison: Debian's own units score far worse in the same run."""
    debian = [path for path in ("/lib/systemd/system/haproxy.service", "/lib/systemd/system/nginx.service")]
    debian = [path for path in debian if os.path.exists(path)]
    if not debian:
        pytest.skip("neither haproxy nor nginx is installed (Debian: apt-get install haproxy nginx)")
    scores = exposure([*debian, str(UNITS / "fastsni.service")])
    assert len(scores) == len(debian) + 1, scores
    assert all(scores[Path(path).name] > scores["fastsni.service"] + 5 for path in debian), scores


def test_every_directive_is_accounted_for():
    """Each [Service] directive is reproduced by the sandbox, exercised by a behaviour test,
    or named in NOT_EXERCISED: nothing untested passes as tested."""
    for name in SERVICES:
        directives = set(service_section(UNITS / name))
        unknown = directives - IMPLEMENTED - NOT_EXERCISED - BEHAVIOUR
        assert not unknown, f"{name}: directives no test accounts for: {sorted(unknown)}"


@pytest.mark.parametrize("name", SERVICES)
def test_reload_and_restart_mean_what_the_units_say(name):
    """reload: nothing to reload, so no ExecReload (systemctl refuses reload, and
    reload-or-restart restarts); restart: KillSignal=SIGHUP drains, and systemd waits
    longer than the drain before SIGKILL."""
    values = service_section(UNITS / name)
    assert "ExecReload" not in values
    assert values["KillSignal"] == ["SIGHUP"]
    assert float(values["TimeoutStopSec"][-1]) > DRAIN_SECONDS
    program = "fasthttpdir" if name.startswith("fasthttpdir") else "fastsni"
    assert values["ExecStart"] == [f"/opt/fastsni/bin/{program}"]


# -- the restrictions themselves, seen from inside ---------------------------------------

INSIDE = r"""
import errno, json, mmap, os, socket, sys, tempfile
port, outside = int(sys.argv[1]), sys.argv[2]
seen = {}
def attempt(name, call):
    try:
        call()
        seen[name] = "ok"
    except OSError as exc:
        seen[name] = errno.errorcode[exc.errno]
attempt("loopback_of_the_host", lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
attempt("netlink_socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("outside_socket", lambda: socket.socket(socket.AF_UNIX).connect(outside))
attempt("chroot", lambda: os.chroot("/"))
attempt("writable_executable_memory", lambda: mmap.mmap(-1, 4096, prot=7))
# A fresh name: the source tree, bound in, may itself live under /tmp (a clone in /tmp/x).
attempt("write_tmp", lambda: open(tempfile.mktemp(dir="/tmp"), "x").close())
seen["top"] = sorted(os.listdir("/"))
seen["interfaces"] = sorted(os.listdir("/sys/class/net"))  # netlink is refused
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
seen["status"] = {k: status[k].strip() for k in ("Uid", "NoNewPrivs", "Seccomp", "CapBnd", "CapEff")}
seen["mounts"] = {l.split()[4]: l.split()[5] for l in open("/proc/self/mountinfo")}
seen["pids"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(seen))
"""


@needs_sandbox
def test_restrictions_as_seen_from_inside(hosts, tmp_path):
    """What each reproduced directive does, checked from a process under the unit."""
    outside = outside_socket(tmp_path)
    try:
        with socket.socket() as host_listener, socket.socket() as passed:
            host_listener.bind(("127.0.0.1", 0))
            host_listener.listen()
            passed.bind(("127.0.0.1", 0))
            passed.listen()
            port = str(host_listener.getsockname()[1])
            result = run_sandboxed("fastsni.service", hosts, passed, INSIDE, port, outside.path)
    finally:
        outside.close()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["loopback_of_the_host"] == "ECONNREFUSED"  # PrivateNetwork=: its own loopback
    assert seen["interfaces"] == ["lo"]
    assert seen["netlink_socket"] == seen["packet_socket"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert seen["outside_socket"] == "ENOENT"  # RootDirectory= + binds: /run is not there
    assert seen["chroot"] == "EPERM"  # SystemCallFilter=~@privileged (and no capabilities)
    assert seen["writable_executable_memory"] == "EPERM"  # MemoryDenyWriteExecute=
    assert seen["write_tmp"] == "ok"  # PrivateTmp=: a private, writable /tmp
    assert "run" not in seen["top"] and "home" not in seen["top"] and "etc" not in seen["top"]
    assert seen["status"]["Uid"].split()[0] != "0" and seen["status"]["NoNewPrivs"] == "1"
    assert seen["status"]["Seccomp"] == "2" and int(seen["status"]["CapBnd"], 16) == 0
    assert seen["mounts"]["/"].startswith("ro") and seen["mounts"]["/usr"].startswith("ro")
    assert seen["mounts"]["/srv/hosts"].startswith("rw")
    assert "1" not in seen["pids"]  # ProtectProc=invisible: root's processes are not there
    assert outside.accepted == 0


class OutsideSocket:
    """A Unix socket outside the hosts tree, under /run like /run/docker.sock."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = Path("/run") / f"fastsni-test-{os.getpid()}-{tmp_path.name}"
        self.dir.mkdir(parents=True)
        self.path = str(self.dir / "docker.sock")
        self.backend = UnixBackend(Path(self.path), self.answer)
        grant(Path(self.path))

    @staticmethod
    def answer(conn: socket.socket) -> None:
        """Read the whole hello record (closing on unread bytes would reset), then answer."""
        header = recv_exactly(conn, 5)
        recv_exactly(conn, int.from_bytes(header[3:5], "big"))
        conn.sendall(b"docker here")

    @property
    def accepted(self) -> int:
        return self.backend.accepted

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def outside_socket(tmp_path: Path) -> OutsideSocket:
    return OutsideSocket(tmp_path)


# -- the proxies under their units -------------------------------------------------------

BULK = 3 * 1024 * 1024  # past 256 KiB: the relay splices the upload (it copies downloads)


def bulk_backend(conn: socket.socket) -> None:
    """Read the hello record and BULK bytes; answer their SHA-256, then BULK bytes."""
    header = recv_exactly(conn, 5)
    received = header + recv_exactly(conn, int.from_bytes(header[3:5], "big") + BULK)
    conn.sendall(hashlib.sha256(received).digest())
    conn.sendall(bytes(range(256)) * (BULK // 256))


@needs_sandbox
@pytest.mark.parametrize("unit", ["fastsni.service", "fastsni@.service"])
def test_fastsni_under_its_unit(unit, twin, hosts, tmp_path, proxies):
    """Route, relay 3 MiB each way (splice), follow a relative symlink in the tree, and
    refuse a symlink to a socket outside it, all as the unit confines the proxy."""
    backend = UnixBackend(hosts / "a.test" / "tls-socket", bulk_backend)
    grant(backend.path)
    (hosts / "www.a.test").symlink_to("a.test")
    outside = outside_socket(tmp_path)
    (hosts / "evil.test").mkdir()
    (hosts / "evil.test" / "tls-socket").symlink_to(outside.path)
    try:
        instance = "0" if "@" in unit else None
        proxy = proxies("fastsni", hosts, twin, wrapper=sandbox(unit, hosts, instance))
        for name in ("a.test", "www.a.test"):
            with proxy.connect() as sock:
                hello, payload = client_hello(name), os.urandom(BULK)
                sock.sendall(hello + payload)
                got = recv_exactly(sock, 32 + BULK)
                assert got[:32] == hashlib.sha256(hello + payload).digest()
                assert got[32:] == bytes(range(256)) * (BULK // 256)
        with proxy.connect() as sock:
            sock.sendall(client_hello("evil.test"))
            assert recv_until_eof(sock) == bytes.fromhex("15030300020270")  # unrecognized_name
        proxy.expect("evil.test")
        assert outside.accepted == 0
        pid = proxy.process.pid
        seen = status(pid)
        assert seen["Uid"].split()[0] != "0" and seen["NoNewPrivs"].strip() == "1"
        assert seen["Seccomp"].strip() == "2"
        assert int(seen["Seccomp_filters"]) >= 4  # the unit's three and the proxy's own
        start_line = next(line for line in proxy.log if "listening on" in line)
        assert "; confined: no_new_privs landlock(abi " in start_line, start_line  # the unit lets it in
        soft, hard = re.search(
            r"Max open files\s+(\d+)\s+(\d+)", Path(f"/proc/{pid}/limits").read_text()
        ).groups()
        assert soft == hard  # LimitNOFILE= as systemd sets it; the proxy keeps soft == hard
        if instance is not None:
            assert os.sched_getaffinity(pid) == {0}  # CPUAffinity=%i
    finally:
        backend.close()
        outside.close()


@needs_sandbox
def test_the_outside_symlink_is_refused_without_the_unit_too(twin, hosts, tmp_path, proxies):
    """The unit is one layer: unconfined, the proxy itself does not follow the same
    symlink out of the tree (tests/test_isolation.py has every such case)."""
    outside = outside_socket(tmp_path)
    (hosts / "evil.test").mkdir()
    (hosts / "evil.test" / "tls-socket").symlink_to(outside.path)
    try:
        proxy = proxies("fastsni", hosts, twin)
        with proxy.connect() as sock:
            sock.sendall(client_hello("evil.test"))
            assert recv_until_eof(sock) == bytes.fromhex("15030300020270")  # unrecognized_name
        assert "leads out of the hosts tree (EXDEV)" in proxy.expect("evil.test")
        assert outside.accepted == 0
    finally:
        outside.close()


def http_backend(conn: socket.socket) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(65536)
        if not chunk:
            return
        request += chunk
    body = request.split(b"\r\n", 1)[0]
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@needs_sandbox
def test_fasthttpdir_under_its_unit(twin, hosts, tmp_path, proxies):
    backend = UnixBackend(hosts / "b.test" / "http-socket", http_backend)
    grant(backend.path)
    outside = outside_socket(tmp_path)
    (hosts / "evil.test").mkdir()
    (hosts / "evil.test" / "http-socket").symlink_to(outside.path)
    try:
        proxy = proxies("fasthttpdir", hosts, twin, wrapper=sandbox("fasthttpdir.service", hosts))
        with proxy.connect() as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
            answer = recv_until_eof(sock)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"GET /x HTTP/1.1"), answer
        with proxy.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
            assert recv_until_eof(sock).startswith(b"HTTP/1.1 404")
        assert outside.accepted == 0
    finally:
        backend.close()
        outside.close()


@needs_sandbox
def test_restart_is_graceful_under_the_unit(twin, hosts, proxies):
    """systemctl restart with KillSignal=SIGHUP: the old process keeps relaying its open
    connection, exits 0 once it is done (well inside TimeoutStopSec); a connection made
    meanwhile waits in the socket's backlog, and the new process serves it."""
    hello = client_hello("a.test")

    def echo(conn: socket.socket) -> None:
        recv_exactly(conn, len(hello))
        while data := conn.recv(65536):
            conn.sendall(data)

    backend = UnixBackend(hosts / "a.test" / "tls-socket", echo)
    grant(backend.path)
    try:
        proxy = proxies("fastsni", hosts, twin, wrapper=sandbox("fastsni.service", hosts))
        old = proxy.process
        with proxy.connect() as open_conn:
            open_conn.sendall(hello + b"before")
            assert recv_exactly(open_conn, 6) == b"before"
            old.send_signal(signal.SIGHUP)
            proxy.expect("SIGHUP")
            waiting = proxy.connect()  # accepted by the kernel into the backlog, nobody serves yet
            waiting.sendall(hello + b"queued")
            open_conn.sendall(b"during")
            assert recv_exactly(open_conn, 6) == b"during"
            assert old.poll() is None
        started = time.monotonic()
        assert old.wait(timeout=DRAIN_SECONDS + 5) == 0
        assert time.monotonic() - started < DRAIN_SECONDS
        proxy.start()  # systemd starts the new process once the old one is gone
        with waiting:
            assert recv_exactly(waiting, 6) == b"queued"
    finally:
        backend.close()


PRODUCTION = r"""
import socket, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from unit_sandbox import service_section
sandbox, units, hosts = sys.argv[1] + "/unit_sandbox.py", Path(sys.argv[2]), sys.argv[3]
probes = {"fastsni": (b"GET / HTTP/1.0\r\n\r\n", bytes.fromhex("1503030002020a")),
          "fasthttpdir": (b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n", b"HTTP/1.1 404")}
for program, (request, answer) in probes.items():
    unit = units / f"{program}.service"
    venv = [w.lstrip("-") for v in service_section(unit)["BindReadOnlyPaths"] for w in v.split()
            if w.lstrip("-").startswith("/opt/fastsni/") and Path(w.lstrip("-")).exists()]
    for twin, env in (("compiled", {}), ("pure", {"FASTSNI_NO_EXTENSIONS": "1"})):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            command = [sys.executable, sandbox, str(unit), hosts]
            for path in venv:  # the unit's own venv paths, bound as they are
                command += ["--python", path]
            command += ["--", *service_section(unit)["ExecStart"][-1].split()]
            proxy = subprocess.Popen(command, stdin=listener, stderr=subprocess.PIPE, text=True,
                                     env={"PATH": "/usr/bin:/bin", **env})
            try:
                line = proxy.stderr.readline()
                if "listening on" not in line:
                    proxy.wait(15)
                    sys.exit(f"{program} {twin} did not start: {line}{proxy.stderr.read()}")
                with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                    sock.sendall(request)
                    got = sock.recv(64)
                proxy.terminate()
                print(program, twin, f"({twin}," in line, got.startswith(answer), proxy.wait(15), flush=True)
            finally:
                if proxy.poll() is None:
                    proxy.kill()
                    proxy.wait()
"""


@needs_sandbox
def test_production_install_runs_under_the_units(tmp_path, hosts):
    """README's recipe in a private mount namespace (a tmpfs on /opt): Debian's python3
    makes the venv /opt/fastsni, the built wheel goes in, and each unit's own ExecStart=
    runs under its restrictions with exactly its BindReadOnlyPaths= (no substitution)."""
    wheel = os.environ.get("FASTSNI_TEST_WHEEL")
    if not wheel:
        pytest.skip("set FASTSNI_TEST_WHEEL to a built wheel (.ci/wheel does)")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3 (Debian: python3-venv) for the venv")
    driver = tmp_path / "production.py"
    driver.write_text(PRODUCTION)
    script = (
        "set -e; mount -t tmpfs tmpfs /opt; /usr/bin/python3 -m venv /opt/fastsni; "
        '/opt/fastsni/bin/pip install -q --only-binary=:all: "$1"; '
        "chmod -R a+rX /opt/fastsni; install -d -m 0755 /opt/fastsni/root; "
        'exec "$2" "$3" "$4" "$5" "$6"'
    )
    args = [wheel, sys.executable, str(driver), str(SANDBOX.parent), str(UNITS), str(hosts)]
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "production", *args],
        env={"PATH": os.environ["PATH"]},  # no PYTHONPATH: pip would take the source tree as installed
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.split("\n")
    for program in ("fastsni", "fasthttpdir"):
        for twin in ("compiled", "pure"):
            assert f"{program} {twin} True True 0" in lines, result.stdout + result.stderr
