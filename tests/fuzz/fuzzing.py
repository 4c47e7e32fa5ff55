"""What the three fuzz harnesses share: loading both twins, and reading a fuzz input.

A fuzz input starts with a split pattern: one byte ``n`` (its low 4 bits), then ``n``
size bytes; the rest is the payload, cut into pieces whose sizes cycle through the
pattern (no pattern: one piece).  A size byte below 128 means 1..128 bytes, above it
256..32768 bytes, so both byte-by-byte dribbles and large reads are one mutation away.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

SPLIT_SIZES_AT_MOST = 15


def size_of(byte: int) -> int:
    return byte + 1 if byte < 128 else (byte - 127) * 256


def split_pattern(data: bytes) -> tuple[list[int], bytes]:
    """``data`` -> (piece sizes, the rest)."""
    if not data:
        return [], b""
    count = data[0] & SPLIT_SIZES_AT_MOST
    return [size_of(byte) for byte in data[1 : 1 + count]], data[1 + count :]


def cut(payload: bytes, sizes: list[int]) -> list[bytes]:
    """``payload`` in pieces whose sizes cycle through ``sizes`` (one piece if none)."""
    if not sizes:
        return [payload]
    pieces = []
    at = 0
    index = 0
    while at < len(payload):
        size = sizes[index % len(sizes)]
        pieces.append(payload[at : at + size])
        at += size
        index += 1
    return pieces or [b""]


def pattern(sizes: list[int]) -> bytes:
    """The split-pattern prefix for piece ``sizes`` (each 1..128 or a multiple of 256), for seeds."""
    out = bytearray([len(sizes)])
    for size in sizes:
        out.append(size - 1 if size <= 128 else 127 + size // 256)
    assert [size_of(byte) for byte in out[1:]] == list(sizes), sizes
    return bytes(out)


def twins(pure: str, compiled: str, instrument: bool) -> tuple[ModuleType, ModuleType]:
    """The pure module and its compiled twin; with ``instrument`` (a harness run as a
    program) the pure one, and what it imports of fastsni, under atheris's coverage
    instrumentation.  Only Python bytecode is instrumented: the coverage that guides the
    fuzzer is the pure twin's (the specification, which the compiled one mirrors branch
    for branch).  Without ``instrument`` (pytest replaying a regression input), atheris
    is not needed."""
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["fastsni", "fasthttpdir"]):
            pure_module = importlib.import_module(pure)
    else:
        pure_module = importlib.import_module(pure)
    try:
        compiled_module = importlib.import_module(compiled)
    except ImportError:
        sys.exit(f"{compiled} is not built: run `python3 setup.py build_ext --inplace` first")
    return pure_module, compiled_module


def printable(reason: str) -> bool:
    """A log reason holds no raw client bytes: printable ASCII only."""
    return reason.isascii() and reason.isprintable()


def main(test_one_input) -> None:
    """Run ``test_one_input`` under libFuzzer with the command line's options and corpus dirs."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
