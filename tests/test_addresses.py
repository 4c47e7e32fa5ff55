"""Addresses as the proxies show them: PROXY v1 line, client IP, log form (pure only: not hot)."""

from __future__ import annotations

import pytest

from fastsni import addresses as relay


@pytest.mark.parametrize(
    "client, server, line",
    [
        (("192.0.2.1", 5000), ("198.51.100.2", 443), b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"),
        (
            ("2001:db8::1", 5000, 0, 0),
            ("2001:db8::2", 443, 0, 0),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n",
        ),
        (
            ("::ffff:192.0.2.1", 1, 0, 0),
            ("::ffff:198.51.100.2", 2, 0, 0),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        ),
        (("::ffff:192.0.2.1", 1, 0, 0), ("2001:db8::2", 2, 0, 0), b"PROXY UNKNOWN\r\n"),
        (("fe80::1%eth0", 1, 0, 2), ("fe80::2%eth0", 2, 0, 2), b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"),
    ],
)
def test_proxy_v1_header(client, server, line):
    assert relay.proxy_v1_header(client, server) == line
    assert len(line) <= 107  # proxy-protocol.txt §2.1: the longest v1 line


def test_client_ip_and_describe():
    assert relay.client_ip(("::ffff:10.1.2.3", 9, 0, 0)) == "10.1.2.3"
    assert relay.client_ip(("2001:db8::5", 9, 0, 0)) == "2001:db8::5"
    assert relay.describe(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert relay.describe(("::1", 80, 0, 0)) == "[::1]:80"
    assert relay.describe(("::ffff:127.0.0.1", 80, 0, 0)) == "127.0.0.1:80"
