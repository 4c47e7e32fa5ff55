"""One-label wildcard directories, ``*.example.test``: exact entries first, then the
wildcard for names with exactly one more label; both proxies, both twins, real clients."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from backends import client_hello, recv_exactly, recv_until_eof, tls_http_backend

from fastsni.addresses import proxy_v2_header
from fastsni.hostname import directory_name
from fastsni.tls import UNRECOGNIZED_NAME, alert

WILD = "*.example.test"


def tagged(tag: str, proxies_seen: list | None = None):
    """A keep-alive HTTP backend answering each request with ``tag`` and the Host it got;
    with ``proxies_seen``, it first reads a PROXY v2 header and records it."""

    def handle(conn: socket.socket) -> None:
        if proxies_seen is not None:
            head = recv_exactly(conn, 16)
            proxies_seen.append(head + recv_exactly(conn, int.from_bytes(head[14:16], "big")))
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            host = [line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")][0][5:].strip()
            body = b"%s %s\n" % (tag.encode(), host)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return handle


def layout(hosts, leaf: str, handler_for) -> None:
    """The wildcard as a symlink to a release directory, one exact name, and one claimed
    name whose directory has no backend socket (it still wins over the wildcard)."""
    backends, make = handler_for
    backends(hosts / "wild-v1" / leaf, make("*.example.test"))
    (hosts / WILD).symlink_to("wild-v1")
    backends(hosts / "exact.example.test" / leaf, make("exact.example.test"))
    (hosts / "claimed.example.test").mkdir()


ROUTES = {
    "a.example.test": "*.example.test",
    "b-2.example.test": "*.example.test",
    "exact.example.test": "exact.example.test",
    "claimed.example.test": None,  # an exact entry without a socket: not the wildcard
    "a.b.example.test": None,  # two more labels
    "example.test": None,  # the wildcard's own rest
}


def test_fastsni_routes_by_wildcard(twin, hosts, proxies, backends, ca, tmp_path):
    layout(hosts, "tls-socket", (backends, lambda name: tls_http_backend(ca, name)))
    proxy = proxies("fastsni", hosts, twin)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for name, served_by in ROUTES.items():
        if served_by is None:
            with proxy.connect() as sock:
                sock.sendall(client_hello(name))
                assert recv_until_eof(sock) == alert(UNRECOGNIZED_NAME), name
            continue
        result = subprocess.run(
            ["curl", "-sS", "--http1.1", "--cacert", ca_file, "--resolve", f"{name}:{proxy.port}:127.0.0.1"]
            + [f"https://{name}:{proxy.port}/"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout == f"backend {served_by} alpn http/1.1\n".encode(), name


def test_fasthttpdir_routes_by_wildcard(twin, hosts, proxies, backends):
    layout(hosts, "http-socket", (backends, tagged))
    proxy = proxies("fasthttpdir", hosts, twin)
    for name, served_by in ROUTES.items():
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                "%{http_code}",
                "--connect-to",
                f"{name}:80:127.0.0.1:{proxy.port}",
            ]
            + [f"http://{name}/"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, (name, result.stderr)
        if served_by is None:
            assert result.stdout.endswith(b"404"), (name, result.stdout)
        else:
            assert result.stdout == f"{served_by} {name}\n200".encode(), name


def test_fasthttpdir_wildcard_names_get_their_own_backend_connections(twin, hosts, proxies, backends):
    """Two names under one wildcard are two hosts: a new backend connection for each,
    each with its own name in the PROXY v2 TLV."""
    seen: list[bytes] = []
    backends(hosts / WILD / "http-socket", tagged("wild", seen))
    (hosts / WILD / "send-proxy-v2").write_text("")
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        port = sock.getsockname()[1]
        for name in ("a.example.test", "a.example.test", "b.example.test"):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
            body = b"wild %s\n" % name.encode()
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            assert recv_exactly(sock, len(answer)) == answer
    ends = (("127.0.0.1", port), ("127.0.0.1", proxy.port))
    assert seen == [proxy_v2_header(*ends, "a.example.test"), proxy_v2_header(*ends, "b.example.test")]


@pytest.mark.parametrize(
    "name, entry",
    [
        ("*.Example.COM", "*.example.com"),
        ("*.Bücher.example.", "*.xn--bcher-kva.example"),
        ("*.localhost", "*.localhost"),
    ],
)
def test_hostname_tool_accepts_wildcards(name, entry):
    assert directory_name(name) == entry


@pytest.mark.parametrize(
    "name", ["*", "*.", "a*.example.com", "*a.example.com", "*.*.example.com", "a.*.example"]
)
def test_hostname_tool_refuses_other_stars(name):
    with pytest.raises(ValueError, match=r"\*"):
        directory_name(name)


def test_hostname_tool_prints_the_wildcard_directory():
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.hostname", "*.Bücher.Example"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "*.xn--bcher-kva.example\n")
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.hostname", "a.*.example"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1 and "leftmost label" in result.stderr


def test_long_names_through_a_wildcard_with_proxy_v2(twin, hosts, proxies, backends):
    """Paths past sun_path's 108 bytes go through the directory's descriptor: the
    wildcard and the send-proxy-v2 lookup work there too."""
    rest = ".".join(["b" * 63, "c" * 63, "d" * 61])  # 189 bytes
    name = "a" * 63 + "." + rest  # 253 bytes, the longest valid name
    hello = client_hello(name)
    seen: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        head = recv_exactly(conn, 16)
        seen.append(head + recv_exactly(conn, int.from_bytes(head[14:16], "big")))
        recv_exactly(conn, len(hello))
        conn.sendall(b"ok")

    backends(hosts / f"*.{rest}" / "tls-socket", handle)
    (hosts / f"*.{rest}" / "send-proxy-v2").write_text("")
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(hello)
        assert recv_exactly(sock, 2) == b"ok"
        port = sock.getsockname()[1]
    assert seen == [proxy_v2_header(("127.0.0.1", port), ("127.0.0.1", proxy.port), name)]
