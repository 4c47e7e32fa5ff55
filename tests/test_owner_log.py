"""An entry owner's own log (fastsni/ownerlog.py): ``<entry>/log-socket``, a Unix datagram
socket, gets one line per connection (fastsni) or request (fasthttpdir) for its names,
whatever the outcome, and nothing for other names; a receiver that never reads, or none
at all, neither slows nor breaks relaying.  Both proxies, both twins."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from backends import client_hello, reap, recv_exactly, recv_until_eof
from test_counters import counters

LINE = re.compile(
    r"^time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z proxy=(fastsni|fasthttpdir) client=127\.0\.0\.1:\d+ "
    r"name=[a-z0-9.-]+ outcome=\S+( \w+=\S+)* duration=\d+\.\d{3}$"
)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
LEAF = {"fastsni": "tls-socket", "fasthttpdir": "http-socket"}


class Receiver:
    """A log-socket an owner binds: read (bounded) with lines(), or never."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path

    def line(self, timeout: float = 5) -> dict[str, str]:
        self.sock.settimeout(timeout)
        text = self.sock.recv(65536).decode("ascii")
        assert text.endswith("\n") and text.count("\n") == 1, text
        assert LINE.match(text.rstrip("\n")), text
        return dict(field.split("=", 1) for field in text.split())

    def nothing_more(self) -> None:
        """No line waits (the proxy sends each before the client sees the end of its exchange,
        or before the relay's close, which the caller waited for)."""
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(path: Path) -> Receiver:
        made.append(Receiver(path))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def echo_tls(hello: bytes):
    def handle(conn):
        recv_exactly(conn, len(hello))
        conn.sendall(b"0123456789")

    return handle


def answer_http(conn):
    buffer = b""
    while chunk := conn.recv(65536):
        buffer += chunk
        while b"\r\n\r\n" in buffer:
            _, _, buffer = buffer.partition(b"\r\n\r\n")
            conn.sendall(ANSWER)


def exchange(program: str, proxy, name: str) -> tuple[int, bytes]:
    """One connection (fastsni) or request (fasthttpdir) for ``name``: (client port, what came back)."""
    with proxy.connect() as sock:
        port = sock.getsockname()[1]
        if program == "fastsni":
            sock.sendall(client_hello(name))
            return port, recv_until_eof(sock)
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name.encode())
        return port, recv_until_eof(sock)


def wait_closed(proxy, program: str) -> None:
    counters(proxy, open_wanted=0)  # every connection closed, so every line was sent


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_one_line_per_routed_exchange_and_none_for_other_names(
    twin, hosts, proxies, backends, receivers, program
):
    hello = client_hello("logged.test")
    handle = echo_tls(hello) if program == "fastsni" else answer_http
    for name in ("logged.test", "quiet.test"):
        backends(hosts / name / LEAF[program], handle)
    receiver = receivers(hosts / "logged.test" / "log-socket")
    proxy = proxies(program, hosts, twin)
    port, got = exchange(program, proxy, "logged.test")
    exchange(program, proxy, "quiet.test")
    wait_closed(proxy, program)
    fields = receiver.line()
    assert (fields["proxy"], fields["name"]) == (program, "logged.test")
    assert fields["client"] == f"127.0.0.1:{port}"
    assert fields["outcome"] == "routed"
    if program == "fastsni":
        assert got == b"0123456789"
        assert (fields["up"], fields["down"]) == (str(len(hello)), "10")
    else:
        assert got == ANSWER
        assert fields["status"] == "200" and fields["down"] == str(len(ANSWER)) and int(fields["up"]) > 0
    assert 0 <= float(fields["duration"]) < 10
    receiver.nothing_more()  # quiet.test has no log socket: nothing, here or anywhere
    assert counters(proxy)["owner_log_sent"] == "1"


def bound_not_listening(path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: ECONNREFUSED


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_each_failure_reaches_the_owner_with_its_cause(twin, hosts, proxies, receivers, program, tmp_path):
    leaf = LEAF[program]
    refused, missing, outside, foreign = "refused.test", "missing.test", "outside.test", "foreign.test"
    for name in (refused, missing, outside, foreign):
        (hosts / name).mkdir()
    bound_not_listening(hosts / refused / leaf)
    (hosts / outside / leaf).symlink_to(tmp_path / "elsewhere")  # absolute: leads out of the tree
    bound_not_listening(hosts / foreign / leaf)
    logs = {name: receivers(hosts / name / "log-socket") for name in (refused, missing, outside, foreign)}
    # foreign.test is uid 1000's entry; its socket is uid 2000's (its log socket is the owner's)
    os.chown(hosts / foreign / leaf, 2000, 2000)
    os.chown(hosts / foreign / "log-socket", 1000, 1000)
    os.lchown(hosts / foreign, 1000, 1000)
    proxy = proxies(program, hosts, twin)
    answer = "alert_112" if program == "fastsni" else None
    expected = {
        refused: ("refused", answer or "status_503"),
        missing: ("no_socket", answer or "status_404"),
        outside: ("outside_tree", answer or "status_404"),
        foreign: ("not_owner", answer or "status_404"),
    }
    for name, (why, outcome) in expected.items():
        port, _ = exchange(program, proxy, name)
        fields = logs[name].line()
        assert (fields["outcome"], fields["cause"], fields["client"]) == (outcome, why, f"127.0.0.1:{port}")
        line = proxy.expect(f"127.0.0.1:{port} {name}: ")  # the operator's line: address, path, hint
        assert f"{name}/{leaf}: " in line, line
    for receiver in logs.values():
        receiver.nothing_more()
    fields = counters(proxy)
    prefix = "alert_112" if program == "fastsni" else ""
    if program == "fastsni":
        for why in ("refused", "no_socket", "outside_tree", "not_owner"):
            assert fields[f"{prefix}_{why}"] == "1", fields
        assert fields["alert_112"] == "4"
    else:
        assert fields["status_503_refused"] == "1" and fields["status_404"] == "3", fields


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
def test_a_client_that_resets_at_once_keeps_its_address_in_the_owners_log(
    twin, hosts, proxies, receivers, program
):
    """Its address is the one accept returned: a client that reset before its line was
    written (before it was even accepted) is named in it (LINE: client=127.0.0.1:PORT)."""
    name = "refused.test"
    (hosts / name).mkdir()
    bound_not_listening(hosts / name / LEAF[program])
    receiver = receivers(hosts / name / "log-socket")
    proxy = proxies(program, hosts, twin)
    sent = (
        client_hello(name) if program == "fastsni" else b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode()
    )
    port = proxy.reset_before_accept(sent)
    fields = receiver.line()
    assert (fields["client"], fields["cause"]) == (f"127.0.0.1:{port}", "refused")
    proxy.expect(f"{program}: 127.0.0.1:{port} {name}: ")  # the operator's line too


def test_fasthttpdir_backend_closing_early_is_the_owners_502(twin, hosts, proxies, backends, receivers):
    backends(hosts / "early.test" / "http-socket", lambda conn: conn.recv(65536))  # reads, then closes
    receiver = receivers(hosts / "early.test" / "log-socket")
    proxy = proxies("fasthttpdir", hosts, twin)
    _, got = exchange("fasthttpdir", proxy, "early.test")
    assert got.startswith(b"HTTP/1.1 502")
    fields = receiver.line()
    assert (fields["outcome"], fields["cause"]) == ("status_502", "closed_early")
    assert counters(proxy)["status_502_closed_early"] == "1"


def test_a_wildcard_entry_logs_for_the_names_it_serves(twin, hosts, proxies, backends, receivers):
    backends(hosts / "*.wild.test" / "http-socket", answer_http)
    receiver = receivers(hosts / "*.wild.test" / "log-socket")
    proxy = proxies("fasthttpdir", hosts, twin)
    exchange("fasthttpdir", proxy, "a.wild.test")
    assert receiver.line()["name"] == "a.wild.test"


@pytest.mark.parametrize("program", ["fastsni", "fasthttpdir"])
@pytest.mark.parametrize("receiver_kind", ["never reads", "gone"])
def test_a_receiver_that_never_reads_or_is_gone_breaks_nothing(
    twin, hosts, proxies, backends, receivers, program, receiver_kind
):
    """Bounded load: 300 exchanges, every one complete; the lines that could not go are counted."""
    name = "busy.test"
    hello = client_hello(name)
    backends(hosts / name / LEAF[program], echo_tls(hello) if program == "fastsni" else answer_http)
    receiver = receivers(hosts / name / "log-socket")
    if receiver_kind == "gone":
        receiver.close()  # the file stays: ECONNREFUSED
    proxy = proxies(program, hosts, twin)
    started = time.monotonic()
    expected = b"0123456789" if program == "fastsni" else ANSWER
    for _ in range(300):
        assert exchange(program, proxy, name)[1] == expected
    fields = counters(proxy, open_wanted=0)
    sent, dropped = int(fields["owner_log_sent"]), int(fields["owner_log_dropped"])
    assert sent + dropped == 300 and dropped > 0, fields
    if receiver_kind == "gone":
        assert sent == 0
    assert time.monotonic() - started < 60  # a bound, not a measurement


def test_the_receiver_in_docs_logs_md_prints_each_line(twin, hosts, proxies, backends):
    """The one-line Python receiver of docs/logs.md, run as written, in the entry's directory."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "logs.md").read_text()
    command = text.split("<!-- receiver -->\n```sh\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith("python3 -c ") and command.endswith(" log-socket")
    entry = hosts / "doc.test"
    backends(entry / "http-socket", answer_http)
    receiver = subprocess.Popen(["sh", "-c", "exec " + command], cwd=entry, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (entry / "log-socket").exists():
            assert time.monotonic() < deadline and receiver.poll() is None
            time.sleep(0.02)
        proxy = proxies("fasthttpdir", hosts, twin)
        port, _ = exchange("fasthttpdir", proxy, "doc.test")
        line = receiver.stdout.readline()
        assert LINE.match(line.rstrip("\n")) and f"client=127.0.0.1:{port} " in line, line
    finally:
        reap(receiver, 5)
