"""fastsni-deploy against real TLS and HTTP backends on Unix sockets and real proxies in front."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from backends import http_backend, reap, recv_exactly, recv_until_eof, run_as, tls_http_backend
from conftest import ROOT, TEST_INSTALLED

from fastsni import deploy, tree

NAME = "app.example"
ENV = dict(os.environ)  # the commands as installed, or from the source tree:
if not TEST_INSTALLED:
    ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def cafile(ca, tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    path.chmod(0o644)
    return path


def release(backends, ca, directory: Path, label: str, tls: bool = True, http: bool = True) -> Path:
    """A release directory serving ``label`` on tls-socket and/or http-socket."""
    if tls:
        backends(directory / "tls-socket", tls_http_backend(ca, NAME, label=label))
    if http:
        backends(directory / "http-socket", http_backend(label))
    return directory


def run(
    hosts: Path, *args: str, cafile: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    """fastsni-deploy as a process (python -m fastsni.deploy), bounded."""
    options = ["--hosts", str(hosts)] + (["--cafile", str(cafile)] if cafile else [])
    return subprocess.run(
        [sys.executable, "-m", "fastsni.deploy", *options, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def leftovers(hosts: Path) -> list[str]:
    return [entry for entry in os.listdir(hosts) if entry.startswith(deploy.TEMP_PREFIX)]


def tls_get(port: int, context: ssl.SSLContext) -> str:
    """GET / through fastsni on a new connection; the backend's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            return recv_until_eof(tls).split(b"\r\n\r\n", 1)[1].decode()


def http_get(port: int) -> str:
    """GET / through fasthttpdir on a new connection; the backend's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        return recv_until_eof(conn).split(b"\r\n\r\n", 1)[1].decode()


def read_answer(conn) -> str:
    """One keep-alive answer with Content-Length: its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"EOF before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        body += conn.recv(65536)
    return body.decode()


class Lines:
    """A process's output, line by line, read in a thread; expect() waits (bounded) for a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def expect(self, start: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no line starting {start!r} in {timeout} s: {self.seen}") from None
            self.seen.append(line)
            if line.startswith(start):
                return line


class Load:
    """One thread making requests in a loop (bounded in count and time), each on a new connection."""

    def __init__(self, request) -> None:
        self.request = request
        self.results: list[tuple[float, str]] = []  # (start time, body)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        for _ in range(5000):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            start = time.monotonic()
            try:
                self.results.append((start, self.request()))
            except Exception as exc:
                self.failures.append(exc)

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for start, _ in self.results if start > after) < count:
            assert not self.failures, self.failures[:3]
            assert time.monotonic() < deadline, f"only {len(self.results)} requests in {timeout} s"
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_deploy_under_load_switches_and_drains(
    hosts, twin, proxies, backends, ca, cafile, monkeypatch, tmp_path
):
    monkeypatch.setenv("FASTSNI_ALLOW_ROOT", "1")  # the proxies run as root here
    v1 = release(backends, ca, hosts / "_releases" / "v1", "v1")
    v2 = release(backends, ca, hosts / "_releases" / "v2", "v2")
    first = run(hosts, NAME, str(v1), cafile=cafile)
    assert first.returncode == 0, first.stderr
    assert "previous none" in first.stdout
    assert os.readlink(hosts / NAME) == "_releases/v1"  # relative

    fastsni = proxies("fastsni", hosts, twin)
    fasthttpdir = proxies("fasthttpdir", hosts, twin)
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])

    # Connections open on v1 across the switch: a TLS session before its request, and an
    # HTTP keep-alive connection that has had one answer.
    held_tls = context.wrap_socket(fastsni.connect(), server_hostname=NAME)
    held_http = fasthttpdir.connect()
    held_http.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
    assert read_answer(held_http) == "backend v1\n"

    loads = [Load(lambda: tls_get(fastsni.port, context)), Load(lambda: http_get(fasthttpdir.port))]
    try:
        for load in loads:
            load.wait_for(20)
        marker = tmp_path / "then-ran"
        process = subprocess.Popen(
            [sys.executable, "-m", "fastsni.deploy", "--hosts", str(hosts), "--cafile", str(cafile)]
            + ["--drain", "30", "--then", f'echo "$FASTSNI_PREVIOUS" > {marker}', NAME, str(v2)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        output = Lines(process)
        try:
            assert output.expect("switched") == f"switched {NAME} -> _releases/v2"
            switched = time.monotonic()
            output.expect("previous _releases/v1")
            for load in loads:
                load.wait_for(20, after=switched)
            # The drain waits for the TLS session, a stream to v1 that only its client can
            # end; not for the idle keep-alive HTTP connection: fasthttpdir closes its
            # backend connection to v1 within a second of the switch, the client's stays.
            assert process.poll() is None and not marker.exists()
            held_tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            assert recv_until_eof(held_tls).endswith(b"backend v1 alpn http/1.1\n")
            held_tls.close()
            output.expect("drained: no connection left")
            assert process.wait(timeout=20) == 0, output.seen
            held_http.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            assert read_answer(held_http) == "backend v2\n"  # the same client connection, now to v2
            held_http.close()
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        assert marker.read_text() == f"{v1}\n"
    finally:
        for load in loads:
            load.finish()
    for load in loads:
        assert not load.failures, load.failures[:3]
        before = [body for start, body in load.results if start < switched]
        after = [body for start, body in load.results if start > switched]
        assert after and all("v2" in body for body in after), set(after)
        assert before and "v1" in before[0]
    assert (v2 / deploy.PREVIOUS_RECORD).read_text() == "_releases/v1\n"
    assert not leftovers(hosts)


def stale_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def silent(conn: socket.socket) -> None:
    """A backend that accepts and never answers (until the client leaves)."""
    while conn.recv(65536):
        pass


REFUSALS = {
    # case: (exit code, words in the one error line)
    "not listening": (1, "nobody listens"),
    "wrong name": (1, "certificate not valid for app.example"),
    "no handshake": (1, "TLS handshake did not complete in time"),
    "http 500": (1, "answered 'HTTP/1.1 500 X'"),
    "outside": (3, "outside the hosts tree"),
    "lacks http": (3, "serves http-socket but TARGET"),  # after --timeout: it may still appear
    "empty": (3, "has neither tls-socket nor http-socket"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_deploy_leaves_the_link(case, hosts, backends, ca, cafile, tmp_path):
    release(backends, ca, hosts / "_releases" / "v1", "v1")
    os.symlink("_releases/v1", hosts / NAME)
    v2 = hosts / "_releases" / "v2"
    v2.mkdir()
    if case == "not listening":
        stale_socket(v2 / "tls-socket")
        backends(v2 / "http-socket", http_backend("v2"))
    elif case == "wrong name":
        backends(v2 / "tls-socket", tls_http_backend(ca, "other.example"))
        backends(v2 / "http-socket", http_backend("v2"))
    elif case == "no handshake":
        backends(v2 / "tls-socket", silent)
        backends(v2 / "http-socket", http_backend("v2"))
    elif case == "http 500":
        backends(v2 / "tls-socket", tls_http_backend(ca, NAME))
        backends(v2 / "http-socket", http_backend("v2", status=500))
    elif case == "outside":
        v2 = release(backends, ca, tmp_path / "elsewhere" / "v2", "v2")
    elif case == "lacks http":
        backends(v2 / "tls-socket", tls_http_backend(ca, NAME))
    elif case == "empty":
        (hosts / NAME).unlink()  # a first deploy: nothing it must serve but something
    code, words = REFUSALS[case]
    start = time.monotonic()
    result = run(hosts, "--timeout", "1", NAME, str(v2), cafile=cafile)
    assert time.monotonic() - start < 10
    assert result.returncode == code, (result.stdout, result.stderr)
    assert words in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    if case == "empty":
        assert not os.path.lexists(hosts / NAME)
    else:
        assert os.readlink(hosts / NAME) == "_releases/v1"
    assert not leftovers(hosts)


def test_probe_retries_until_the_backend_listens(hosts, backends, ca, cafile):
    v1 = hosts / "_releases" / "v1"
    v1.mkdir(parents=True)
    stale_socket(v1 / "tls-socket")  # starting: the file exists, nobody listens yet
    result: list[subprocess.CompletedProcess] = []
    thread = threading.Thread(
        target=lambda: result.append(run(hosts, "--timeout", "20", NAME, str(v1), cafile=cafile))
    )
    thread.start()
    (v1 / "tls-socket").unlink()
    backends(v1 / "tls-socket", tls_http_backend(ca, NAME))
    thread.join(30)
    assert result[0].returncode == 0, result[0].stderr
    assert "probe tls-socket: ok, TLSv1.3, ALPN h2" in result[0].stdout


def test_insecure_skips_the_chain_but_not_the_name(hosts, backends, ca):
    good = release(backends, ca, hosts / "_releases" / "good", "good", http=False)
    wrong = hosts / "_releases" / "wrong"
    backends(wrong / "tls-socket", tls_http_backend(ca, "other.example"))
    refused = run(hosts, "--timeout", "1", NAME, str(good))  # the test CA is not in the system store
    assert refused.returncode == 1 and "certificate not valid" in refused.stderr
    assert run(hosts, "--insecure", "--timeout", "1", NAME, str(wrong)).returncode == 1
    insecure = run(hosts, "--insecure", "--timeout", "1", NAME, str(good))
    assert insecure.returncode == 0, insecure.stderr


def test_probes_send_the_proxy_header_the_proxies_would(hosts, backends, ca, cafile):
    v1_lines: list[bytes] = []
    v1 = hosts / "_releases" / "v1"
    backends(v1 / "tls-socket", tls_http_backend(ca, NAME, expect_proxy=True, seen=v1_lines))
    (v1 / "send-proxy-v1").touch()
    v2_headers: list[bytes] = []

    def v2_then_http(conn: socket.socket) -> None:
        v2_headers.append(recv_exactly(conn, 16))
        http_backend("v2")(conn)

    v2 = hosts / "_releases" / "v2"
    backends(v2 / "http-socket", v2_then_http)
    (v2 / "send-proxy-v1").touch()
    (v2 / "send-proxy-v2").touch()  # v2 wins, as in the proxies
    result = run(hosts, "--timeout", "5", NAME, str(v1), cafile=cafile)
    assert result.returncode == 0, result.stderr
    assert v1_lines == [b"PROXY UNKNOWN\r\n"]
    os.unlink(hosts / NAME)
    result = run(hosts, "--timeout", "5", NAME, str(v2), cafile=cafile)
    assert result.returncode == 0, result.stderr
    assert v2_headers == [b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"]  # version 2, LOCAL, UNSPEC


@pytest.fixture
def processes():
    """Factory: processes(argv, cwd) -> Popen; each terminated and reaped at teardown."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], cwd: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        started.append(process)
        return process

    yield start
    for process in started:
        reap(process)


def test_probes_real_servers_openssl_and_uvicorn(hosts, backends, ca, cafile, tmp_path, processes):
    """openssl s_server on tls-socket, uvicorn on http-socket, started after the deploy
    began: the probes wait for both (the current target serves both), then see TLS 1.3
    with h2 and an HTTP 204."""
    pytest.importorskip("uvicorn")
    release(backends, ca, hosts / "_releases" / "v0", "v0")
    os.symlink("_releases/v0", hosts / NAME)
    v1 = hosts / "_releases" / "v1"
    v1.mkdir(parents=True)
    deploying = subprocess.Popen(
        [sys.executable, "-m", "fastsni.deploy", "--hosts", str(hosts), "--cafile", str(cafile)]
        + ["--timeout", "30", NAME, str(v1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        certificate = ca.issue_cert(NAME)
        certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        certificate.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        (tmp_path / "app.py").write_text(
            "async def app(scope, receive, send):\n"
            "    await send({'type': 'http.response.start', 'status': 204, 'headers': []})\n"
            "    await send({'type': 'http.response.body', 'body': b''})\n"
        )
        processes(  # a relative -unix path: OpenSSL 3.0 fails to parse long ones
            ["openssl", "s_server", "-quiet", "-unix", "tls-socket"]
            + ["-cert", str(tmp_path / "cert.pem"), "-key", str(tmp_path / "key.pem")]
            + ["-alpn", "h2,http/1.1"],
            v1,
        )
        processes([sys.executable, "-m", "uvicorn", "app:app", "--uds", str(v1 / "http-socket")], tmp_path)
        output, _ = deploying.communicate(timeout=40)
    finally:
        if deploying.poll() is None:
            deploying.kill()
            deploying.communicate()
    assert deploying.returncode == 0, output
    assert "probe tls-socket: ok, TLSv1.3, ALPN h2" in output
    assert "probe http-socket: ok, HTTP 204" in output
    assert os.readlink(hosts / NAME) == "_releases/v1"
    assert "previous _releases/v0" in output


def test_wildcard_entry(hosts, backends, ca, cafile):
    v1 = hosts / "_releases" / "wild"
    backends(v1 / "tls-socket", tls_http_backend(ca, "*.app.example"))
    result = run(hosts, "*.App.Example", str(v1), cafile=cafile)
    assert result.returncode == 0, result.stderr
    assert os.readlink(hosts / "*.app.example") == "_releases/wild"


def test_dry_run_rollback_convert_and_exit_codes(hosts, backends, ca, cafile):
    v1 = release(backends, ca, hosts / "_releases" / "v1", "v1")
    v2 = release(backends, ca, hosts / "_releases" / "v2", "v2")
    real = hosts / NAME
    backends(real / "tls-socket", tls_http_backend(ca, NAME, label="v0"))
    backends(real / "http-socket", http_backend("v0"))

    refused = run(hosts, NAME, str(v1), cafile=cafile)
    assert refused.returncode == 3 and "--convert" in refused.stderr and real.is_dir()
    converted = run(hosts, "--convert", NAME, str(hosts / "_releases" / "v0"))
    assert converted.returncode == 0, converted.stderr
    assert os.readlink(real) == "_releases/v0"
    assert http_get_socket(real / "http-socket") == "backend v0\n"  # the running backend kept serving

    dry = run(hosts, "--dry-run", NAME, str(v1), cafile=cafile)
    assert dry.returncode == 0 and "dry run: would switch" in dry.stdout
    assert os.readlink(real) == "_releases/v0"

    assert run(hosts, NAME, str(v1), cafile=cafile).returncode == 0
    assert run(hosts, NAME, str(v2), cafile=cafile).returncode == 0
    back = run(hosts, "--rollback", NAME, cafile=cafile)
    assert back.returncode == 0, back.stderr
    assert os.readlink(real) == "_releases/v1" and "previous _releases/v2" in back.stdout
    assert run(hosts, "--rollback", NAME, cafile=cafile).returncode == 0  # a second one undoes the first
    assert os.readlink(real) == "_releases/v2"

    failing = run(hosts, "--then", "exit 7", NAME, str(v1), cafile=cafile)
    assert failing.returncode == deploy.EXIT_THEN_FAILED and "exited 7" in failing.stderr
    with socket.socket(socket.AF_UNIX) as held:  # an open connection on v2 outlasts the drain
        held.connect(str(v2 / "http-socket"))
        timed_out = run(hosts, "--drain", "0.5", NAME, str(v2), cafile=cafile)
        assert timed_out.returncode == 0  # v1 -> v2: nobody is connected to v1
        late = run(hosts, "--drain", "0.5", NAME, str(v1), cafile=cafile)
        assert late.returncode == deploy.EXIT_DRAIN_TIMEOUT, late.stdout
        assert "drain timed out after 0.5 s with 1 open" in late.stdout
    assert run(hosts, "Bad_Name", str(v1)).returncode == deploy.EXIT_USAGE
    assert run(hosts, NAME).returncode == deploy.EXIT_USAGE
    unicode = run(hosts, "Bücher.Example.", str(v1), cafile=cafile, timeout=30)
    assert unicode.returncode == 1  # normalised to its A-label, then refused by the name check of the cert
    assert "xn--bcher-kva.example" in unicode.stderr


def http_get_socket(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        return read_answer(conn)


def test_concurrent_switches_never_leave_the_name_missing(hosts):
    """Two writers renaming links over one name while a reader looks it up: always there."""
    for label in ("a", "b"):
        (hosts / "_releases" / label).mkdir(parents=True)
    os.symlink("_releases/a", hosts / NAME)
    missing: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                os.stat(hosts / NAME)
            except FileNotFoundError:
                missing.append(1)

    def write(label: str) -> None:
        for _ in range(300):
            deploy.make_link(str(hosts), NAME, f"_releases/{label}")

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(label,)) for label in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    done.set()
    reader.join(10)
    assert not missing
    assert os.readlink(hosts / NAME) in ("_releases/a", "_releases/b")
    assert not leftovers(hosts)


def test_two_deploys_of_one_name_at_once(hosts, backends, ca, cafile):
    targets = [release(backends, ca, hosts / "_releases" / label, label) for label in ("v1", "v2", "v3")]
    os.symlink("_releases/v1", hosts / NAME)
    command = [sys.executable, "-m", "fastsni.deploy", "--hosts", str(hosts), "--cafile", str(cafile), NAME]
    processes = [
        subprocess.Popen(command + [str(target)], stdout=subprocess.PIPE, env=ENV) for target in targets[1:]
    ]
    for process in processes:
        process.communicate(timeout=30)
        assert process.returncode == 0
    assert os.readlink(hosts / NAME) in ("_releases/v2", "_releases/v3")
    assert not leftovers(hosts)


UID_ALICE, UID_BOB = 65534, 65533  # any unused uids: setuid() needs no passwd entry


def test_unprivileged_owners_in_a_sticky_hosts_directory(backends, ca):
    """Each owner deploys from her own release area _<owner>/; another owner's name is
    refused (exit 3) before any probe, for deploy, --rollback and --convert alike; a shared
    or foreign area is refused too, and nobody else can pre-create a release there."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the deploys as two other uids")
    base = Path(tempfile.mkdtemp(prefix="fastsni-sticky-"))  # /tmp: searchable by every uid
    try:
        base.chmod(0o755)
        hosts = base / "hosts"
        hosts.mkdir()
        hosts.chmod(0o1777)
        shared = hosts / "_releases"
        shared.mkdir(mode=0o1777)
        shared.chmod(0o1777)
        cafile = base / "ca.pem"
        ca.cert_pem.write_to_path(str(cafile))
        cafile.chmod(0o644)
        targets = {}
        for owner, uid, name in (("alice", UID_ALICE, "alice.example"), ("bob", UID_BOB, "bob.example")):
            area = hosts / f"_{owner}"
            area.mkdir(mode=0o755)
            os.chown(area, uid, uid)
            for version in ("v1", "v2"):
                directory = area / f"{name}-{version}"
                backends(directory / "tls-socket", tls_http_backend(ca, name, label=f"{owner}-{version}"))
                os.chown(directory, uid, uid)
                (directory / "tls-socket").chmod(0o666)  # the owner (and the proxy) may connect
                targets[owner, version] = str(directory)
        silent_target = hosts / "_alice" / "never-listens"  # a probe of it would wait out --timeout
        silent_target.mkdir()
        os.chown(silent_target, UID_ALICE, UID_ALICE)
        in_shared = shared / "alice-v3"
        backends(in_shared / "tls-socket", tls_http_backend(ca, "alice.example", label="shared"))
        os.chown(in_shared, UID_ALICE, UID_ALICE)
        (in_shared / "tls-socket").chmod(0o666)

        "x".encode("idna")  # the child cannot import codecs lazily where nobody may read the interpreter

        def deploy_as(uid: int, *args: str) -> tuple[int, str, float]:
            argv = ["--hosts", str(hosts), "--cafile", str(cafile), "--timeout", "20", *args]
            start = time.monotonic()
            code, text = run_as(uid, lambda: deploy.deploy(deploy.parse(argv)))
            return code, text, time.monotonic() - start

        code, text, _ = deploy_as(UID_ALICE, "alice.example", targets["alice", "v1"])
        assert code == 0, text
        assert os.lstat(hosts / "alice.example").st_uid == UID_ALICE
        code, text, _ = deploy_as(UID_BOB, "bob.example", targets["bob", "v1"])
        assert code == 0, text
        # bob cannot switch alice's name: refused at once, before any probe (a target that
        # never listens would otherwise take the whole --timeout), for every kind of switch
        for args in (
            ("alice.example", targets["alice", "v2"]),
            ("alice.example", str(silent_target)),
            ("--rollback", "alice.example"),
            ("--convert", "alice.example", str(hosts / "_bob" / "taken")),
        ):
            code, text, took = deploy_as(UID_BOB, *args)
            assert code == deploy.EXIT_REFUSED, (args, text)
            assert f"owned by {tree.who(UID_ALICE)}, not by you ({tree.who(UID_BOB)})" in text, text
            assert "only its owner (or root) can switch it" in text and "probe" not in text, text
            assert took < 5, (args, took)
        assert os.readlink(hosts / "alice.example") == "_alice/alice.example-v1"
        # a release in a shared area, or in another owner's, is refused before any probe
        code, text, _ = deploy_as(UID_ALICE, "alice.example", str(in_shared))
        assert code == deploy.EXIT_REFUSED, text
        assert f"TARGET lies in {shared}, owned by {tree.who(0)}, not by you" in text, text
        code, text, _ = deploy_as(UID_ALICE, "alice.example", targets["bob", "v2"])
        assert code == deploy.EXIT_REFUSED, text
        assert f"TARGET lies in {hosts}/_bob, owned by {tree.who(UID_BOB)}, not by you" in text, text
        os.chmod(hosts / "_alice", 0o775)  # her group may write it: she alone must
        code, text, _ = deploy_as(UID_ALICE, "alice.example", targets["alice", "v2"])
        assert code == deploy.EXIT_REFUSED, text
        assert "can write as well: they could pre-create or replace your releases" in text, text
        os.chmod(hosts / "_alice", 0o755)
        # bob cannot pre-create (or replace) a release in alice's area
        for attempt in (
            lambda: os.mkdir(hosts / "_alice" / "alice.example-v3"),
            lambda: os.rename(hosts / "_bob" / "bob.example-v2", hosts / "_alice" / "alice.example-v2"),
            lambda: shutil.rmtree(hosts / "_alice" / "alice.example-v2"),
        ):
            code, text = run_as(UID_BOB, lambda attempt=attempt: attempt() or 0)
            assert code == 70 and "PermissionError" in text, text
        code, text, _ = deploy_as(UID_ALICE, "alice.example", targets["alice", "v2"])
        assert code == 0, text
        assert os.readlink(hosts / "alice.example") == "_alice/alice.example-v2"
        assert not leftovers(hosts)
    finally:
        shutil.rmtree(base)


def test_entry_points():
    for module in ("fastsni.deploy", "fastsni.check", "fastsni.release"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=ENV
        )
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_example_hook_is_valid_shell():
    assert subprocess.run(["sh", "-n", str(ROOT / "examples" / "pre-receive")]).returncode == 0
