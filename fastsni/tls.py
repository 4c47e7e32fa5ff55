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

MAX_FRAGMENT = 16384  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
# The largest legal ClientHello (RFC 8446 §4.1.2): its 4-byte handshake header, then
# legacy_version 2, random 32, legacy_session_id 1+32, cipher_suites 2+65534,
# legacy_compression_methods 1+255, extensions 2+65535.
MAX_HELLO = 4 + 2 + 32 + 1 + 32 + 2 + 65534 + 1 + 255 + 2 + 65535  # 131400 bytes
# The most a HelloReader holds while the name is not known: MAX_HELLO bytes of handshake
# in records of at least one byte each behind a 5-byte header, plus one record still
# incomplete (see HelloReader).
MAX_BUFFER = 6 * MAX_HELLO + 5 + MAX_FRAGMENT  # 804789 bytes
MAX_HOSTNAME = 253

CONTENT_HANDSHAKE = 22  # RFC 8446 §5.1 ContentType.handshake
HANDSHAKE_CLIENT_HELLO = 1  # RFC 8446 §4 HandshakeType.client_hello
EXTENSION_SERVER_NAME = 0  # RFC 6066 §3
NAME_TYPE_HOST_NAME = 0  # RFC 6066 §3
EXTENSION_ECH = 0xFE0D  # RFC 9849 §5: encrypted_client_hello
MARK_ECH = 1  # HelloReader.marks(): the hello offers ECH ...
MARK_GREASE = 2  # ... or a GREASE cipher suite or extension (RFC 8701)

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


def is_grease(value: int) -> bool:
    """RFC 8701 §2: the reserved values 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class HelloReader:
    """Reassemble the ClientHello from TLS records arriving in any TCP segments, and read
    it only as far as its server_name.

    ``feed(data)`` returns the checked host name as soon as the server_name extension
    has arrived (the rest of the hello is the backend's to read), None while more bytes
    are needed, and raises HelloError when the bytes cannot be a routable ClientHello.
    ``received`` holds every byte fed so far, to forward untouched.

    Every legal ClientHello is routed, however it is split: what must be held is the
    hello up to the end of its server_name (at most MAX_HELLO bytes of handshake), in
    records that each carry at least one byte of it behind a 5-byte header, plus one
    incomplete record; so ``received`` never exceeds MAX_BUFFER while the name is not
    known.  Each byte is looked at a bounded number of times, so the work stays linear
    however the hello is split into records and segments.
    """

    def __init__(self) -> None:
        self.received = bytearray()  # everything fed, to forward untouched
        self.record_at = 0  # offset in ``received`` of the next record header
        self.handshake = bytearray()  # the handshake layer: record payloads joined
        self.hello_end = -1  # offset in ``handshake`` where the ClientHello ends, once known
        self.field = 0  # the next field of the ClientHello to read (see _walk)
        self.at = 4  # offset in ``handshake`` of that field

    def feed(self, data: bytes) -> str | None:
        received = self.received
        received += data
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
        if self.hello_end < 0:
            if len(handshake) < 4:
                return None
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise HelloError(UNEXPECTED_MESSAGE, f"handshake type {handshake[0]} before ClientHello")
            length = handshake[1] << 16 | handshake[2] << 8 | handshake[3]
            if length > MAX_HELLO - 4:
                raise HelloError(DECODE_ERROR, f"ClientHello of {length} bytes, more than any legal one")
            self.hello_end = 4 + length
        return self._walk()

    def _walk(self) -> str | None:
        """Read the ClientHello's fields (RFC 8446 §4.1.2) as far as they have arrived.

        A field's length is checked against the hello's end as soon as it is known, and
        what a skipped field holds need not have arrived.  Returns the host name once the
        whole server_name extension is here, None while waiting."""
        handshake, end = self.handshake, self.hello_end
        have = min(len(handshake), end)
        at = self.at
        while True:
            field = self.field
            if field == 0:  # legacy_version, random
                if at + 2 + 32 + 1 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                at += 2 + 32
            elif field == 1 or field == 3:  # legacy_session_id<0..32>, legacy_compression_methods<1..2^8-1>
                if at + 1 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 1 > have:
                    break
                at += 1 + handshake[at]
            elif field == 2:  # cipher_suites<2..2^16-2>
                if at + 2 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 2 > have:
                    break
                at += 2 + (handshake[at] << 8 | handshake[at + 1])
            elif field == 4:  # extensions<8..2^16-1>, optional before TLS 1.3
                if at == end:
                    raise HelloError(UNRECOGNIZED_NAME, "no extensions, so no server_name")
                if at + 2 > end:
                    raise HelloError(DECODE_ERROR, "truncated ClientHello")
                if at + 2 > have:
                    break
                if at + 2 + (handshake[at] << 8 | handshake[at + 1]) != end:
                    raise HelloError(DECODE_ERROR, "extensions length does not match ClientHello")
                at += 2
            else:  # one extension: type, extension_data<0..2^16-1>
                if at == end:
                    raise HelloError(UNRECOGNIZED_NAME, "no server_name extension")
                if at + 4 > end:
                    raise HelloError(DECODE_ERROR, "truncated extension header")
                if at + 4 > have:
                    break
                kind = handshake[at] << 8 | handshake[at + 1]
                length = handshake[at + 2] << 8 | handshake[at + 3]
                if at + 4 + length > end:
                    raise HelloError(DECODE_ERROR, "extension overruns ClientHello")
                if kind == EXTENSION_SERVER_NAME:
                    if at + 4 + length > have:
                        break
                    return _host_name(handshake, at + 4, at + 4 + length)
                at += 4 + length
                continue  # field 5 again: the next extension
            self.field = field + 1
        self.at = at
        return None

    def marks(self) -> int:
        """MARK_ECH and MARK_GREASE among the cipher suites and extension types of the
        hello received so far (for the counters; once per routed hello).  Lengths were
        checked by _walk as far as it read; past that, only what has arrived is looked at."""
        handshake = self.handshake
        have = min(len(handshake), self.hello_end)
        marks = 0
        at = 4 + 2 + 32  # handshake header, legacy_version, random
        if at + 1 > have:
            return 0
        at += 1 + handshake[at]  # legacy_session_id
        if at + 2 > have:
            return 0
        end = at + 2 + (handshake[at] << 8 | handshake[at + 1])
        for suite in range(at + 2, min(end, have) - 1, 2):
            if is_grease(handshake[suite] << 8 | handshake[suite + 1]):
                marks |= MARK_GREASE
                break
        if end + 1 > have:
            return marks
        at = end + 1 + handshake[end] + 2  # legacy_compression_methods, extensions length
        while at + 4 <= have:
            kind = handshake[at] << 8 | handshake[at + 1]
            if kind == EXTENSION_ECH:
                marks |= MARK_ECH
            elif is_grease(kind):
                marks |= MARK_GREASE
            at += 4 + (handshake[at + 2] << 8 | handshake[at + 3])
        return marks


def server_name(data: bytes) -> str | None:
    """Read the host name from ``data``, the start of a TLS connection (a one-shot HelloReader)."""
    return HelloReader().feed(data)
