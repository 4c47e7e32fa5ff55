"""The ClientHello reader and hostname rules (fastsni/tls.py and its twin fastsni._tls).

Real hellos come from tests/fixtures/hellos/ (captured on loopback by
tests/capture_hellos.py, see the README there); malformed ones are built here, one
case per alert code.  Every behavioural test takes ``twin``; the differential
property tests import both twins directly and compare them.
"""

from __future__ import annotations

import importlib
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REQUIRE_COMPILED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsni import hostname as hostname_cli

HELLOS = Path(__file__).resolve().parent / "fixtures" / "hellos"

LONG_NAME = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 56 + ".test"  # 253 bytes

# file -> expected server name; None: no server_name extension (alert 112).
FIXTURES: dict[str, str | None] = {
    "openssl-tls13.bin": "tls13.example.test",
    "openssl-tls12.bin": "tls12.example.test",
    "openssl-noservername.bin": None,
    "openssl-long-name.bin": LONG_NAME,
    "curl.bin": "curl.example.test",
    "python-ssl.bin": "py.example.test",
}

FRAGMENT_SIZES = [1, 2, 3, 7, 100, 16384]


def tls_module(twin):
    return twin.module("fastsni.tls", "fastsni._tls")


# --- building TLS bytes ---------------------------------------------------------------


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def records(handshake: bytes, sizes=(16384,), content_type: int = 22) -> bytes:
    """Wrap ``handshake`` in TLS records whose payload sizes cycle through ``sizes``."""
    out = bytearray()
    at = 0
    index = 0
    while at < len(handshake):
        size = sizes[index % len(sizes)]
        index += 1
        fragment = handshake[at : at + size]
        out += u8(content_type) + b"\x03\x01" + u16(len(fragment)) + fragment
        at += size
    return bytes(out)


def handshake_layer(stream: bytes) -> bytes:
    """The handshake bytes carried by the records of ``stream`` (its payloads joined)."""
    out = bytearray()
    at = 0
    while at < len(stream):
        length = stream[at + 3] << 8 | stream[at + 4]
        out += stream[at + 5 : at + 5 + length]
        at += 5 + length
    assert at == len(stream)
    return bytes(out)


def extension(kind: int, body: bytes) -> bytes:
    return u16(kind) + u16(len(body)) + body


def sni_body(*entries: bytes, kind: int = 0) -> bytes:
    """A ServerNameList body with host_name entries (or entries of type ``kind``)."""
    listed = b"".join(u8(kind) + u16(len(e)) + e for e in entries)
    return u16(len(listed)) + listed


def sni(*names: bytes) -> bytes:
    return extension(0, sni_body(*names))


def body(extensions: bytes | None, session_id: bytes = b"\x55" * 32) -> bytes:
    """A ClientHello body (RFC 8446 §4.1.2); ``extensions`` None leaves the block out."""
    out = b"\x03\x03" + b"\x11" * 32 + u8(len(session_id)) + session_id
    out += u16(4) + b"\x13\x01\x13\x02" + u8(1) + b"\x00"
    if extensions is not None:
        out += u16(len(extensions)) + extensions
    return out


def hello(extensions: bytes | None, **options) -> bytes:
    """A ClientHello handshake message (type 1, 24-bit length, body)."""
    content = body(extensions, **options)
    return b"\x01" + u24(len(content)) + content


ALPN = extension(16, b"\x00\x0c\x02h2\x08http/1.1")
GOOD = records(hello(ALPN + sni(b"good.example") + extension(43, b"\x02\x03\x04")))


def segments(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    """``data`` cut at random points into pieces of 1..largest bytes."""
    out = []
    at = 0
    while at < len(data):
        size = rng.randint(1, largest)
        out.append(data[at : at + size])
        at += size
    return out


def random_sizes(rng: random.Random, largest: int) -> list[int]:
    return [rng.randint(1, largest) for _ in range(64)]


def routing_point(stream: bytes) -> int:
    """How many bytes of ``stream`` (a well-formed hello's records) the reader needs: up to
    the end of the record completing the server_name extension; without one, up to the
    last length that says so (what a skipped field holds need not arrive).  An oracle
    written from RFC 8446 §4.1.2, independent of the reader."""
    layer = handshake_layer(stream)
    end = 4 + int.from_bytes(layer[1:4], "big")
    at = 4 + 2 + 32
    at += 1 + layer[at]  # legacy_session_id
    at += 2 + int.from_bytes(layer[at : at + 2], "big")  # cipher_suites
    needed = at + 1  # legacy_compression_methods' length: then no extensions is known
    at += 1 + layer[at]
    if at < end:
        at += 2
        while at < end:
            kind = int.from_bytes(layer[at : at + 2], "big")
            length = int.from_bytes(layer[at + 2 : at + 4], "big")
            needed = at + 4  # the last extension's header: then no server_name is known
            if kind == 0:
                needed = at + 4 + length
                break
            at += 4 + length
    wire = payload = 0
    while payload < needed:
        length = stream[wire + 3] << 8 | stream[wire + 4]
        wire += 5 + length
        payload += length
    return wire


def feed_pieces(module, pieces: list[bytes]):
    """Feed ``pieces`` in order until feed() returns a name or raises.

    Returns (result, reader, fed): the name or the HelloError, and how many bytes had been
    fed when it came.  Running out of pieces first fails the test.
    """
    reader = module.HelloReader()
    fed = 0
    for piece in pieces:
        fed += len(piece)
        try:
            result = reader.feed(piece)
        except module.HelloError as error:
            return error, reader, fed
        if result is not None:
            return result, reader, fed
    raise AssertionError(f"no name and no error after all {fed} bytes")


def check_outcome(module, pieces: list[bytes], expected: str | None, stream: bytes) -> None:
    """The name (or alert 112) comes with the first piece that completes what the reader
    needs (routing_point), never earlier or later; every byte fed is kept, untouched."""
    result, reader, fed = feed_pieces(module, pieces)
    needed = routing_point(stream)
    assert fed >= needed and fed - len(pieces[[*itertools.accumulate(map(len, pieces))].index(fed)]) < needed
    if expected is None:
        assert isinstance(result, module.HelloError), result
        assert result.alert == module.UNRECOGNIZED_NAME == 112
        assert result.reason == "no server_name extension"
    else:
        assert result == expected
    assert bytes(reader.received) == stream[:fed]


# --- real hellos ----------------------------------------------------------------------


def test_fixture_table_matches_the_directory():
    assert sorted(p.name for p in HELLOS.glob("*.bin")) == sorted(FIXTURES)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_whole(twin, fixture):
    module = tls_module(twin)
    stream = (HELLOS / fixture).read_bytes()
    check_outcome(module, [stream], FIXTURES[fixture], stream)
    if FIXTURES[fixture] is not None:
        assert module.server_name(stream) == FIXTURES[fixture]


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_one_byte_per_feed(twin, fixture):
    module = tls_module(twin)
    stream = (HELLOS / fixture).read_bytes()
    check_outcome(module, [stream[i : i + 1] for i in range(len(stream))], FIXTURES[fixture], stream)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_rebuilt_records_random_segments(twin, fixture):
    """The same handshake bytes in records of many sizes, fed in random segments."""
    module = tls_module(twin)
    layer = handshake_layer((HELLOS / fixture).read_bytes())
    rng = random.Random(f"{fixture}-records")
    plans = [[size] for size in FRAGMENT_SIZES]
    plans += [random_sizes(rng, largest) for largest in (2, 10, 50, 300, 16384)]
    for sizes in plans:
        stream = records(layer, sizes)
        assert handshake_layer(stream) == layer
        for largest in (1, 2, 5, 64, 1000, len(stream)):
            pieces = segments(stream, rng, largest)
            check_outcome(module, pieces, FIXTURES[fixture], stream)


def test_bytes_after_the_hello_are_kept(twin):
    module = tls_module(twin)
    stream = (HELLOS / "openssl-tls13.bin").read_bytes() + b"\x14\x03\x03\x00\x01\x01" + b"\x17" * 40
    reader = module.HelloReader()
    assert reader.feed(stream) == "tls13.example.test"
    assert bytes(reader.received) == stream


def test_built_hello_first_host_name_wins(twin):
    module = tls_module(twin)
    names = sni_body(b"other-type", kind=1)[2:] + sni_body(b"First.Example", b"second.example")[2:]
    stream = records(hello(extension(0, u16(len(names)) + names)))
    assert module.server_name(stream) == "first.example"
    assert module.server_name(GOOD) == "good.example"
    assert module.server_name(records(hello(sni(b"x"), session_id=b""))) == "x"


# --- malformed hellos: one alert code each --------------------------------------------

HTTP = b"GET / HTTP/1.1\r\nHost: good.example\r\n\r\n"
GOOD_HANDSHAKE = handshake_layer(GOOD)
SERVER_HELLO = b"\x02" + GOOD_HANDSHAKE[1:]
LARGEST_BODY = 131396  # RFC 8446 §4.1.2: every vector of a ClientHello at its maximum


def raw_hello(content: bytes) -> bytes:
    """A record carrying a ClientHello with ``content`` as its body, whatever it holds."""
    return records(b"\x01" + u24(len(content)) + content)


def names_ext(list_body: bytes) -> bytes:
    return extension(0, list_body)


CIPHERS_AT = 2 + 32 + 1 + 32  # offset of cipher_suites in body()

MALFORMED: list[tuple[str, bytes, int, str]] = [
    # 10 unexpected_message
    ("http-request", HTTP, 10, "record type 71 before ClientHello"),
    (
        "application-data-record",
        records(GOOD_HANDSHAKE, content_type=23),
        10,
        "record type 23 before ClientHello",
    ),
    ("alert-record", b"\x15\x03\x03\x00\x02\x02\x28", 10, "record type 21 before ClientHello"),
    ("ccs-in-the-middle", records(GOOD_HANDSHAKE[:50]) + b"\x14\x03\x03\x00\x01\x01", 10, "record type 20"),
    ("server-hello", records(SERVER_HELLO), 10, "handshake type 2 before ClientHello"),
    (
        "finished-type",
        records(b"\x14\x00\x00\x0c" + b"\x00" * 12),
        10,
        "handshake type 20 before ClientHello",
    ),
    # 22 record_overflow
    ("record-16385", b"\x16\x03\x01\x40\x01", 22, "record of 16385 bytes"),
    ("record-65535", b"\x16\x03\x01\xff\xff" + b"\x00" * 100, 22, "record of 65535 bytes"),
    ("second-record-16385", records(GOOD_HANDSHAKE[:10]) + b"\x16\x03\x01\x40\x01", 22, "record of 16385"),
    # 50 decode_error
    ("zero-length-record", b"\x16\x03\x01\x00\x00", 50, "zero-length handshake record"),
    ("zero-length-second-record", records(GOOD_HANDSHAKE[:9]) + b"\x16\x03\x01\x00\x00", 50, "zero-length"),
    ("body-shorter-than-random", raw_hello(b"\x03\x03" + b"\x11" * 20), 50, "truncated ClientHello"),
    ("session-id-overruns", raw_hello(body(None)[: CIPHERS_AT - 10]), 50, "truncated ClientHello"),
    ("cipher-suites-overrun", raw_hello(body(None)[:CIPHERS_AT] + u16(200) + b"\x13\x01"), 50, "truncated"),
    ("compression-overruns", raw_hello(body(None)[:-2] + b"\x05\x00"), 50, "truncated ClientHello"),
    ("one-byte-extensions-length", raw_hello(body(None) + b"\x00"), 50, "truncated ClientHello"),
    (
        "extensions-length-too-long",
        raw_hello(body(None) + u16(len(sni(b"a.example")) + 1) + sni(b"a.example")),
        50,
        "extensions length does not match ClientHello",
    ),
    (
        "extensions-length-too-short",
        raw_hello(body(None) + u16(len(sni(b"a.example")) - 1) + sni(b"a.example")),
        50,
        "extensions length does not match ClientHello",
    ),
    (
        "truncated-extension-header",
        records(hello(ALPN + b"\x00\x10\x00")),
        50,
        "truncated extension",
    ),
    (
        "extension-overruns",
        records(hello(ALPN + b"\x00\x10\x00\x09abc")),
        50,
        "extension overruns",
    ),
    ("sni-overruns-hello", records(hello(ALPN + b"\x00\x00\x00\x20abc")), 50, "extension overruns"),
    ("server-name-list-missing", records(hello(extension(0, b""))), 50, "truncated server_name list"),
    ("server-name-list-one-byte", records(hello(extension(0, b"\x00"))), 50, "truncated server_name list"),
    (
        "server-name-list-length-mismatch",
        records(hello(names_ext(sni_body(b"a.example") + b"\x00"))),
        50,
        "server_name list length does not match extension",
    ),
    (
        "truncated-server-name-entry",
        records(hello(names_ext(u16(2) + b"\x00\x00"))),
        50,
        "truncated server_name",
    ),
    (
        "server-name-entry-overruns",
        records(hello(names_ext(u16(6) + b"\x00\x00\x09abc"))),
        50,
        "server_name entry overruns list",
    ),
    (
        "declared-over-the-largest-legal",
        records(b"\x01" + u24(LARGEST_BODY + 1) + b"\x03\x03"),
        50,
        "ClientHello of 131397 bytes, more than any legal one",
    ),
    ("declared-2**24-1", records(b"\x01\xff\xff\xff"), 50, "ClientHello of 16777215 bytes"),
    # 112 unrecognized_name
    (
        "no-server-name-extension",
        records(hello(ALPN + extension(43, b"\x02\x03\x04"))),
        112,
        "no server_name",
    ),
    ("empty-extensions-block", records(hello(b"")), 112, "no server_name extension"),
    ("no-extensions", records(hello(None)), 112, "no extensions, so no server_name"),
    ("empty-server-name-list", records(hello(names_ext(u16(0)))), 112, "empty server_name list"),
    ("only-other-name-types", records(hello(names_ext(sni_body(b"a.example", kind=1)))), 112, "empty server"),
    ("empty-name", records(hello(sni(b""))), 112, "invalid server name ''"),
    ("leading-hyphen", records(hello(sni(b"-a.example"))), 112, "invalid server name '-a.example'"),
    ("hyphen-label", records(hello(sni(b"a.-b.example"))), 112, "invalid server name"),
    ("empty-label", records(hello(sni(b"a..b"))), 112, "invalid server name 'a..b'"),
    ("trailing-dot", records(hello(sni(b"a."))), 112, "invalid server name 'a.'"),
    ("leading-dot", records(hello(sni(b".a"))), 112, "invalid server name '.a'"),
    ("underscore", records(hello(sni(b"a_b"))), 112, "invalid server name 'a_b'"),
    ("slash", records(hello(sni(b"a/b"))), 112, "invalid server name 'a/b'"),
    ("dot-dot", records(hello(sni(b".."))), 112, "invalid server name '..'"),
    ("nul", records(hello(sni(b"a\x00b"))), 112, "invalid server name"),
    ("non-ascii", records(hello(sni("bücher.example".encode()))), 112, r"invalid server name 'b\\xc3\\xbc"),
    (
        "254-bytes",
        records(hello(sni(b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 62))),
        112,
        "invalid server name 'aaaa",
    ),
]


@pytest.mark.parametrize(
    "stream, code, reason", [pytest.param(s, c, r, id=f"{c}-{i}") for i, s, c, r in MALFORMED]
)
def test_malformed(twin, stream, code, reason):
    module = tls_module(twin)
    with pytest.raises(module.HelloError) as caught:
        module.HelloReader().feed(stream)
    assert caught.value.alert == code
    assert reason in caught.value.reason
    # The same error, at the same byte, when fed one byte at a time.
    reader = module.HelloReader()
    fed = 0
    with pytest.raises(module.HelloError) as caught_slowly:
        for fed in range(1, len(stream) + 1):
            assert reader.feed(stream[fed - 1 : fed]) is None
    assert (caught_slowly.value.alert, caught_slowly.value.reason) == (code, caught.value.reason)
    assert bytes(reader.received) == stream[:fed]


def test_every_alert_code_has_a_case():
    # 80 internal_error is left for backends that fail oddly: no hello is refused for its size.
    assert {code for _, _, code, _ in MALFORMED} == {10, 22, 50, 112}


def test_limits_are_inclusive(twin):
    module = tls_module(twin)
    # A 16384-byte record and a declared ClientHello of the largest legal size: still waiting.
    reader = module.HelloReader()
    assert reader.feed(records(largest_hello())[: 5 + 16384]) is None
    assert reader.hello_end == 4 + LARGEST_BODY == module.MAX_HELLO


def test_incomplete_hello_waits(twin):
    module = tls_module(twin)
    for cut in (1, 4, 5, 6, 9, len(GOOD) - 1):
        assert module.server_name(GOOD[:cut]) is None


@pytest.mark.parametrize("code", [10, 22, 50, 80, 90, 112])
def test_alert_record(twin, code):
    module = tls_module(twin)
    assert module.alert(code) == bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, code])


def test_alert_constants(twin):
    module = tls_module(twin)
    assert (module.UNEXPECTED_MESSAGE, module.RECORD_OVERFLOW, module.DECODE_ERROR) == (10, 22, 50)
    assert (module.INTERNAL_ERROR, module.UNRECOGNIZED_NAME) == (80, 112)
    assert (module.MAX_HELLO, module.MAX_FRAGMENT, module.MAX_HOSTNAME) == (131400, 16384, 253)
    assert module.MAX_BUFFER == 6 * 131400 + 5 + 16384


def test_every_constant_is_in_both_twins(twin):
    """The spec's public constants (alert codes, limits, type numbers) are in the twin's module too."""
    pure = importlib.import_module("fastsni.tls")
    module = tls_module(twin)
    constants = {
        name: value for name, value in vars(pure).items() if name.isupper() and isinstance(value, int)
    }
    assert constants["USER_CANCELED"] == 90
    assert {name: getattr(module, name, None) for name in constants} == constants


# --- check_hostname --------------------------------------------------------------------

NAME_253 = LONG_NAME.encode()
NAME_254 = b"x" + NAME_253

HOSTNAMES: list[tuple[bytes, str | None]] = [
    (b"example.com", "example.com"),
    (b"EXAMPLE.Com", "example.com"),
    (b"A", "a"),
    (b"a-b.c-d", "a-b.c-d"),
    (b"a--b", "a--b"),
    (b"a-", "a-"),  # the rules forbid only a leading '-'
    (b"1.2.3.4", "1.2.3.4"),
    (b"0", "0"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    (NAME_253, LONG_NAME),
    (NAME_253.upper(), LONG_NAME),
    (b"a" * 253, "a" * 253),
    (NAME_254, None),
    (b"a" * 254, None),
    (b"", None),
    (b".", None),
    (b"..", None),
    (b"/", None),
    (b"a/b", None),
    (b"\x00", None),
    (b"a\x00", None),
    (b"-a.example", None),
    (b"a.-b", None),
    (b"-", None),
    (b"a..b", None),
    (b"a.", None),
    (b".a", None),
    (b"a_b", None),
    (b"a b", None),
    (b"a:443", None),
    (b"*.example", None),
    ("bücher.example".encode(), None),
    (b"\xff", None),
    (b"a\xc0", None),
]


@pytest.mark.parametrize("raw, expected", HOSTNAMES, ids=[repr(r[:20]) for r, _ in HOSTNAMES])
def test_check_hostname(twin, raw, expected):
    module = tls_module(twin)
    assert module.check_hostname(raw) == expected
    assert module.check_hostname(bytearray(raw)) == expected


def test_check_hostname_every_byte(twin):
    module = tls_module(twin)
    allowed = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for byte in range(256):
        expected = chr(byte).lower() if byte in allowed else None
        assert module.check_hostname(bytes([byte])) == expected, byte
        assert module.check_hostname(b"a" + bytes([byte]) + b"a") == (
            f"a{chr(byte).lower()}a" if byte in allowed | {0x2D, 0x2E} else None
        ), byte


def test_check_hostname_rejects_str(twin):
    """The rules are on bytes; a str (a caller's mistake) should be refused, not judged."""
    module = tls_module(twin)
    with pytest.raises(TypeError):
        module.check_hostname("example.com")


# --- linearity --------------------------------------------------------------------------


def padded_hello(size: int, name: bytes = b"big.example") -> bytes:
    """A ClientHello handshake message of exactly ``size`` bytes, padded (RFC 7685) before
    its server_name, so the name is known only with its last byte."""
    fixed = len(hello(extension(21, b"") + sni(name)))
    return hello(extension(21, b"\x00" * (size - fixed)) + sni(name))


def largest_hello(name: bytes = b"big.example") -> bytes:
    """The largest legal ClientHello (RFC 8446 §4.1.2): 32-byte session id, 65534 bytes of
    cipher_suites, 255 compression methods, 65535 bytes of extensions."""
    body = b"\x03\x03" + b"\x11" * 32 + u8(32) + b"\x55" * 32
    body += u16(65534) + b"\x13\x01" * 32767 + u8(255) + b"\x00" * 255
    extensions = extension(21, b"\x00" * (65535 - 4 - len(sni(name)))) + sni(name)
    body += u16(len(extensions)) + extensions
    assert len(body) == LARGEST_BODY
    return b"\x01" + u24(len(body)) + body


def feed_byte_by_byte(module, stream: bytes, name: str):
    """Feed ``stream`` one byte per call; the name must come with the last byte, not before."""
    reader = module.HelloReader()
    last = len(stream) - 1
    for at in range(last):
        if reader.feed(stream[at : at + 1]) is not None:
            raise AssertionError(f"name returned early at byte {at}")
    assert reader.feed(stream[last:]) == name
    return reader


def test_linear_one_byte_records_one_byte_segments(twin):
    """A 30 KB hello as 1-byte records (180 KB on the wire), fed 1 byte per call: routed.

    Quadratic work here would be ~10^10 steps and hit the suite's pytest-timeout;
    linear work is ~10^5."""
    module = tls_module(twin)
    message = padded_hello(30_000)
    stream = records(message, [1])
    assert len(stream) == 6 * 30_000
    reader = feed_byte_by_byte(module, stream, "big.example")
    assert bytes(reader.received) == stream
    assert reader.hello_end == len(message)


@pytest.mark.parametrize("sizes", [[16384], [1], [1, 16384, 7]], ids=["16KiB", "1B", "mixed"])
def test_largest_legal_hello_is_routed(twin, sizes):
    """131.4 KB of handshake (more than 128 KiB on the wire even in full records) is legal:
    routed, however it is cut into records, within MAX_BUFFER."""
    module = tls_module(twin)
    stream = records(largest_hello(), sizes)
    reader = module.HelloReader()
    pieces = [stream[at : at + 4096] for at in range(0, len(stream), 4096)]
    for piece in pieces[:-1]:
        assert reader.feed(piece) is None
        assert len(reader.received) <= module.MAX_BUFFER
    assert reader.feed(pieces[-1]) == "big.example"
    assert bytes(reader.received) == stream


def test_name_comes_as_soon_as_its_extension_is_complete(twin):
    """The reader does not wait for the rest of the hello: with the server_name first, the
    name comes with the record that completes it, and the rest is the backend's."""
    module = tls_module(twin)
    stream = records(hello(sni(b"big.example") + extension(21, b"\x00" * 60000)))
    reader = module.HelloReader()
    assert reader.feed(stream[:100]) is None
    assert reader.feed(stream[100 : 5 + 16384]) == "big.example"
    assert routing_point(stream) == 5 + 16384 < len(stream)


# --- fastsni-hostname ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("EXAMPLE.com", "example.com"),
        ("example.com.", "example.com"),
        ("1.2.3.4", "1.2.3.4"),
        (LONG_NAME.upper(), LONG_NAME),
    ],
)
def test_hostname_cli(twin, capsys, name, expected):
    hostname_cli.main([name])
    out, err = capsys.readouterr()
    assert (out, err) == (expected + "\n", "")
    # The printed name is one the twin's reader accepts as it is.
    assert tls_module(twin).check_hostname(expected.encode()) == expected


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        (".", "empty"),
        ("-a.example", "hyphen"),
        ("a..b", "Empty Label"),
        ("a_b", "not allowed"),
        ("a/b", "not allowed"),
        ("..", "not a valid"),
        (".a", "not a valid"),
        (LONG_NAME + "x", "too long"),
    ],
)
def test_hostname_cli_invalid(twin, capsys, name, why):
    with pytest.raises(SystemExit) as caught:
        hostname_cli.main([name])
    assert caught.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"fastsni-hostname: {name!r}: ") and why in err, err
    with pytest.raises(ValueError):
        hostname_cli.directory_name(name)
    # Whatever the CLI refuses as ASCII, the twin's rules refuse too.
    if name.isascii():
        assert tls_module(twin).check_hostname(name.encode()) is None


@pytest.mark.parametrize("argv", [[], ["a.example", "b.example"]])
def test_hostname_cli_usage(twin, capsys, argv):
    with pytest.raises(SystemExit) as caught:
        hostname_cli.main(argv)
    assert caught.value.code == 2
    assert "usage: fastsni-hostname NAME" in capsys.readouterr().err


def test_hostname_module_runs(twin):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastsni.hostname", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=twin.env,
        )

    done = run("Bücher.Example.")
    assert (done.returncode, done.stdout) == (0, "xn--bcher-kva.example\n")
    done = run("a..b")
    assert done.returncode == 1 and done.stdout == "" and "'a..b'" in done.stderr
    done = run()
    assert done.returncode == 2 and "usage" in done.stderr


# --- differential: pure against compiled ---------------------------------------------------


def both_twins():
    pure = importlib.import_module("fastsni.tls")
    try:
        compiled = importlib.import_module("fastsni._tls")
    except ImportError:
        if REQUIRE_COMPILED:
            raise
        pytest.skip("fastsni._tls is not built")
    return pure, compiled


def outcome(module, pieces: list[bytes]):
    """What feeding ``pieces`` does: the first name or error, then the reader's state."""
    reader = module.HelloReader()
    result = ("pending",)
    for index, piece in enumerate(pieces):
        try:
            name = reader.feed(piece)
        except module.HelloError as error:
            result = ("error", index, error.alert, error.reason, error.name, error.args)
            break
        if name is not None:
            result = ("name", index, name)
            break
    state = (
        bytes(reader.received),
        reader.record_at,
        bytes(reader.handshake),
        reader.hello_end,
        reader.field,
        reader.at,
    )
    return result, state


def one_shot(module, data: bytes):
    """server_name(data): the name, or the error's alert and reason."""
    try:
        return ("name", module.server_name(data))
    except module.HelloError as error:
        return ("error", error.alert, error.reason)


def assert_twins_agree(pieces: list[bytes]) -> None:
    pure, compiled = both_twins()
    assert outcome(compiled, pieces) == outcome(pure, pieces), pieces
    whole = b"".join(pieces)
    assert one_shot(compiled, whole) == one_shot(pure, whole), whole


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FIXTURE_STREAMS = [(HELLOS / name).read_bytes() for name in sorted(FIXTURES)] + [GOOD]

# Random bytes, and random bytes behind plausible record and handshake headers.
random_streams = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + u16(len(b) + 4) + b"\x01" + u24(len(b)) + b),
    st.binary(min_size=38, max_size=300).map(lambda b: records(b"\x01" + u24(len(b)) + b)),
)


@st.composite
def mutated_fixtures(draw):
    """A real hello with random byte changes, cuts and insertions, in its records or handshake."""
    stream = draw(st.sampled_from(FIXTURE_STREAMS))
    layer = draw(st.booleans())
    data = bytearray(handshake_layer(stream) if layer else stream)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
    if layer:
        sizes = draw(st.lists(st.integers(1, 600), min_size=1, max_size=6))
        return records(bytes(data), sizes)
    return bytes(data)


@st.composite
def split(draw, streams):
    """A stream cut into feed() pieces at random points."""
    data = draw(streams)
    if not data:
        return [b""]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=20))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [data]


@PROPERTY
@given(st.binary(max_size=400))
def test_differential_random_bytes(data):
    assert_twins_agree([data])


@PROPERTY
@given(random_streams)
def test_differential_random_records(data):
    assert_twins_agree([data])


@PROPERTY
@given(mutated_fixtures())
def test_differential_mutated_fixtures(data):
    assert_twins_agree([data])


@PROPERTY
@given(split(st.one_of(mutated_fixtures(), random_streams, st.sampled_from(FIXTURE_STREAMS))))
def test_differential_random_splits(pieces):
    assert_twins_agree(pieces)


hostname_bytes = st.one_of(
    st.binary(max_size=260),
    st.lists(st.sampled_from(b"aZ09.-_/\x00\xff"), max_size=260).map(bytes),
    st.integers(240, 260).map(lambda n: (b"ab." * 100)[:n]),
)


@PROPERTY
@given(hostname_bytes)
def test_differential_check_hostname(raw):
    pure, compiled = both_twins()
    assert compiled.check_hostname(raw) == pure.check_hostname(raw)
    assert compiled.check_hostname(bytearray(raw)) == pure.check_hostname(raw)
