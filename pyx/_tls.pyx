# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of fastsni/tls.py: hostname rules and the incremental ClientHello reader.

Function for function the same as the pure module, which is the specification; the
constants, alert() and HelloError are shared with it, not copied.
"""

from fastsni.tls import (
    CONTENT_HANDSHAKE,
    DECODE_ERROR,
    EXTENSION_SERVER_NAME,
    HANDSHAKE_CLIENT_HELLO,
    INTERNAL_ERROR,
    MAX_BUFFER,
    MAX_FRAGMENT,
    MAX_HOSTNAME,
    NAME_TYPE_HOST_NAME,
    RECORD_OVERFLOW,
    UNEXPECTED_MESSAGE,
    UNRECOGNIZED_NAME,
    USER_CANCELED,
    HelloError,
    alert,
)

cdef Py_ssize_t C_MAX_BUFFER = MAX_BUFFER
cdef Py_ssize_t C_MAX_FRAGMENT = MAX_FRAGMENT
cdef Py_ssize_t C_MAX_HOSTNAME = MAX_HOSTNAME


cdef inline bint _host_byte(unsigned char byte) noexcept:
    return (0x61 <= byte <= 0x7A) or (0x30 <= byte <= 0x39) or byte == 0x2E or byte == 0x2D


cdef object _check(const unsigned char* raw, Py_ssize_t length):
    """check_hostname on a byte range: the lowercase name, or None."""
    cdef Py_ssize_t i
    cdef unsigned char byte
    cdef unsigned char previous = 0x2E
    if not 0 < length <= C_MAX_HOSTNAME:
        return None
    cdef bytearray name = bytearray(length)
    cdef unsigned char* out = name
    for i in range(length):
        byte = raw[i]
        if 0x41 <= byte <= 0x5A:
            byte += 0x20
        if not _host_byte(byte):
            return None
        if previous == 0x2E and (byte == 0x2E or byte == 0x2D):
            return None
        previous = byte
        out[i] = byte
    if previous == 0x2E:
        return None
    return name.decode("ascii")


def check_hostname(const unsigned char[:] raw not None):
    """Return ``raw`` as a lowercase directory name, or None if it breaks the rules."""
    if raw.shape[0] == 0:
        return None
    return _check(&raw[0], raw.shape[0])


cdef inline unsigned int _u16(const unsigned char* p, Py_ssize_t pos) noexcept:
    return p[pos] << 8 | p[pos + 1]


cdef str _server_name(const unsigned char* hello, Py_ssize_t start, Py_ssize_t end):
    """Parse a ClientHello body hello[start:end] (RFC 8446 §4.1.2); return the host name."""
    cdef Py_ssize_t pos = start + 2 + 32
    cdef Py_ssize_t length, found = -1, found_end = 0
    cdef unsigned int kind
    if pos + 1 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    pos += 1 + hello[pos]
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    length = _u16(hello, pos)
    pos += 2 + length
    if pos + 1 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    pos += 1 + hello[pos]
    if pos == end:
        raise HelloError(UNRECOGNIZED_NAME, "no extensions, so no server_name")
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    length = _u16(hello, pos)
    pos += 2
    if pos + length != end:
        raise HelloError(DECODE_ERROR, "extensions length does not match ClientHello")
    while pos < end:
        if pos + 4 > end:
            raise HelloError(DECODE_ERROR, "truncated extension header")
        kind = _u16(hello, pos)
        length = _u16(hello, pos + 2)
        pos += 4
        if pos + length > end:
            raise HelloError(DECODE_ERROR, "extension overruns ClientHello")
        if kind == EXTENSION_SERVER_NAME:
            if found >= 0:
                raise HelloError(DECODE_ERROR, "duplicate server_name extension")
            found = pos
            found_end = pos + length
        pos += length
    if found < 0:
        raise HelloError(UNRECOGNIZED_NAME, "no server_name extension")
    return _host_name(hello, found, found_end)


cdef str _host_name(const unsigned char* hello, Py_ssize_t pos, Py_ssize_t end):
    """Parse a ServerNameList (RFC 6066 §3); return its first host_name, checked."""
    cdef Py_ssize_t length
    cdef unsigned char kind
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated server_name list")
    length = _u16(hello, pos)
    pos += 2
    if pos + length != end:
        raise HelloError(DECODE_ERROR, "server_name list length does not match extension")
    while pos < end:
        if pos + 3 > end:
            raise HelloError(DECODE_ERROR, "truncated server_name entry")
        kind = hello[pos]
        length = _u16(hello, pos + 1)
        pos += 3
        if pos + length > end:
            raise HelloError(DECODE_ERROR, "server_name entry overruns list")
        if kind == NAME_TYPE_HOST_NAME:
            name = _check(hello + pos, length)
            if name is None:
                raw = (hello + pos)[:min(length, 80)]
                shown = raw.decode("ascii", "backslashreplace")
                raise HelloError(UNRECOGNIZED_NAME, f"invalid server name {shown!r}")
            return name
        pos += length
    raise HelloError(UNRECOGNIZED_NAME, "empty server_name list")


cdef class HelloReader:
    """Reassemble the ClientHello from TLS records arriving in any TCP segments."""

    cdef public bytearray received
    cdef public Py_ssize_t record_at
    cdef public bytearray handshake
    cdef public Py_ssize_t hello_length

    def __init__(self):
        self.received = bytearray()
        self.record_at = 0
        self.handshake = bytearray()
        self.hello_length = -1

    cpdef object feed(self, data):
        cdef bytearray received = self.received
        cdef Py_ssize_t at, length
        cdef const unsigned char* p
        received += data
        if len(received) > C_MAX_BUFFER:
            raise HelloError(INTERNAL_ERROR, f"no complete ClientHello in {MAX_BUFFER} bytes")
        p = received
        while len(received) - self.record_at >= 5:
            at = self.record_at
            if p[at] != CONTENT_HANDSHAKE:
                raise HelloError(UNEXPECTED_MESSAGE, f"record type {p[at]} before ClientHello")
            length = _u16(p, at + 3)
            if length == 0:
                raise HelloError(DECODE_ERROR, "zero-length handshake record")
            if length > C_MAX_FRAGMENT:
                raise HelloError(RECORD_OVERFLOW, f"record of {length} bytes")
            if len(received) - at - 5 < length:
                break
            self.handshake += p[at + 5 : at + 5 + length]
            self.record_at = at + 5 + length
            name = self._handshake()
            if name is not None:
                return name
        return None

    cdef object _handshake(self):
        cdef bytearray handshake = self.handshake
        cdef const unsigned char* p = handshake
        if self.hello_length < 0:
            if len(handshake) < 4:
                return None
            if p[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(UNEXPECTED_MESSAGE, f"handshake type {p[0]} before ClientHello")
            self.hello_length = p[1] << 16 | p[2] << 8 | p[3]
            if self.hello_length > C_MAX_BUFFER:
                raise HelloError(INTERNAL_ERROR, f"ClientHello of {self.hello_length} bytes")
        if len(handshake) < 4 + self.hello_length:
            return None
        return _server_name(p, 4, 4 + self.hello_length)


def server_name(data):
    """Read the host name from ``data``, the start of a TLS connection (a one-shot HelloReader)."""
    return HelloReader().feed(data)
