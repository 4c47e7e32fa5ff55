# cython: language_level=3
"""Compiled twin of fastsni/addresses.py: the PROXY v1 line and v2 header, the client IP
and the ``ip:port`` of log lines, function for function.  The pure module is the
specification; the v2 header is written here in one allocation, with the kernel's
inet_pton, for every connection to a backend that asked for PROXY headers."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

import struct

from fastsni.addresses import (
    PP2_TYPE_AUTHORITY,
    PROXY_V2_COMMAND,
    PROXY_V2_FAMILY,
    PROXY_V2_SIGNATURE,
    PROXY_V2_UNSPEC,
)

cdef extern from "<sys/socket.h>":
    int AF_INET
    int AF_INET6

cdef extern from "<arpa/inet.h>":
    int inet_pton(int af, const char* src, void* dst)

cdef bytes C_SIGNATURE = PROXY_V2_SIGNATURE
cdef unsigned char C_COMMAND = PROXY_V2_COMMAND, C_UNSPEC = PROXY_V2_UNSPEC, C_AUTHORITY = PP2_TYPE_AUTHORITY
cdef unsigned char C_TCP4 = PROXY_V2_FAMILY[4], C_TCP6 = PROXY_V2_FAMILY[6]


cdef tuple _plain_ip(str address):
    """(4 or 6, address) with IPv4-mapped IPv6 unwrapped and any %scope dropped."""
    if ":" not in address:
        return 4, address
    address = address.partition("%")[0]
    if address[:7].lower() == "::ffff:" and "." in address:
        return 4, address[7:]
    return 6, address


def proxy_v1_header(client, server):
    """The PROXY protocol v1 line (haproxy proxy-protocol.txt §2.1): see the pure twin."""
    client_family, client_ip = _plain_ip(client[0])
    server_family, server_ip = _plain_ip(server[0])
    if client_family != server_family:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY TCP{client_family} {client_ip} {server_ip} {client[1]} {server[1]}\r\n".encode("ascii")


cdef int _packed_ip(int family, str ip, unsigned char* out) except -1:
    """socket.inet_pton(family, ip) into ``out``; its OSError for a bad address."""
    if inet_pton(family, ip.encode("ascii"), out) != 1:
        raise OSError("illegal IP address string passed to inet_pton")
    return 0


cdef int _port(object port, unsigned char* out) except -1:
    """struct.pack("!H", port) into ``out``; its struct.error out of range."""
    cdef long value = port
    if value < 0 or value > 0xFFFF:
        raise struct.error("'H' format requires 0 <= number <= 65535")
    out[0] = value >> 8
    out[1] = value & 0xFF
    return 0


def proxy_v2_header(client, server, str name):
    """The PROXY protocol v2 header (proxy-protocol.txt §2.2) with the name in a
    PP2_TYPE_AUTHORITY TLV (§2.2.1): see the pure twin."""
    cdef unsigned char addresses[36]  # two IPv6 addresses and two ports at most
    cdef Py_ssize_t size = 0, ip_size, rest, at
    cdef unsigned char family = C_UNSPEC
    cdef bytes authority, header
    cdef unsigned char* out
    client_family, client_ip = _plain_ip(client[0])
    server_family, server_ip = _plain_ip(server[0])
    if client_family == server_family:
        kind = AF_INET if client_family == 4 else AF_INET6
        family = C_TCP4 if client_family == 4 else C_TCP6
        ip_size = 4 if client_family == 4 else 16
        _packed_ip(kind, client_ip, addresses)
        _packed_ip(kind, server_ip, addresses + ip_size)
        _port(client[1], addresses + 2 * ip_size)
        _port(server[1], addresses + 2 * ip_size + 2)
        size = 2 * ip_size + 4
    authority = name.encode("ascii")
    rest = size + 3 + len(authority)
    if rest > 0xFFFF:  # the pure twin's struct.pack("!H") of it
        raise struct.error("'H' format requires 0 <= number <= 65535")
    header = PyBytes_FromStringAndSize(NULL, 16 + rest)
    out = <unsigned char*>PyBytes_AS_STRING(header)
    memcpy(out, PyBytes_AS_STRING(C_SIGNATURE), 12)
    out[12] = C_COMMAND
    out[13] = family
    out[14] = rest >> 8
    out[15] = rest & 0xFF
    memcpy(out + 16, addresses, size)
    at = 16 + size
    out[at] = C_AUTHORITY
    out[at + 1] = len(authority) >> 8
    out[at + 2] = len(authority) & 0xFF
    memcpy(out + at + 3, PyBytes_AS_STRING(authority), len(authority))
    return header


def proxy_header(int version, client, server, str name):
    """The PROXY header of ``version`` (1 or 2): see the pure twin."""
    if version == 2:
        return proxy_v2_header(client, server, name)
    return proxy_v1_header(client, server)


def client_ip(address):
    """The client's IP as shown to backends: IPv4-mapped IPv6 as plain IPv4."""
    return _plain_ip(address[0])[1]


def describe(address):
    """``ip:port`` or ``[ip]:port`` for log lines."""
    family, ip = _plain_ip(address[0])
    return f"{ip}:{address[1]}" if family == 4 else f"[{ip}]:{address[1]}"
