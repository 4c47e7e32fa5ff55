#!/usr/bin/env python3
"""Fuzz the ClientHello reader: fastsni.tls (pure) against fastsni._tls (compiled).

Input: a split pattern for the TCP segments (see fuzzing.py); then one flags byte: if
its top bit is set, a second split pattern follows and the payload is taken as the
handshake layer and wrapped in TLS records of those sizes, else the payload is the byte
stream itself.  Both twins get the same pieces, one feed() each, and must agree on
every call: None, the same name, or HelloError with the same alert and reason.  Also:
nothing but HelloError escapes, the alert is one the README documents, the reason is
printable ASCII, ``received`` is exactly what was fed and stays within MAX_BUFFER while
the name is unknown, and a one-shot ``server_name`` of the bytes up to the deciding
piece decides the same way.

    python3 tests/fuzz/fuzz_hello.py -runs=1000000 /tmp/fuzz-hello tests/fuzz/corpus/hello
"""

from __future__ import annotations

from fuzzing import cut, main, printable, split_pattern, twins

pure, compiled = twins("fastsni.tls", "fastsni._tls", __name__ == "__main__")
DOCUMENTED_ALERTS = {pure.UNEXPECTED_MESSAGE, pure.RECORD_OVERFLOW, pure.DECODE_ERROR, pure.UNRECOGNIZED_NAME}
RECORD_SIZE_AT_MOST = 16384  # RFC 8446 §5.1


def records(handshake: bytes, sizes: list[int]) -> bytes:
    """``handshake`` in handshake records (type 22) of payload sizes cycling through ``sizes``."""
    out = bytearray()
    for fragment in cut(
        handshake, [min(size, RECORD_SIZE_AT_MOST) for size in sizes] or [RECORD_SIZE_AT_MOST]
    ):
        out += b"\x16\x03\x01" + len(fragment).to_bytes(2, "big") + fragment
    return bytes(out)


def stream_of(data: bytes) -> list[bytes]:
    """The fuzz input -> the pieces fed to a reader."""
    segments, rest = split_pattern(data)
    if rest and rest[0] & 0x80:
        record_sizes, layer = split_pattern(rest[1:])
        stream = records(layer, record_sizes)
    else:
        stream = rest[1:]
    return cut(stream, segments)


def run(module, pieces: list[bytes]) -> tuple[list, int]:
    """Feed ``pieces`` to a new reader: every call's result, and where it decided (-1: never)."""
    reader = module.HelloReader()
    results = []
    fed = bytearray()
    for index, piece in enumerate(pieces):
        fed += piece
        try:
            name = reader.feed(piece)
        except module.HelloError as error:
            assert error.alert in DOCUMENTED_ALERTS, (error.alert, error.reason)
            assert isinstance(error.reason, str) and printable(error.reason), error.reason
            assert reader.received == fed
            results.append(("error", error.alert, error.reason))
            return results, index
        assert reader.received == fed, "received must be every byte fed, untouched"
        if name is not None:
            assert module.check_hostname(name.encode()) == name, name
            results.append(("name", name))
            return results, index
        assert len(reader.received) <= module.MAX_BUFFER, len(reader.received)
        results.append(None)
    return results, -1


def one_shot(module, data: bytes):
    try:
        name = module.server_name(data)
    except module.HelloError as error:
        return ("error", error.alert, error.reason)
    return None if name is None else ("name", name)


def test_one_input(data: bytes) -> None:
    pieces = stream_of(data)
    expected, decided = run(pure, pieces)
    got, _ = run(compiled, pieces)
    assert got == expected, (got, expected)
    prefix = b"".join(pieces[: decided + 1] if decided >= 0 else pieces)
    whole = one_shot(pure, prefix)
    assert whole == (expected[-1] if decided >= 0 else None), (whole, expected)
    assert one_shot(compiled, prefix) == whole


if __name__ == "__main__":
    main(test_one_input)
