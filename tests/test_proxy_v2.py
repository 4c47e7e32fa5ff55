"""PROXY protocol v2 (haproxy proxy-protocol.txt §2.2) with the routed name in a
PP2_TYPE_AUTHORITY TLV: the header byte for byte, then real consumers (nginx, haproxy)
behind both proxies and both twins."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from backends import client_hello, recv_exactly
from realservers import Servers, pem_for_haproxy, write_tls_files

from fastsni.addresses import proxy_v2_header
from fastsni.engine import MARKERS_FRESH

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")


@pytest.mark.parametrize(
    "client, server, rest",
    [
        (  # TCP over IPv4: 0x21 (v2, PROXY), 0x11, length 24 = 12 address bytes + a 12-byte TLV
            ("192.0.2.1", 5000),
            ("198.51.100.2", 443),
            "2111 0018 c0000201 c6336402 1388 01bb",
        ),
        (  # IPv4-mapped IPv6 is written as IPv4
            ("::ffff:192.0.2.1", 5000, 0, 0),
            ("::ffff:198.51.100.2", 443, 0, 0),
            "2111 0018 c0000201 c6336402 1388 01bb",
        ),
        (  # TCP over IPv6: 0x21, length 48 = 36 + 12
            ("2001:db8::1", 5000, 0, 0),
            ("2001:db8::2", 443, 0, 0),
            "2121 0030 20010db8000000000000000000000001 20010db8000000000000000000000002 1388 01bb",
        ),
        (  # the two ends differ in family: UNSPEC, no address block, the TLV still there
            ("::ffff:192.0.2.1", 5000, 0, 0),
            ("2001:db8::2", 443, 0, 0),
            "2100 000c",
        ),
    ],
)
def test_header_bytes(client, server, rest):
    authority_tlv = "02 0009" + b"a.example".hex()  # type 0x02, length 9, the name
    expected = SIGNATURE + bytes.fromhex(rest + authority_tlv)
    assert proxy_v2_header(client, server, "a.example") == expected


def test_longest_name_fits_its_tlv():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 bytes
    header = proxy_v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), name)
    assert header[14:16] == (12 + 3 + 253).to_bytes(2, "big")
    assert header[28:31] == b"\x02" + (253).to_bytes(2, "big") and header[31:] == name.encode()


# -- which file asks for which version ---------------------------------------------------


def recording(seen: list, reply: bytes):
    """A backend that records everything up to the end of a request head, then replies."""

    def handle(conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        seen.append(data)
        conn.sendall(reply)

    return handle


@pytest.mark.parametrize("files", [("send-proxy-v2",), ("send-proxy-v1", "send-proxy-v2")])
def test_v2_file_selects_v2_and_wins_over_v1(twin, hosts, proxies, backends, files):
    """send-proxy-v2 of any file type (here a dangling symlink) selects v2; with both
    files present, v2 wins."""
    seen: list[bytes] = []
    backends(hosts / "a.test" / "http-socket", recording(seen, b"HTTP/1.1 204 No Content\r\n\r\n"))
    for marker in files:
        (hosts / "a.test" / marker).symlink_to("nowhere")
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: A.test:80\r\n\r\n")
        assert recv_exactly(sock, 27).startswith(b"HTTP/1.1 204")
        port = sock.getsockname()[1]
    expected = proxy_v2_header(("127.0.0.1", port), ("127.0.0.1", proxy.port), "a.test")
    assert seen[0].startswith(expected + b"GET / HTTP/1.1\r\n"), seen


def test_fastsni_sends_v2_then_the_hello(twin, hosts, proxies, backends):
    hello = client_hello("a.test")
    seen: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        head = recv_exactly(conn, 16)
        seen.append(head + recv_exactly(conn, int.from_bytes(head[14:16], "big")))
        seen.append(recv_exactly(conn, len(hello)))
        conn.sendall(b"ok")

    backends(hosts / "a.test" / "tls-socket", handle)
    (hosts / "a.test" / "send-proxy-v2").write_text("")
    (hosts / "a.test" / "send-proxy-v1").mkdir()  # any file type; v2 still wins
    proxy = proxies("fastsni", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(hello)
        assert recv_exactly(sock, 2) == b"ok"
        port = sock.getsockname()[1]
    assert seen == [proxy_v2_header(("127.0.0.1", port), ("127.0.0.1", proxy.port), "a.test"), hello]


def proxied(proxy, seen: list[bytes]) -> bool:
    """One request on a new connection: whether the backend's bytes began with a PROXY line."""
    with proxy.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert recv_exactly(sock, 12) == b"HTTP/1.1 204"
    return seen.pop().startswith(b"PROXY TCP4 127.0.0.1 ")


def test_marker_in_an_entry_directory_counts_at_once(twin, hosts, proxies, backends):
    """The markers are remembered between connections only while the entry's lstat is the
    same: a file made or removed in an entry directory changes its ctime."""
    seen: list[bytes] = []
    backends(hosts / "a.test" / "http-socket", recording(seen, b"HTTP/1.1 204 No Content\r\n\r\n"))
    proxy = proxies("fasthttpdir", hosts, twin)
    assert not proxied(proxy, seen)
    (hosts / "a.test" / "send-proxy-v1").touch()
    assert proxied(proxy, seen)
    (hosts / "a.test" / "send-proxy-v1").unlink()
    assert not proxied(proxy, seen)


def test_switch_brings_the_releases_markers_at_once(twin, hosts, proxies, backends):
    """A link switched by rename is a new entry inode, and the new release has its own
    socket: its markers count from the first connection after the switch, both ways."""
    seen: list[bytes] = []
    for release in ("v1", "v2"):
        backends(hosts / "_r" / release / "http-socket", recording(seen, b"HTTP/1.1 204 No Content\r\n\r\n"))
    (hosts / "_r" / "v2" / "send-proxy-v1").touch()
    (hosts / "a.test").symlink_to("_r/v1")
    proxy = proxies("fasthttpdir", hosts, twin)
    for release, header in [("v1", False), ("v2", True), ("v1", False), ("v2", True)]:
        (hosts / "next").symlink_to(f"_r/{release}")
        (hosts / "next").rename(hosts / "a.test")
        assert proxied(proxy, seen) == header, release


def test_marker_beside_a_linked_socket_counts_within_a_second(twin, hosts, proxies, backends):
    """A marker made in a directory the entry links to (entry, socket and their stat all
    unchanged) counts once MARKERS_FRESH has passed: within a second, not never."""
    seen: list[bytes] = []
    backends(hosts / "_r" / "v1" / "http-socket", recording(seen, b"HTTP/1.1 204 No Content\r\n\r\n"))
    (hosts / "a.test").symlink_to("_r/v1")
    proxy = proxies("fasthttpdir", hosts, twin)
    assert not proxied(proxy, seen)
    (hosts / "_r" / "v1" / "send-proxy-v1").touch()
    deadline = time.monotonic() + 5 * MARKERS_FRESH
    while not proxied(proxy, seen):
        assert time.monotonic() < deadline, "the marker never counted"
        time.sleep(0.05)


# -- real consumers: nginx (proxy_protocol) and haproxy (accept-proxy) -------------------


@pytest.fixture
def servers(tmp_path):
    started = Servers(tmp_path)
    yield started
    started.stop()


def curl(url: str, port: int, ca_pem=None) -> str:
    """curl's body for ``url``, connecting to the proxy's port on 127.0.0.1."""
    host = url.split("/")[2]
    command = ["curl", "-sS", "--max-time", "10", "--connect-to", f"{host}:443:127.0.0.1:{port}"]
    command += ["--connect-to", f"{host}:80:127.0.0.1:{port}"]
    if ca_pem is not None:
        command += ["--cacert", str(ca_pem)]
    return subprocess.run(command + [url], capture_output=True, text=True, timeout=20, check=True).stdout


@pytest.mark.parametrize("consumer", ["nginx", "haproxy"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_consumer_behind_fasthttpdir(twin, hosts, proxies, servers, consumer, version):
    path = hosts / "pp.test" / "http-socket"
    path.parent.mkdir()
    (path.parent / f"send-proxy-{version}").write_text("")
    getattr(servers, consumer)(path)
    proxy = proxies("fasthttpdir", hosts, twin)
    fields = curl("http://pp.test/", proxy.port).split()
    assert fields[0] == "127.0.0.1" and int(fields[1]) > 0, fields
    assert fields[2:4] == ["127.0.0.1", str(proxy.port)], fields
    if consumer == "haproxy" and version == "v2":
        assert fields[4:] == ["pp.test"]  # fc_pp_authority: the TLV


@pytest.mark.parametrize("consumer", ["nginx", "haproxy"])
def test_real_tls_consumer_behind_fastsni(twin, hosts, proxies, servers, consumer, ca, tmp_path):
    path = hosts / "pp.test" / "tls-socket"
    path.parent.mkdir()
    (path.parent / "send-proxy-v2").write_text("")
    chain, key = write_tls_files(ca, "pp.test", tmp_path)
    if consumer == "nginx":
        servers.nginx(path, (chain, key))
    else:
        servers.haproxy(path, pem_for_haproxy(chain, key))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    proxy = proxies("fastsni", hosts, twin)
    fields = curl("https://pp.test/", proxy.port, ca_pem).split()
    assert fields[0] == "127.0.0.1" and int(fields[1]) > 0, fields
    assert fields[2:4] == ["127.0.0.1", str(proxy.port)], fields
    if consumer == "haproxy":
        assert fields[4:] == ["pp.test"]


def test_real_consumer_sees_ipv6(twin, hosts, proxies, servers):
    path = hosts / "pp.test" / "http-socket"
    path.parent.mkdir()
    (path.parent / "send-proxy-v2").write_text("")
    servers.haproxy(path)
    proxy = proxies("fasthttpdir", hosts, twin, address="::1")
    with socket.create_connection(("::1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        port = sock.getsockname()[1]
    fields = answer.split(b"\r\n\r\n", 1)[1].decode().split()
    assert fields == ["::1", str(port), "::1", str(proxy.port), "pp.test"]
