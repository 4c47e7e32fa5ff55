"""fasthttpdir with real clients and servers: uvicorn behind it; curl, httpx and websockets in front;
big transfers both ways and a slow client's bounded memory."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httptools
import pytest
from backends import UnixBackend, reap
from test_fasthttpdir import read_request

APP = """
async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            await send({"type": "websocket.send", "text": "echo " + message["text"]})
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    body = (
        f"{scope['method']} {scope['path']} {size} "
        f"{headers.get(b'x-forwarded-for', b'-').decode()}\\n"
    ).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    for piece in (body[:5], body[5:]):  # two pieces: uvicorn answers chunked
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
"""


@pytest.fixture
def uvicorn_backend(hosts, tmp_path):
    """uvicorn serving APP on hosts/app.example/http-socket; reaped at teardown."""
    (tmp_path / "asgi_app.py").write_text(APP)
    path = hosts / "app.example" / "http-socket"
    path.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "asgi_app:app", "--uds", str(path), "--log-level", "warning"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield path
    finally:
        reap(process)


def test_curl_and_httpx_through_uvicorn(hosts, twin, proxies, uvicorn_backend):
    httpx = pytest.importorskip("httpx")
    proxy = proxies("fasthttpdir", hosts, twin)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--connect-to", f"app.example:80:127.0.0.1:{proxy.port}"]
        + ["http://app.example/a", "http://app.example/b", "-d", "xyz"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "POST /a 3 127.0.0.1\nPOST /b 3 127.0.0.1\n"
    with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", headers={"Host": "app.example"}) as client:
        for index in range(3):
            response = client.post(f"/h{index}", content=b"x" * 100000)
            assert response.status_code == 200
            assert response.text == f"POST /h{index} 100000 127.0.0.1\n"
        assert client.get("/", headers={"Host": "nobody.example"}).status_code == 404


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_wrk_for_two_seconds_through_uvicorn(hosts, twin, proxies, uvicorn_backend):
    """Keep-alive load from a real benchmark client: every answer a 200, the proxy unharmed."""
    proxy = proxies("fasthttpdir", hosts, twin)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            "16",
            "-d",
            "2s",
            "-H",
            "Host: app.example",
            f"http://127.0.0.1:{proxy.port}/w",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    done = re.search(r"(\d+) requests in", out.stdout)
    assert done and int(done.group(1)) > 100, out.stdout
    assert "Non-2xx" not in out.stdout and "Socket errors" not in out.stdout, out.stdout
    assert proxy.process.poll() is None


def test_websocket_echo_through_uvicorn(hosts, twin, proxies, uvicorn_backend):
    sync_client = pytest.importorskip("websockets.sync.client")
    proxy = proxies("fasthttpdir", hosts, twin)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with sync_client.connect("ws://app.example/ws", sock=sock, open_timeout=10) as websocket:
        for text in ("one", "two", "x" * 200000):
            websocket.send(text)
            assert websocket.recv(timeout=10) == "echo " + text


@pytest.fixture
def backends():
    started: list[UnixBackend] = []

    def start(hosts: Path, name: str, handle) -> UnixBackend:
        backend = UnixBackend(hosts / name / "http-socket", handle)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


BIG = 64 * 1024 * 1024
PIECE = bytes(range(256)) * 4096  # 1 MiB


def big_body_sha() -> str:
    digest = hashlib.sha256()
    for _ in range(BIG // len(PIECE)):
        digest.update(PIECE)
    return digest.hexdigest()


def test_64_mib_upload(hosts, twin, proxies, backends):
    seen: list = []

    def handle(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        buffer = bytearray()
        state = {"size": 0}

        class Body:
            def on_body(self, body):
                digest.update(body)
                state["size"] += len(body)

            def on_message_complete(self):
                state["done"] = True

        parser = httptools.HttpRequestParser(Body())
        while "done" not in state:
            data = conn.recv(1 << 20)
            if not data:
                return
            parser.feed_data(data)
        del buffer
        seen.append((state["size"], digest.hexdigest()))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backends(hosts, "a", handle)
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect(timeout=30) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG)
        for _ in range(BIG // len(PIECE)):
            sock.sendall(PIECE)
        answer = b""
        while not answer.endswith(b"ok"):
            chunk = sock.recv(1000)
            assert chunk
            answer += chunk
    assert seen == [(BIG, big_body_sha())]


def download_backend(progress: dict):
    def handle(conn: socket.socket) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        for _ in range(BIG // len(PIECE)):
            conn.sendall(PIECE)
            progress["sent"] = progress.get("sent", 0) + len(PIECE)

    return handle


def read_answer(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    digest.update(rest)
    size = len(rest)
    while size < BIG:
        chunk = sock.recv(1 << 20)
        assert chunk
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_64_mib_download_and_slow_client_memory(hosts, twin, proxies, backends):
    progress: dict = {}
    backends(hosts, "a", download_backend(progress))
    proxy = proxies("fasthttpdir", hosts, twin)
    before = vm_rss_kib(proxy.process.pid)
    with proxy.connect(timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        # The client reads nothing: the backend must stall far short of 64 MiB.
        last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + 20
        while time.monotonic() - stable_since < 1.0:
            assert time.monotonic() < deadline
            if progress.get("sent", 0) != last:
                last, stable_since = progress.get("sent", 0), time.monotonic()
            threading.Event().wait(0.05)
        assert last < BIG // 2
        grown = vm_rss_kib(proxy.process.pid) - before
        assert grown < 16 * 1024, f"proxy grew by {grown} KiB while the client did not read"
        assert read_answer(sock) == (BIG, big_body_sha())


def test_curl_upload_gets_an_early_413(hosts, twin, proxies, backends, tmp_path):
    """curl uploading 32 MiB to a backend that refuses it at the head, unread: curl gets
    the 413 and its body.  (curl reads while it sends, so it copes with a reset too; the
    raw-socket test_early_answer_reaches_a_client_still_uploading is the one that needs
    fasthttpdir's lingering close.)"""
    refused = threading.Event()

    def refuse(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge")
        refused.wait(20)  # the body stays unread

    backends(hosts, "a", refuse)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(32 << 20))
    proxy = proxies("fasthttpdir", hosts, twin)
    try:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-o", "-", "-w", " %{http_code}", "-H", "Expect:"]
            + ["--data-binary", f"@{upload}", "--connect-to", f"a:80:127.0.0.1:{proxy.port}", "http://a/"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        refused.set()
    assert (result.returncode, result.stdout) == (0, "large 413"), result.stderr
