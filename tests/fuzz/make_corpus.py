"""Write the seed corpora in tests/fuzz/corpus/ (run by hand; the result is committed).

    python3 tests/fuzz/make_corpus.py [CAPTURED_HELLOS_DIR ...]

hello/: the captured ClientHellos of tests/fixtures/hellos/ (and of any directory given,
e.g. a shared capture set with an index.json) whole, in 1-byte and uneven segments, and
re-recorded from their handshake layer in 1-byte and uneven records.  request/: the
requests the tests send, whole and in small reads, and Host/target lines for host_name.
response/: the answers the tests' backends give, for each request kind of
fuzz_response.REQUESTS, whole and in small writes, with and without the backend's EOF.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from fuzzing import pattern

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures" / "hellos"
CORPUS = HERE / "corpus"

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET http://a.example:8080/x HTTP/1.1\r\nHost: A.example.\r\nX-Forwarded-For: 1\r\n\r\n",
    b"POST /u HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.0\r\nHost: c\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: w\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nhOsT:\t a.example  \r\nForwarded: for=x\r\nX-Forwarded-Proto: https\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a.example\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    # issue 21: HTTP/1.0 with Transfer-Encoding (400), routing trailers and "_" names (dropped)
    b"POST /a HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\nGET /s HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST /t HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    b"Host: evil.example\r\nConnection: keep-alive\r\nUpgrade: h2c\r\nTE: trailers\r\nTrailer: C\r\n"
    b"X-Forwarded-Port: 1\r\nHost_: e\r\nC: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer_Encoding: chunked\r\nContent-Length: 3\r\n"
    b"X_Forwarded_For: 6.6.6.6\r\nHost_: b\r\n\r\nabc0\r\n\r\n",
]
HOST_LINES = [
    b"a.example\n/",
    b"A.Example.:80\nhttp://a.example/x",
    b"a\nb\n/",
    b"[::1]\n/",
    b"a\nhttps://u@a/",
]
ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nhello ",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nclose-delimited",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\n\r\n",
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
    b"garbage\r\n\r\n",
]


def handshake_layer(stream: bytes) -> bytes:
    """The payloads of the TLS records in ``stream``, joined."""
    out = bytearray()
    at = 0
    while at + 5 <= len(stream):
        length = stream[at + 3] << 8 | stream[at + 4]
        out += stream[at + 5 : at + 5 + length]
        at += 5 + length
    return bytes(out)


def hello_seeds(directories: list[Path]) -> list[bytes]:
    seeds = []
    for directory in directories:
        for path in sorted(directory.glob("*.bin")):
            stream = path.read_bytes()
            layer = handshake_layer(stream)
            seeds += [
                pattern([]) + b"\x00" + stream,
                pattern([1]) + b"\x00" + stream,
                pattern([5, 100, 1024]) + b"\x00" + stream,
                pattern([]) + b"\x80" + pattern([1]) + layer,
                pattern([3]) + b"\x80" + pattern([7, 100, 2]) + layer,
            ]
    return seeds


def request_seeds() -> list[bytes]:
    seeds = []
    for request in REQUESTS:
        seeds += [
            pattern([]) + b"\x00" + request,
            pattern([1]) + b"\x01" + request,
            pattern([9, 40]) + b"\x00" + request,
            pattern([]) + b"\x20" + request,  # padded past 64 KiB
            pattern([128, 128 * 256]) + b"\x20" + request,
        ]
    return seeds + [pattern([]) + b"\x40" + lines for lines in HOST_LINES]


def response_seeds() -> list[bytes]:
    seeds = []
    for answer in ANSWERS:
        for kind in range(16):
            seeds.append(pattern([]) + bytes([kind]) + answer)
        seeds += [
            pattern([1]) + b"\x00" + answer,
            pattern([17, 3]) + b"\x11" + answer,
            pattern([2]) + b"\x17" + answer,
        ]
    return seeds


def write(name: str, seeds: list[bytes]) -> None:
    directory = CORPUS / name  # beside the inputs fuzzing found and merged in (run.py --merge)
    directory.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)
    print(f"{directory}: {len(list(directory.iterdir()))} seeds")


if __name__ == "__main__":
    write("hello", hello_seeds([FIXTURES, *map(Path, sys.argv[1:])]))
    write("request", request_seeds())
    write("response", response_seeds())
