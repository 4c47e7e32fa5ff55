"""fasthttpdir answers 308 to https for a host that has a tls-socket but no http-socket;
curl follows it through fastsni to a real TLS backend.  Both twins."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest
from backends import recv_exactly, recv_until_eof

from fasthttpdir.proxy import https_path, redirect_response


def redirect(location: bytes, close: bool = False) -> bytes:
    body = b"Moved to %s\n" % location
    return (
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n%s\r\n%s"
        % (location, len(body), b"Connection: close\r\n" if close else b"", body)
    )


@pytest.mark.parametrize(
    "target, path",
    [
        (b"/", b"/"),
        (b"/a/b?x=1&y=%20", b"/a/b?x=1&y=%20"),  # origin-form: as sent
        (b"http://a.test/p?q", b"/p?q"),  # absolute-form: its path and query
        (b"http://a.test:80/p?q#frag", b"/p?q"),
        (b"HTTP://a.test", b"/"),
        (b"http://a.test?x", b"/?x"),
        (b"*", b"/"),
        # never let a control byte reach the header, whatever a parser let through
        (b"/a\r\nSet-Cookie: x", b"/a%0D%0ASet-Cookie:%20x"),
        (b"/\x00\x7f\xc3\xa9", b"/%00%7F%C3%A9"),
    ],
)
def test_https_path(target, path):
    assert https_path(target) == path


def test_head_gets_the_length_without_the_body():
    answer = redirect_response("a.test", b"HEAD", b"/x", False)
    assert answer == redirect(b"https://a.test/x").split(b"\r\n\r\n")[0] + b"\r\n\r\n"


def hosts_with_tls_only(hosts):
    (hosts / "tls.test").mkdir()
    with socket.socket(socket.AF_UNIX) as placeholder:  # a socket file nobody listens on
        placeholder.bind(str(hosts / "tls.test" / "tls-socket"))


def test_redirect_keeps_the_connection_alive(twin, hosts, proxies):
    hosts_with_tls_only(hosts)
    (hosts / "neither.test").mkdir()
    proxy = proxies("fasthttpdir", hosts, twin)
    with proxy.connect() as sock:
        sock.sendall(b"GET /a?b HTTP/1.1\r\nHost: TLS.test:8080\r\n\r\n")
        expected = redirect(b"https://tls.test/a?b")
        assert recv_exactly(sock, len(expected)) == expected
        sock.sendall(
            b"POST http://tls.test/form?x#f HTTP/1.1\r\nHost: tls.test\r\nContent-Length: 3\r\n\r\nabc"
        )
        expected = redirect(b"https://tls.test/form?x")
        assert recv_exactly(sock, len(expected)) == expected
        sock.sendall(b"GET / HTTP/1.1\r\nHost: neither.test\r\n\r\n")  # neither socket: 404 as before
        assert recv_exactly(sock, 12) == b"HTTP/1.1 404"
    with proxy.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
        assert recv_until_eof(sock) == redirect(b"https://tls.test/", close=True)


def test_wildcard_tls_only_redirects_with_the_asked_name(twin, hosts, proxies):
    (hosts / "*.wild.test").mkdir()
    (hosts / "claimed.wild.test").mkdir()
    with socket.socket(socket.AF_UNIX) as placeholder:
        placeholder.bind(str(hosts / "*.wild.test" / "tls-socket"))
        proxy = proxies("fasthttpdir", hosts, twin)
        with proxy.connect() as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: a.wild.test\r\n\r\n")
            expected = redirect(b"https://a.wild.test/x")
            assert recv_exactly(sock, len(expected)) == expected
            # an exact entry without sockets wins over the wildcard: no redirect, 404
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: claimed.wild.test\r\n\r\n")
            assert recv_exactly(sock, 12) == b"HTTP/1.1 404"


def path_echo_backend(ca, name: str):
    """A TLS backend answering with the request line it got."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)

    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                head += chunk
            body = head.split(b"\r\n", 1)[0] + b"\n"
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    return handle


def test_curl_follows_the_redirect_through_fastsni(twin, hosts, proxies, backends, ca, tmp_path):
    backends(hosts / "tls.test" / "tls-socket", path_echo_backend(ca, "tls.test"))
    http = proxies("fasthttpdir", hosts, twin)
    https = proxies("fastsni", hosts, twin)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = subprocess.run(
        ["curl", "-sS", "-L", "--max-time", "10", "--cacert", ca_file, "-w", "%{url_effective} %{http_code}"]
        + [
            "--connect-to",
            f"tls.test:80:127.0.0.1:{http.port}",
            "--connect-to",
            f"tls.test:443:127.0.0.1:{https.port}",
        ]
        + ["http://tls.test/some/path?q=1"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"GET /some/path?q=1 HTTP/1.1\nhttps://tls.test/some/path?q=1 200"
