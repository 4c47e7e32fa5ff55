"""Hostname rules and the incremental TLS ClientHello reader (pure-Python twin).

This module is the specification; ``pyx/_tls.pyx`` mirrors it function for function.

The reader never decrypts or changes anything: it keeps every byte it was fed (to be
forwarded untouched) and looks inside only far enough to find the server_name.
"""

from __future__ import annotations

# TLS alert descriptions, RFC 8446 §6.2.
UNEXPECTED_MESSAGE = 10
RECORD_OVERFLOW = 22
DECODE_ERROR = 50
INTERNAL_ERROR = 80
USER_CANCELED = 90
UNRECOGNIZED_NAME = 112

MAX_BUFFER = 128 * 1024  # never hold more than this while looking for the name
MAX_FRAGMENT = 16384  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
MAX_HOSTNAME = 253

CONTENT_HANDSHAKE = 22  # RFC 8446 §5.1 ContentType.handshake
HANDSHAKE_CLIENT_HELLO = 1  # RFC 8446 §4 HandshakeType.client_hello
EXTENSION_SERVER_NAME = 0  # RFC 6066 §3
NAME_TYPE_HOST_NAME = 0  # RFC 6066 §3

_HOST_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789.-")
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def alert(description: int) -> bytes:
    """A fatal TLS alert record: level fatal(2), RFC 8446 §6."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


class HelloError(Exception):
    """The hello cannot be routed: ``alert`` is the description to send, ``reason`` the log text."""

    def __init__(self, alert: int, reason: str, name: str | None = None) -> None:
        super().__init__(alert, reason)
        self.alert = alert
        self.reason = reason
        self.name = name


def check_hostname(raw: bytes) -> str | None:
    """Return ``raw`` as a lowercase directory name, or None if it breaks the rules.

    Rules: ASCII letters, digits, '.' and '-' only; 1..253 bytes; labels separated by
    single dots, none empty, none starting with '-'; no leading or trailing dot.  A
    name that passes is safe as one path component (no '/', never '.' or '..').
    """
    raw = bytes(raw)  # a str is refused with TypeError, as in the compiled twin
    if not 0 < len(raw) <= MAX_HOSTNAME:
        return None
    name = raw.translate(_LOWER)
    previous = 0x2E  # '.': the name must not start like an empty label
    for byte in name:
        if byte not in _HOST_BYTES:
            return None
        if previous == 0x2E and (byte == 0x2E or byte == 0x2D):
            return None  # empty label, or a label starting with '-'
        previous = byte
    if previous == 0x2E:
        return None  # trailing dot
    return name.decode("ascii")


def _server_name(hello: bytes | bytearray, start: int, end: int) -> str:
    """Parse a ClientHello body ``hello[start:end]`` (RFC 8446 §4.1.2); return the host name."""
    pos = start + 2 + 32  # legacy_version, random
    if pos + 1 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    pos += 1 + hello[pos]  # legacy_session_id<0..32>
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    length = hello[pos] << 8 | hello[pos + 1]  # cipher_suites<2..2^16-2>
    pos += 2 + length
    if pos + 1 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    pos += 1 + hello[pos]  # legacy_compression_methods<1..2^8-1>
    if pos == end:
        raise HelloError(UNRECOGNIZED_NAME, "no extensions, so no server_name")
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated ClientHello")
    length = hello[pos] << 8 | hello[pos + 1]  # extensions<8..2^16-1>
    pos += 2
    if pos + length != end:
        raise HelloError(DECODE_ERROR, "extensions length does not match ClientHello")
    found = -1
    while pos < end:
        if pos + 4 > end:
            raise HelloError(DECODE_ERROR, "truncated extension header")
        kind = hello[pos] << 8 | hello[pos + 1]
        length = hello[pos + 2] << 8 | hello[pos + 3]
        pos += 4
        if pos + length > end:
            raise HelloError(DECODE_ERROR, "extension overruns ClientHello")
        if kind == EXTENSION_SERVER_NAME:
            if found >= 0:
                # RFC 8446 §4.2: no more than one extension of the same type.
                raise HelloError(DECODE_ERROR, "duplicate server_name extension")
            found = pos
            found_end = pos + length
        pos += length
    if found < 0:
        raise HelloError(UNRECOGNIZED_NAME, "no server_name extension")
    return _host_name(hello, found, found_end)


def _host_name(hello: bytes | bytearray, pos: int, end: int) -> str:
    """Parse a ServerNameList (RFC 6066 §3); return its first host_name, checked."""
    if pos + 2 > end:
        raise HelloError(DECODE_ERROR, "truncated server_name list")
    length = hello[pos] << 8 | hello[pos + 1]
    pos += 2
    if pos + length != end:
        raise HelloError(DECODE_ERROR, "server_name list length does not match extension")
    while pos < end:
        if pos + 3 > end:
            raise HelloError(DECODE_ERROR, "truncated server_name entry")
        kind = hello[pos]
        length = hello[pos + 1] << 8 | hello[pos + 2]
        pos += 3
        if pos + length > end:
            raise HelloError(DECODE_ERROR, "server_name entry overruns list")
        if kind == NAME_TYPE_HOST_NAME:
            raw = bytes(hello[pos : pos + length])
            name = check_hostname(raw)
            if name is None:
                shown = raw[:80].decode("ascii", "backslashreplace")
                raise HelloError(UNRECOGNIZED_NAME, f"invalid server name {shown!r}")
            return name
        pos += length
    raise HelloError(UNRECOGNIZED_NAME, "empty server_name list")


class HelloReader:
    """Reassemble the ClientHello from TLS records arriving in any TCP segments.

    ``feed(data)`` returns the checked host name once the whole ClientHello has
    arrived, None while more bytes are needed, and raises HelloError when the bytes
    cannot be a routable ClientHello.  ``received`` holds every byte fed so far.
    Each byte is looked at a bounded number of times, so the work stays linear
    however the hello is split into records and segments.
    """

    def __init__(self) -> None:
        self.received = bytearray()  # everything fed, to forward untouched
        self.record_at = 0  # offset in ``received`` of the next record header
        self.handshake = bytearray()  # the handshake layer: record payloads joined
        self.hello_length = -1  # ClientHello body length, once its header is known

    def feed(self, data: bytes) -> str | None:
        received = self.received
        received += data
        if len(received) > MAX_BUFFER:
            raise HelloError(INTERNAL_ERROR, f"no complete ClientHello in {MAX_BUFFER} bytes")
        # RFC 8446 §5.1: the record layer; take each complete record.
        while len(received) - self.record_at >= 5:
            at = self.record_at
            if received[at] != CONTENT_HANDSHAKE:
                raise HelloError(UNEXPECTED_MESSAGE, f"record type {received[at]} before ClientHello")
            length = received[at + 3] << 8 | received[at + 4]
            if length == 0:
                raise HelloError(DECODE_ERROR, "zero-length handshake record")
            if length > MAX_FRAGMENT:
                raise HelloError(RECORD_OVERFLOW, f"record of {length} bytes")
            if len(received) - at - 5 < length:
                break
            self.handshake += received[at + 5 : at + 5 + length]
            self.record_at = at + 5 + length
            name = self._handshake()
            if name is not None:
                return name
        return None

    def _handshake(self) -> str | None:
        """RFC 8446 §4: the first handshake message must be a ClientHello."""
        handshake = self.handshake
        if self.hello_length < 0:
            if len(handshake) < 4:
                return None
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(UNEXPECTED_MESSAGE, f"handshake type {handshake[0]} before ClientHello")
            self.hello_length = handshake[1] << 16 | handshake[2] << 8 | handshake[3]
            if self.hello_length > MAX_BUFFER:
                raise HelloError(INTERNAL_ERROR, f"ClientHello of {self.hello_length} bytes")
        if len(handshake) < 4 + self.hello_length:
            return None
        return _server_name(handshake, 4, 4 + self.hello_length)


def server_name(data: bytes) -> str | None:
    """Read the host name from ``data``, the start of a TLS connection (a one-shot HelloReader)."""
    return HelloReader().feed(data)
