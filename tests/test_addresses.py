"""Addresses as the proxies show them: PROXY v1 line and v2 header, client IP, log form;
the pure twin (fastsni/addresses.py) and the compiled one (pyx/_addresses.pyx) agree."""

from __future__ import annotations

import importlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def compiled():
    try:
        return importlib.import_module("fastsni._addresses")
    except ImportError:
        pytest.skip("fastsni._addresses is not built")


def test_twins_table(twin):
    """Each twin: v1, v2 (both families, mixed, mapped, scoped) byte for byte."""
    module = twin.module("fastsni.addresses", "fastsni._addresses")
    v4 = (("192.0.2.1", 5000), ("198.51.100.2", 443))
    v6 = (("2001:db8::1", 5000, 0, 0), ("2001:db8::2", 443, 0, 0))
    mapped = (("::ffff:192.0.2.1", 1, 0, 0), ("198.51.100.2", 2))
    mixed = (("::ffff:192.0.2.1", 1, 0, 0), ("2001:db8::2", 2, 0, 0))
    scoped = (("fe80::1%eth0", 1, 0, 2), ("fe80::2%eth0", 2, 0, 2))
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    assert module.proxy_header(2, *v4, "a.test") == (
        signature + b"\x21\x11\x00\x15" + bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x13\x88\x01\xbb"
        b"\x02\x00\x06a.test"
    )
    assert module.proxy_header(2, *mixed, "a.test") == signature + b"\x21\x00\x00\x09\x02\x00\x06a.test"
    assert module.proxy_header(2, *v6, "b")[13:16] == b"\x21\x00\x28"  # 36 address bytes + 4 of TLV
    assert module.proxy_header(2, *mapped, "b")[13] == 0x11
    assert module.proxy_header(1, *scoped, "b") == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    assert module.proxy_header(1, *v4, "b") == b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n"
    assert module.client_ip(("::ffff:10.1.2.3", 9, 0, 0)) == "10.1.2.3"
    assert module.describe(("::1", 80, 0, 0)) == "[::1]:80"
    with pytest.raises(OSError):
        module.proxy_header(2, ("192.0.2.300", 1), ("192.0.2.1", 2), "b")
    with pytest.raises(struct.error):
        module.proxy_header(2, ("192.0.2.3", 65536), ("192.0.2.1", 2), "b")


def outcome(call, *args):
    try:
        return call(*args)
    except (OSError, struct.error, UnicodeError) as exc:
        return type(exc)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
mapped = ipv4.map(lambda ip: "::ffff:" + ip)
scoped = st.tuples(ipv6, st.sampled_from(["", "%eth0", "%1"])).map("".join)
hosts = st.one_of(ipv4, ipv6, mapped, scoped, st.text("0123456789abcdef.:%fFx", max_size=45))
ports = st.one_of(st.integers(0, 65535), st.integers(-2, 70000))
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-*", min_size=1, max_size=253)


@settings(max_examples=500, deadline=None)
@given(hosts, ports, hosts, ports, names, st.sampled_from([1, 2]))
def test_twins_agree(client_host, client_port, server_host, server_port, name, version):
    """The compiled twin writes what the pure one does, or fails the same way."""
    client = (client_host, client_port) if ":" not in client_host else (client_host, client_port, 0, 0)
    server = (server_host, server_port) if ":" not in server_host else (server_host, server_port, 0, 0)
    fast = compiled()
    expected = outcome(relay.proxy_header, version, client, server, name)
    assert outcome(fast.proxy_header, version, client, server, name) == expected
    assert outcome(fast.client_ip, client) == outcome(relay.client_ip, client)
    assert outcome(fast.describe, client) == outcome(relay.describe, client)
