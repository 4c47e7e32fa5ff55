"""Counters that survive and add up, and the operator's failure lines (fastsni/server.py,
fastsni/listen.py, fastsni/metrics.py): the last counters line on SIGHUP and SIGTERM,
causes split, ECH and GREASE counted, totals across fastsni-listen's copies (also of
copies that exited), the Prometheus text parsed by the real prometheus_client parser;
failure lines with path, hint, address and time; start warnings.  Both proxies, both twins."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from backends import client_hello, reap, recv_exactly, recv_until_eof
from conftest import STAMP
from test_counters import counters
from test_listen import (
    PROBE,
    listens,  # noqa: F401  (a fixture)
    start_proxies,
)

from fastsni import metrics

parser = pytest.importorskip("prometheus_client.parser")


def fields_of(line: str) -> dict[str, str]:
    return dict(field.split("=", 1) for field in line.split(" counters ", 1)[1].split())


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
@pytest.mark.parametrize("how", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_copy_writes_its_counters_as_it_exits(twin, hosts, proxies, program, how):
    proxy = proxies(program, hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(PROBE if program == "fastsni" else b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n")
        assert recv_until_eof(sock)
    proxy.process.send_signal(how)
    assert proxy.process.wait(timeout=15) == 0
    last = fields_of(proxy.expect(f"{program}: counters "))
    proxy.expect(f"{program}: exiting")
    assert last["accepted"] == "1" and last["open"] == "0"
    assert last["alert_10" if program == "fastsni" else "status_400"] == "1"


def with_extensions(hello: bytes, extensions: bytes, suite: bytes = b"") -> bytes:
    """A copy of the one-record ClientHello ``hello`` with ``extensions`` appended to its
    extensions and ``suite`` put first among its cipher suites; every length fixed up."""
    body = bytearray(hello[9:])  # after the record header and the handshake header
    at = 2 + 32
    at += 1 + body[at]  # legacy_session_id
    (suites,) = struct.unpack_from("!H", body, at)
    old = body[at + 2 : at + 2 + suites]
    body[at : at + 2 + suites] = struct.pack("!H", suites + len(suite)) + suite + old
    at += 2 + suites + len(suite)
    at += 1 + body[at]  # legacy_compression_methods
    (length,) = struct.unpack_from("!H", body, at)
    body[at : at + 2] = struct.pack("!H", length + len(extensions))
    body += extensions
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def test_fastsni_counts_causes_ech_and_grease(twin, hosts, proxies, backends):
    name = "ech.test"
    plain = client_hello(name)
    ech = with_extensions(plain, b"\xfe\x0d\x00\x04" + b"\x00" * 4)  # encrypted_client_hello (RFC 9849)
    grease = with_extensions(plain, b"\x2a\x2a\x00\x00", suite=b"\x0a\x0a")  # RFC 8701 values

    def handle(conn):
        conn.recv(65536)
        conn.sendall(b"ok")

    backends(hosts / name / "tls-socket", handle)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    (hosts / "refused.test").mkdir()
    dead.bind(str(hosts / "refused.test" / "tls-socket"))
    dead.close()
    proxy = proxies("fastsni", hosts, twin)
    for hello in (plain, ech, grease):
        with proxy.connect() as sock:
            sock.sendall(hello)
            assert recv_exactly(sock, 2) == b"ok"
    refusals = [client_hello(None), client_hello("nobody.test"), client_hello("refused.test")]
    refusals.append(client_hello("x.test").replace(b"x.test", b"x_test"))
    for hello in refusals:
        with proxy.connect() as sock:
            sock.sendall(hello)
            assert recv_until_eof(sock)[-1] == 112
    fields = counters(proxy, open_wanted=0)
    assert (fields["hello_ech"], fields["hello_grease"], fields["routed"]) == ("1", "1", "3")
    assert fields["alert_112"] == "4"
    for why in ("no_sni", "no_entry", "refused", "invalid_name"):
        assert fields[f"alert_112_{why}"] == "1", fields


def test_failure_lines_say_path_hint_address_and_time(twin, hosts, proxies):
    (hosts / "*.wild.test").mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    (hosts / "stale.test").mkdir()
    dead.bind(str(hosts / "stale.test" / "http-socket"))
    dead.close()
    proxy = proxies("fasthttpdir", hosts, twin)
    lines = {}
    for name in ("a.wild.test", "stale.test", "nobody.test"):
        with proxy.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
            recv_exactly(sock, 12)
            port = sock.getsockname()[1]
        lines[name] = proxy.expect(f"fasthttpdir: 127.0.0.1:{port} {name}: ")
    assert "*.wild.test/http-socket: ENOENT: no socket there: start the backend" in lines["a.wild.test"]
    assert "stale.test/http-socket: ECONNREFUSED: nobody listens on the socket" in lines["stale.test"]
    nobody = "*.test/http-socket: ENOENT: no entry for this name, nor a wildcard entry"  # both tried
    assert nobody in lines["nobody.test"]
    stamped = [line for line in proxy.stamped if "nobody.test: " in line]
    assert stamped and STAMP.match(stamped[0]), stamped  # stderr is a pipe, not the journal


def test_no_time_in_front_when_stderr_is_the_journal(twin, hosts):
    """JOURNAL_STREAM names stderr's device and inode (systemd.exec(5)): the journal stamps lines."""
    (hosts / "a.test").mkdir()  # no start warning
    listener = socket.create_server(("127.0.0.1", 0))
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    env = dict(twin.env, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
    process = subprocess.Popen(
        [sys.executable, "-m", "fastsni"], stdin=listener.fileno(), stderr=write_end, cwd=hosts, env=env
    )
    os.close(write_end)
    try:
        with os.fdopen(read_end) as stderr:
            assert "listening on" in stderr.readline()
            process.send_signal(signal.SIGUSR1)
            line = stderr.readline()
            assert line.startswith("fastsni: counters pid="), line
    finally:
        reap(process, 15)
        listener.close()


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_start_warnings(twin, hosts, proxies, tmp_path, program):
    proxy = proxies(program, hosts, twin)
    line = proxy.expect(f"{program}: warning: the hosts directory")  # empty: no entry a name could use
    assert "every connection will be refused until one is made" in line
    closed = tmp_path / "closed"
    (closed / "a.test").mkdir(parents=True)
    closed.chmod(0o700)
    tmp_path.chmod(0o755)
    if program != "fastsni" or subprocess.run(["setpriv", "--version"], capture_output=True).returncode:
        return  # (as nobody, fasthttpdir may not read httptools where root installed it)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        result = subprocess.run(
            [*nobody, sys.executable, "-m", program],
            stdin=listener.fileno(),
            cwd=closed,
            env=twin.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        listener.close()
    assert result.returncode == 1, result.stderr
    assert "uid 65534 may not search the working directory, the hosts directory (EACCES)" in result.stderr
    assert "setfacl -m u:USER:x" in result.stderr


def listen_fields(line: str) -> tuple[str, dict[str, int]]:
    program, _, rest = line.split("fastsni-listen: ", 1)[1].partition(" totals ")
    return program, {key: int(value) for key, value in (field.split("=") for field in rest.split())}


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_copies_add_up_survive_and_become_prometheus(twin, hosts, listens, program, tmp_path):  # noqa: F811
    prom = tmp_path / "proxies.prom"
    listen, port = start_proxies(listens, ["--copies", "2", "--metrics", str(prom)], twin, hosts, 2, program)
    probe = PROBE if program == "fastsni" else b"GET / HTTP/1.1\r\nHost: a_b\r\n\r\n"
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(probe)
            assert recv_until_eof(sock)
    listen.process.send_signal(signal.SIGUSR1)
    copies = [fields_of(listen.expect(rf"{program}: counters ").string) for _ in range(2)]
    assert {copy["pid"] for copy in copies} == {str(pid) for pid in listen.children()}
    name, totals = listen_fields(listen.expect(rf"fastsni-listen: {program} totals ").string)
    assert name == program and totals["copies"] == 2 and totals["exited"] == 0
    for key in ("accepted", "open", "bytes_down"):
        assert totals[key] == sum(int(copy[key]) for copy in copies), (key, totals, copies)
    assert totals["accepted"] == 6
    # An upgrade: the old copies drain and exit; what they counted stays in the totals.
    listen.process.send_signal(signal.SIGHUP)
    listen.expect(r"new copies .* ready")
    for _ in range(2):
        listen.expect(r"old copy \d+ exited with status 0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(probe)
        assert recv_until_eof(sock)
    listen.process.send_signal(signal.SIGUSR1)
    _, totals = listen_fields(listen.expect(rf"fastsni-listen: {program} totals ").string)
    assert (totals["copies"], totals["exited"], totals["accepted"]) == (2, 2, 7), totals
    # The --metrics file, written after every answered SIGUSR1: the same totals.
    deadline = time.monotonic() + 10
    while b"_accepted_total 7" not in (prom.read_bytes() if prom.exists() else b""):
        assert time.monotonic() < deadline, prom.read_text() if prom.exists() else "no file"
        time.sleep(0.05)
    families = {family.name: family for family in parser.text_string_to_metric_families(prom.read_text())}
    assert families[f"{program}_accepted"].type == "counter"
    assert families[f"{program}_accepted"].samples[0].value == 7
    assert families[f"{program}_copies"].samples[0].value == 2
    answers = families[f"{program}_alerts" if program == "fastsni" else f"{program}_answers"]
    label = "alert" if program == "fastsni" else "status"
    assert {sample.labels[label]: sample.value for sample in answers.samples} == {
        "10" if program == "fastsni" else "400": 7
    }
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary left


def test_exposition_parses_and_matches_the_lines(capsys):
    lines = [
        "2026-12-05T23:50:01.123Z fastsni: counters pid=1 uptime=5s accepted=10 open=1 routed=7 "
        "alert_112=3 alert_112_no_entry=2 alert_112_refused=1 bytes_up=100",
        "fastsni: counters pid=2 uptime=9s accepted=5 open=0 routed=5 alert_112=1 alert_112_no_sni=1 "
        "bytes_up=50",
        "fasthttpdir: counters pid=3 uptime=9s accepted=4 open=2 routed=9 status_503=2 status_503_denied=2",
        "fastsni: 127.0.0.1:4242 a.test: not a counters line",
        "fastsni: counters pid=1 uptime=6s accepted=11 open=0 routed=8 alert_112=3 alert_112_no_entry=2 "
        "alert_112_refused=1 bytes_up=120",
    ]
    latest = metrics.last_lines(lines)
    assert set(latest) == {"fastsni", "fasthttpdir"} and set(latest["fastsni"]) == {"1", "2"}
    stdin = sys.stdin
    try:
        import io

        sys.stdin = io.StringIO("\n".join(lines) + "\n")
        sys.argv = ["fastsni-metrics"]
        metrics.main()
    finally:
        sys.stdin = stdin
    text = capsys.readouterr().out
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("fastsni_accepted_total", ())] == 16
    assert samples[("fastsni_routed_total", ())] == 13
    assert samples[("fastsni_open", ())] == 0
    assert samples[("fastsni_copies", ())] == 2
    assert samples[("fastsni_alerts_total", (("alert", "112"),))] == 4
    assert samples[("fastsni_alerts_by_cause_total", (("alert", "112"), ("cause", "no_sni")))] == 1
    assert samples[("fastsni_alerts_by_cause_total", (("alert", "112"), ("cause", "no_entry")))] == 2
    assert samples[("fasthttpdir_answers_by_cause_total", (("cause", "denied"), ("status", "503")))] == 2
    assert samples[("fastsni_bytes_up_total", ())] == 170
    assert re.search(r"^# TYPE fastsni_accepted_total counter$", text, re.M)
    families = {family.name: family for family in parser.text_string_to_metric_families(text)}
    assert families["fastsni_accepted"].type == "counter" and families["fastsni_open"].type == "gauge"


def test_every_connect_failure_has_one_cause(twin):
    """fastsni.engine.cause, which the counters and the owners' logs use (EACCES cannot be
    met as root, so it is checked here)."""
    import errno

    engine = twin.module("fastsni.engine", "fastsni._engine")
    absent = OSError(errno.ENOENT, "x", "a.test/tls-socket")
    absent.no_entry = True
    cases = {
        "no_entry": absent,
        "no_socket": OSError(errno.ENOENT, "x", "a.test/tls-socket"),
        "denied": OSError(errno.EACCES, "x", "a.test/tls-socket"),
        "refused": OSError(errno.ECONNREFUSED, "x", "a.test/tls-socket"),
        "outside_tree": OSError(errno.EXDEV, "x", "a.test/tls-socket"),
        "not_owner": engine.ForeignSocket(1000, 2000, "a.test/tls-socket"),
        "error": OSError(errno.EPROTOTYPE, "x", "a.test/tls-socket"),
    }
    for why, exc in cases.items():
        assert engine.cause(exc) == why
        assert "a.test/tls-socket: " in engine.failure(exc, "tls-socket")
    assert "see fastsni-check --user" in engine.failure(cases["denied"], "tls-socket")
