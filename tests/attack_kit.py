"""Shared by the attack, fault, confinement and handover tests: what they measure of a
running proxy (/proc), a real HTTP/1.1 server on a Unix socket, and raw ClientHellos."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import resource
import socket
import socketserver
import threading
import time
from pathlib import Path

from test_fastsni import rss_kib  # noqa: F401  (re-exported)
from test_tls import hello, records, sni

PROGRAMS = ["fastsni", "fasthttpdir"]
LEAF = {"fastsni": "tls-socket", "fasthttpdir": "http-socket"}
USER_CANCELED = bytes.fromhex("1503030002025a")  # the alert fastsni sends at the hello deadline
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """Thousands of client sockets in the test process: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (proc(5): fields 14 and 15 of stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(condition, timeout: float, what: str, step: float = 0.01) -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


def drain_log(proxy) -> list[str]:
    """Everything the proxy has written to stderr so far (its reader thread queues lines)."""
    while not proxy.lines.empty():
        proxy.log.append(proxy.lines.get_nowait())
    return proxy.log


def no_tracebacks(log: list[str]) -> None:
    bad = [line for line in log if "Traceback" in line or "internal error" in line]
    assert not bad, bad


def raw_hello(name: bytes) -> bytes:
    """A ClientHello whose server_name carries ``name`` byte for byte, whatever it holds
    (real clients refuse to send hostile names)."""
    return records(hello(sni(name)))


class HttpHandler(http.server.BaseHTTPRequestHandler):
    """The standard library's HTTP/1.1 server: GET answers ``<tag> <path>``; POST answers
    the sha256 and size of its body; /big?N answers N bytes of a fixed pattern."""

    protocol_version = "HTTP/1.1"
    server: UnixHttpServer

    def do_GET(self) -> None:
        if self.path.startswith("/big?"):
            size = int(self.path[5:])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = bytes(range(256)) * 256
            while size > 0:
                self.wfile.write(block[:size])
                size -= len(block)
            return
        self.answer(f"{self.server.tag} {self.path}\n".encode())

    def do_POST(self) -> None:
        size = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        left = size
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            digest.update(chunk)
            left -= len(chunk)
        self.answer(f"{self.server.tag} {size} {digest.hexdigest()}\n".encode())

    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # quiet: no client address on a Unix socket
        pass


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, path: Path, tag: str = "backend") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        super().__init__(str(path), HttpHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def server_bind(self) -> None:
        """Bind a path too long for sun_path through its directory's descriptor."""
        path = Path(self.server_address)
        if len(str(path)) < 100:
            return super().server_bind()
        dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            self.socket.bind(f"/proc/self/fd/{dirfd}/{path.name}")
        finally:
            os.close(dirfd)

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants an address tuple

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


def http_get(port: int, host: str, path: str = "/", timeout: float = 10) -> tuple[int, bytes]:
    """One request on a fresh connection with the standard library's client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1024)
    return sock
