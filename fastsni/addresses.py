"""Socket addresses as the proxies show them: the PROXY v1 line and v2 header, the
client IP for X-Forwarded-For, and the ``ip:port`` of log lines.  The specification of
its compiled twin, pyx/_addresses.pyx, which the compiled proxies use: a PROXY header
goes out with every connection to a backend that asked for one.
"""

from __future__ import annotations

import socket
import struct

# haproxy proxy-protocol.txt §2.2: the binary header's fixed 12-byte signature, then
# version 2 + command PROXY, then the address family + transport protocol.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_COMMAND = 0x21  # version 2 (high nibble), PROXY (low nibble)
PROXY_V2_FAMILY = {4: 0x11, 6: 0x21}  # TCP over IPv4, TCP over IPv6
PROXY_V2_UNSPEC = 0x00  # unknown: no address block (§2.2, like v1's "UNKNOWN")
PP2_TYPE_AUTHORITY = 0x02  # §2.2.1: the host name the client asked for (SNI or Host)


def _plain_ip(address: str) -> tuple[int, str]:
    """(4 or 6, address) with IPv4-mapped IPv6 unwrapped and any %scope dropped."""
    if ":" not in address:
        return 4, address
    address = address.split("%", 1)[0]
    if address.lower().startswith("::ffff:") and "." in address:
        return 4, address[7:]
    return 6, address


def proxy_v1_header(client: tuple, server: tuple) -> bytes:
    """The PROXY protocol v1 line (haproxy proxy-protocol.txt §2.1) for a TCP connection."""
    client_family, client_ip = _plain_ip(client[0])
    server_family, server_ip = _plain_ip(server[0])
    if client_family != server_family:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY TCP{client_family} {client_ip} {server_ip} {client[1]} {server[1]}\r\n".encode("ascii")


def proxy_v2_header(client: tuple, server: tuple, name: str) -> bytes:
    """The PROXY protocol v2 header (proxy-protocol.txt §2.2) for a TCP connection routed
    by ``name``, which travels in a PP2_TYPE_AUTHORITY TLV (§2.2.1).

    IPv4-mapped IPv6 addresses are written as IPv4; if the two ends still differ in
    family, the family is UNSPEC and no addresses are sent (the receiver then uses the
    connection's own, §2.2).
    """
    client_family, client_ip = _plain_ip(client[0])
    server_family, server_ip = _plain_ip(server[0])
    if client_family != server_family:
        family, addresses = PROXY_V2_UNSPEC, b""
    else:
        kind = socket.AF_INET if client_family == 4 else socket.AF_INET6
        family = PROXY_V2_FAMILY[client_family]
        addresses = (
            socket.inet_pton(kind, client_ip)
            + socket.inet_pton(kind, server_ip)
            + struct.pack("!HH", client[1], server[1])
        )
    authority = name.encode("ascii")
    tlv = struct.pack("!BH", PP2_TYPE_AUTHORITY, len(authority)) + authority
    rest = addresses + tlv
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", PROXY_V2_COMMAND, family, len(rest)) + rest


def proxy_header(version: int, client: tuple, server: tuple, name: str) -> bytes:
    """The PROXY header of ``version`` (1 or 2) for a connection from ``client`` (its
    address, as accept gave it) to ``server`` (our end: fastsni.engine.local_of)."""
    if version == 2:
        return proxy_v2_header(client, server, name)
    return proxy_v1_header(client, server)


def client_ip(address: tuple) -> str:
    """The client's IP as shown to backends: IPv4-mapped IPv6 as plain IPv4."""
    return _plain_ip(address[0])[1]


def describe(address: tuple) -> str:
    """``ip:port`` or ``[ip]:port`` for log lines."""
    family, ip = _plain_ip(address[0])
    return f"{ip}:{address[1]}" if family == 4 else f"[{ip}]:{address[1]}"
