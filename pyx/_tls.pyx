# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of fastsni/tls.py: hostname rules and the incremental ClientHello reader.

Function for function the same as the pure module, which is the specification; the
constants, alert() and HelloError are shared with it, not copied.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memcpy

from fastsni.tls import (
    CONTENT_HANDSHAKE,
    DECODE_ERROR,
    EXTENSION_ECH,
    MARK_ECH,
    MARK_GREASE,
    EXTENSION_SERVER_NAME,
    HANDSHAKE_CLIENT_HELLO,
    INTERNAL_ERROR,
    MAX_BUFFER,
    MAX_FRAGMENT,
    MAX_HELLO,
    MAX_HOSTNAME,
    NAME_TYPE_HOST_NAME,
    RECORD_OVERFLOW,
    UNEXPECTED_MESSAGE,
    UNRECOGNIZED_NAME,
    USER_CANCELED,
    HelloError,
    alert,
)

cdef Py_ssize_t C_MAX_HELLO = MAX_HELLO
cdef unsigned int C_EXTENSION_ECH = EXTENSION_ECH
cdef int C_MARK_ECH = MARK_ECH, C_MARK_GREASE = MARK_GREASE


cdef inline bint _grease(unsigned int value) noexcept:
    """RFC 8701 §2: the reserved values 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def is_grease(unsigned int value):
    return _grease(value)
cdef Py_ssize_t C_MAX_FRAGMENT = MAX_FRAGMENT
cdef Py_ssize_t C_MAX_HOSTNAME = MAX_HOSTNAME
cdef enum:
    C_NAME_SPACE = 253  # bytes of a name being checked: MAX_HOSTNAME
assert C_NAME_SPACE == MAX_HOSTNAME


cdef inline bint _host_byte(unsigned char byte) noexcept:
    return (0x61 <= byte <= 0x7A) or (0x30 <= byte <= 0x39) or byte == 0x2E or byte == 0x2D


cdef object _check(const unsigned char* raw, Py_ssize_t length):
    """check_hostname on a byte range: the lowercase name, or None."""
    cdef Py_ssize_t i
    cdef unsigned char byte
    cdef unsigned char previous = 0x2E
    cdef unsigned char name[C_NAME_SPACE]
    if not 0 < length <= C_MAX_HOSTNAME:
        return None
    for i in range(length):
        byte = raw[i]
        if 0x41 <= byte <= 0x5A:
            byte += 0x20
        if not _host_byte(byte):
            return None
        if previous == 0x2E and (byte == 0x2E or byte == 0x2D):
            return None
        previous = byte
        name[i] = byte
    if previous == 0x2E:
        return None
    return PyUnicode_DecodeASCII(<const char*>name, length, NULL)


def check_hostname(raw):
    """Return ``raw`` as a lowercase directory name, or None if it breaks the rules."""
    if PyBytes_CheckExact(raw):  # the proxies' case: no buffer to acquire
        return _check(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    return _check_buffer(raw)


cdef object _check_buffer(const unsigned char[:] raw):
    """check_hostname on any other bytes-like object (a str is refused with TypeError)."""
    if raw is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    if raw.shape[0] == 0:
        return None
    return _check(&raw[0], raw.shape[0])


cdef int _append(bytearray target, const char* data, Py_ssize_t size) except -1:
    """``target += data[:size]``, without a bytes object or the buffer protocol."""
    cdef Py_ssize_t have = PyByteArray_GET_SIZE(target)
    PyByteArray_Resize(target, have + size)
    memcpy(PyByteArray_AS_STRING(target) + have, data, size)
    return 0


cdef inline unsigned int _u16(const unsigned char* p, Py_ssize_t pos) noexcept:
    return p[pos] << 8 | p[pos + 1]


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
    """Reassemble the ClientHello from TLS records arriving in any TCP segments, and read
    it only as far as its server_name (attributes in fastsni/_tls.pxd)."""

    def __cinit__(self):  # not __init__: HelloReader.__new__(HelloReader) runs it too, at C cost
        self.received = PyByteArray_FromStringAndSize(NULL, 0)  # bytearray(), at C cost
        self.record_at = 0
        self.handshake = PyByteArray_FromStringAndSize(NULL, 0)
        self.hello_end = -1
        self.field = 0
        self.at = 4

    cpdef object feed(self, data):
        cdef bytearray received = self.received
        cdef Py_ssize_t at, length
        cdef const unsigned char* p
        if PyBytes_CheckExact(data):  # from a socket: the usual case
            _append(received, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            received += data
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
            _append(self.handshake, <const char*>p + at + 5, length)
            self.record_at = at + 5 + length
            name = self._handshake()
            if name is not None:
                return name
        return None

    cdef object _handshake(self):
        cdef bytearray handshake = self.handshake
        cdef const unsigned char* p = handshake
        cdef Py_ssize_t length
        if self.hello_end < 0:
            if len(handshake) < 4:
                return None
            if p[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(UNEXPECTED_MESSAGE, f"handshake type {p[0]} before ClientHello")
            length = p[1] << 16 | p[2] << 8 | p[3]
            if length > C_MAX_HELLO - 4:
                raise HelloError(DECODE_ERROR, f"ClientHello of {length} bytes, more than any legal one")
            self.hello_end = 4 + length
        return self._walk()

    cdef object _walk(self):
        """Read the ClientHello's fields (RFC 8446 §4.1.2) as far as they have arrived."""
        cdef const unsigned char* p = self.handshake
        cdef Py_ssize_t end = self.hello_end
        cdef Py_ssize_t have = min(len(self.handshake), end)
        cdef Py_ssize_t at = self.at
        cdef Py_ssize_t length
        cdef unsigned int kind
        cdef int field
        while True:
            field = self.field
            if field == 0:  # legacy_version, random
                if at + 2 + 32 + 1 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                at += 2 + 32
            elif field == 1 or field == 3:  # legacy_session_id, legacy_compression_methods
                if at + 1 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 1 > have:
                    break
                at += 1 + p[at]
            elif field == 2:  # cipher_suites
                if at + 2 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 2 > have:
                    break
                at += 2 + _u16(p, at)
            elif field == 4:  # extensions, optional before TLS 1.3
                if at == end:
                    raise HelloError(UNRECOGNIZED_NAME, "no extensions, so no server_name")
                if at + 2 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 2 > have:
                    break
                if at + 2 + _u16(p, at) != end:
                    raise HelloError(DECODE_ERROR, "extensions length does not match ClientHello")
                at += 2
            else:  # one extension: type, extension_data
                if at == end:
                    raise HelloError(UNRECOGNIZED_NAME, "no server_name extension")
                if at + 4 > end:
                    raise HelloError(DECODE_ERROR, "truncated extension header")
                if at + 4 > have:
                    break
                kind = _u16(p, at)
                length = _u16(p, at + 2)
                if at + 4 + length > end:
                    raise HelloError(DECODE_ERROR, "extension overruns ClientHello")
                if kind == EXTENSION_SERVER_NAME:
                    if at + 4 + length > have:
                        break
                    return _host_name(p, at + 4, at + 4 + length)
                at += 4 + length
                continue
            self.field = field + 1
        self.at = at
        return None

    cpdef int marks(self):
        """MARK_ECH and MARK_GREASE among the cipher suites and extension types of the
        hello received so far (see the pure twin)."""
        cdef const unsigned char* p = self.handshake
        cdef Py_ssize_t have = min(len(self.handshake), self.hello_end)
        cdef Py_ssize_t at = 4 + 2 + 32, end, suite
        cdef unsigned int kind
        cdef int marks = 0
        if at + 1 > have:
            return 0
        at += 1 + p[at]
        if at + 2 > have:
            return 0
        end = at + 2 + (p[at] << 8 | p[at + 1])
        suite = at + 2
        while suite < min(end, have) - 1:
            if _grease(p[suite] << 8 | p[suite + 1]):
                marks |= C_MARK_GREASE
                break
            suite += 2
        if end + 1 > have:
            return marks
        at = end + 1 + p[end] + 2
        while at + 4 <= have:
            kind = p[at] << 8 | p[at + 1]
            if kind == C_EXTENSION_ECH:
                marks |= C_MARK_ECH
            elif _grease(kind):
                marks |= C_MARK_GREASE
            at += 4 + (p[at + 2] << 8 | p[at + 3])
        return marks


def server_name(data):
    """Read the host name from ``data``, the start of a TLS connection (a one-shot HelloReader)."""
    return HelloReader().feed(data)

