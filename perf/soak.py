#!/usr/bin/env python3
"""Soak: both proxies under continuous load while they hand over and a host's symlink switches.

    nice -n 10 python3 perf/soak.py                      # the README's figures (compiled twin)
    nice -n 10 python3 perf/soak.py --twin pure
    python3 perf/soak.py --connections 1000 --rss-connections 0 --streams 4   # a quick look

Correctness evidence, not a benchmark: nothing here is timed against anything.

Phase 1, memory: --rss-connections new connections through each proxy (one process each)
while ``soak.test`` is switched between two backends every --switch-every seconds by
rename(2) of a fresh symlink; each proxy's VmRSS is sampled every 10,000 connections.

Phase 2, handover: --connections new connections and --streams long streams (each
--stream-kib, paced so that it spans handovers; sha256 checked end to end) through each
proxy, while every --handover-every seconds a second copy starts on the same listening
socket and the first gets SIGHUP (it drains and must exit 0 with no connection cut), and
the symlink keeps switching.

Every connection checks what came back: fastsni's backends answer their tag ("blue" or
"green") and echo every byte; fasthttpdir's answer their tag, the sha256 of an uploaded
body, or a download of a known pattern.  Prints one JSON line; exits 1 if any connection
failed, any stream was corrupted, any drain cut a connection or --seconds ran out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "soak.test"
TAGS = (b"blue", b"green")
PATTERN = bytes(range(256)) * 256  # 64 KiB: what a download is made of
PIECE = 64 * 1024  # bytes a stream moves per step
CONNECT_TIMEOUT = 30.0  # seconds any one connection may take before it counts as failed
RSS_EVERY = 10_000


# -- backends (a separate process: --serve HOSTS) ----------------------------------------------


async def tls_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes) -> None:
    """Read the ClientHello record, answer the tag, then echo everything until EOF."""
    try:
        header = await reader.readexactly(5)
        await reader.readexactly(int.from_bytes(header[3:5], "big"))
        writer.write(tag + b"\n")
        while data := await reader.read(PIECE):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def http_head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()


async def http_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes) -> None:
    """One request per connection: POST answers ``<tag> <sha256 of the body>``; GET /big?N
    answers N bytes of PATTERN; any other GET answers the tag."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *fields = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ")
        length = 0
        for field in fields:
            name, _, value = field.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if method == "POST":
            digest = hashlib.sha256()
            while length:
                chunk = await reader.read(min(length, PIECE))
                if not chunk:
                    return
                digest.update(chunk)
                length -= len(chunk)
            body = tag + b" " + digest.hexdigest().encode()
            writer.write(http_head(len(body)) + body)
        elif target.startswith("/big?"):
            size = int(target[5:])
            writer.write(http_head(size))
            while size > 0:
                writer.write(PATTERN[:size])
                size -= len(PATTERN)
                await writer.drain()
        else:
            writer.write(http_head(len(tag)) + tag)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def serve(hosts: Path) -> None:
    """Both backends (blue, green) for both proxies, until stdin closes."""
    servers = []
    for tag in TAGS:
        entry = hosts / tag.decode()
        entry.mkdir(parents=True, exist_ok=True)
        for leaf, handler in (("tls-socket", tls_backend), ("http-socket", http_backend)):

            async def handle(reader, writer, handler=handler, tag=tag):
                await handler(reader, writer, tag)

            servers.append(await asyncio.start_unix_server(handle, path=str(entry / leaf), backlog=4096))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # returns at EOF: the soak is done
    for server in servers:
        server.close()


# -- the proxies --------------------------------------------------------------------------------


class Proxy:
    """One program on one listening socket; copies come and go (handover)."""

    def __init__(self, program: str, hosts: Path, twin: str) -> None:
        self.program = program
        self.hosts = hosts
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port = self.listener.getsockname()[1]
        self.env = dict(os.environ, FASTSNI_ALLOW_ROOT="1")
        if os.environ.get("FASTSNI_TEST_INSTALLED", "") in ("", "0"):  # else: the installed wheel
            self.env["PYTHONPATH"] = str(REPO)
        self.env.pop("FASTSNI_NO_EXTENSIONS", None)
        if twin == "pure":
            self.env["FASTSNI_NO_EXTENSIONS"] = "1"
        self.twin = twin
        self.current: asyncio.subprocess.Process | None = None
        self.handovers = 0
        self.exits: list[tuple[int, str]] = []  # (exit status, last stderr line) of each drained copy
        self.log: list[str] = []
        self.reapers: list[asyncio.Task] = []

    async def start(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.program,
            stdin=self.listener.fileno(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.hosts,
            env=self.env,
        )
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        if "listening on" not in line or f"({self.twin}," not in line:
            raise RuntimeError(f"{self.program} did not start: {line!r}")
        self.reapers.append(asyncio.ensure_future(self.reap(process)))
        self.current = process
        return process

    async def reap(self, process: asyncio.subprocess.Process) -> None:
        last = ""
        async for raw in process.stderr:
            last = raw.decode().rstrip("\n")
            self.log.append(last)
        self.exits.append((await process.wait(), last))

    async def handover(self) -> None:
        """A second copy on the same socket, then SIGHUP to the first (README: Graceful restart)."""
        old = self.current
        await self.start()
        old.send_signal(signal.SIGHUP)
        self.handovers += 1

    async def stop(self) -> None:
        if self.current is not None and self.current.returncode is None:
            self.current.send_signal(signal.SIGTERM)
        await asyncio.gather(*self.reapers)
        self.listener.close()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.current.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


# -- the clients --------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.connections = 0
        self.failures: list[str] = []
        self.streams = 0
        self.corrupted = 0
        self.tags = {tag.decode(): 0 for tag in TAGS}

    def failed(self, what: str) -> None:
        self.failures.append(what)


async def short_connection(proxy: Proxy, hello: bytes, tally: Tally) -> None:
    """A new connection: fastsni gets a ClientHello and 32 bytes, which must come back
    after the backend's tag; fasthttpdir gets a GET answered with the tag."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        if proxy.program == "fastsni":
            payload = os.urandom(32)
            writer.write(hello + payload)
            writer.write_eof()
            answer = await reader.read(-1)
            tag, _, echoed = answer.partition(b"\n")
            ok = tag in TAGS and echoed == payload
        else:
            writer.write(f"GET /short HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read(-1)
            head, _, tag = answer.partition(b"\r\n\r\n")
            ok = head.startswith(b"HTTP/1.1 200 ") and tag in TAGS
        if not ok:
            raise AssertionError(f"unexpected answer {answer[:80]!r}")
        tally.tags[tag.decode()] += 1
    finally:
        writer.close()


async def paced_upload(writer: asyncio.StreamWriter, data: bytes, pace: float) -> None:
    for at in range(0, len(data), PIECE):
        writer.write(data[at : at + PIECE])
        await writer.drain()
        await asyncio.sleep(pace)


async def long_stream(proxy: Proxy, hello: bytes, size: int, pace: float, kind: int) -> bool:
    """A long stream, paced to last size/PIECE*pace seconds; True if every byte arrived
    intact (sha256 compared end to end)."""
    data = os.urandom(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        if proxy.program == "fastsni":  # both directions at once: the backend echoes
            writer.write(hello)
            sender = asyncio.ensure_future(paced_upload(writer, data, pace))
            tag = (await reader.readline()).rstrip(b"\n")
            echoed = await reader.readexactly(size)
            await sender
            return tag in TAGS and hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        if kind % 2 == 0:  # upload: the backend answers the sha256 of what it got
            writer.write(f"POST /up HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {size}\r\n\r\n".encode())
            await paced_upload(writer, data, pace)
            head, _, body = (await reader.read(-1)).partition(b"\r\n\r\n")
            tag, _, digest = body.partition(b" ")
            return tag in TAGS and digest == hashlib.sha256(data).hexdigest().encode()
        writer.write(f"GET /big?{size} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        digest = hashlib.sha256()
        got = 0
        while chunk := await reader.read(PIECE):  # paced reading: the proxy must hold back
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(pace * len(chunk) / PIECE)
        expected = hashlib.sha256((PATTERN * (size // len(PATTERN) + 1))[:size]).digest()
        return got == size and digest.digest() == expected
    finally:
        writer.close()


async def connections(proxy: Proxy, hello: bytes, tally: Tally, count: int, concurrency: int, on_each=None):
    """``count`` short connections, ``concurrency`` at a time."""
    left = [count]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            try:
                await asyncio.wait_for(short_connection(proxy, hello, tally), CONNECT_TIMEOUT)
            except Exception as exc:
                tally.failed(f"{proxy.program} connection: {exc!r}")
            tally.connections += 1
            if on_each is not None:
                on_each()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def streams(proxy: Proxy, hello: bytes, tally: Tally, count: int, size: int, pace: float) -> None:
    """``count`` long streams, two at a time."""
    left = [count]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            kind = left[0]
            try:
                ok = await asyncio.wait_for(long_stream(proxy, hello, size, pace, kind), 120)
            except Exception as exc:
                tally.failed(f"{proxy.program} stream: {exc!r}")
                continue
            tally.streams += 1
            if not ok:
                tally.corrupted += 1

    await asyncio.gather(worker(), worker())


async def every(seconds: float, action, stop: asyncio.Event) -> int:
    """Run ``action()`` every ``seconds`` until ``stop``; how many times it ran."""
    count = 0
    while True:
        try:
            await asyncio.wait_for(stop.wait(), seconds)
            return count
        except asyncio.TimeoutError:
            pass
        await action()
        count += 1


# -- the soak -----------------------------------------------------------------------------------


async def soak(options: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from backends import client_hello

    hello = client_hello(NAME)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastsni-soak-") as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.mkdir()
        backend = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(hosts),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if await asyncio.wait_for(backend.stdout.readline(), 30) != b"ready\n":
            raise RuntimeError("the backends did not start")
        os.symlink("blue", hosts / NAME)
        target = ["blue"]

        async def switch():
            target[0] = "green" if target[0] == "blue" else "blue"
            os.symlink(target[0], hosts / ".next")
            os.replace(hosts / ".next", hosts / NAME)  # rename(2): atomic

        proxies = [Proxy(program, hosts, options.twin) for program in options.programs.split(",")]
        for proxy in proxies:
            await proxy.start()
        result: dict = {"twin": options.twin, "options": vars(options)}
        stop_switching = asyncio.Event()
        switcher = asyncio.ensure_future(every(options.switch_every, switch, stop_switching))
        try:
            budget = options.seconds
            if options.rss_connections:
                result["memory"] = await asyncio.wait_for(memory_phase(options, proxies, hello), budget)
            left = budget - (time.monotonic() - started)
            result["handover"] = await asyncio.wait_for(handover_phase(options, proxies, hello), left)
        except asyncio.TimeoutError:
            result["timed_out"] = True
        finally:
            stop_switching.set()
            result["switches"] = await switcher
            for proxy in proxies:
                await proxy.stop()
                result.setdefault("copies", {})[proxy.program] = {
                    "started": len(proxy.exits),
                    "exit_status_not_0": [(status, last) for status, last in proxy.exits if status != 0],
                    "drains_that_cut": sum("cut" in last for _, last in proxy.exits),
                    "other_log_lines": other_lines(proxy.log)[:5],
                }
            backend.stdin.close()
            await backend.wait()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["status"] = status(result)
    return result


async def memory_phase(options, proxies: list[Proxy], hello: bytes) -> dict:
    out = {}

    async def one(proxy: Proxy) -> None:
        tally = Tally()
        samples = [proxy.rss_kib()]

        def sample():
            if tally.connections % RSS_EVERY == 0:
                samples.append(proxy.rss_kib())

        await connections(proxy, hello, tally, options.rss_connections, options.concurrency, sample)
        after_warmup = samples[1:] or samples
        out[proxy.program] = {
            "connections": tally.connections,
            "failed": len(tally.failures),
            "first_failures": tally.failures[:5],
            "tags": tally.tags,
            "rss_kib": samples,
            "rss_growth_after_first_10k_kib": max(after_warmup) - after_warmup[0],
        }

    await asyncio.gather(*(one(proxy) for proxy in proxies))
    return out


async def handover_phase(options, proxies: list[Proxy], hello: bytes) -> dict:
    out = {}
    size = options.stream_kib * 1024

    async def one(proxy: Proxy) -> None:
        tally = Tally()
        stop = asyncio.Event()
        handovers = asyncio.ensure_future(every(options.handover_every, proxy.handover, stop))
        await asyncio.gather(
            connections(proxy, hello, tally, options.connections, options.concurrency),
            streams(proxy, hello, tally, options.streams, size, options.pace),
        )
        stop.set()
        await handovers
        out[proxy.program] = tally

    await asyncio.gather(*(one(proxy) for proxy in proxies))
    result = {}
    for proxy in proxies:
        tally = out[proxy.program]
        result[proxy.program] = {
            "connections": tally.connections,
            "failed": len(tally.failures),
            "first_failures": tally.failures[:5],
            "streams": tally.streams,
            "stream_mib": round(tally.streams * size / 2**20),
            "corrupted": tally.corrupted,
            "tags": tally.tags,
            "handovers": proxy.handovers,
        }
    return result


def other_lines(log: list[str]) -> list[str]:
    """Log lines besides each copy's SIGHUP, last counters and exit lines: each one is a failure."""
    usual = (": SIGHUP: ", ": exiting", ": counters pid=")
    return [line for line in log if not any(text in line for text in usual)]


def status(result: dict) -> int:
    """1 if anything failed: a connection, a stream, a copy's exit or drain, the time bound."""
    bad = result.get("timed_out", False)
    for phase in ("memory", "handover"):
        for figures in result.get(phase, {}).values():
            bad = bad or figures["failed"] or figures.get("corrupted", 0)
    for copies in result.get("copies", {}).values():
        bad = bad or copies["exit_status_not_0"] or copies["drains_that_cut"] or copies["other_log_lines"]
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--twin", choices=("compiled", "pure"), default="compiled")
    parser.add_argument("--programs", default="fastsni,fasthttpdir", help="which proxies, comma-separated")
    parser.add_argument("--rss-connections", type=int, default=100_000, help="phase 1, per proxy")
    parser.add_argument("--connections", type=int, default=20_000, help="phase 2, per proxy")
    parser.add_argument("--streams", type=int, default=40, help="phase 2, per proxy")
    parser.add_argument("--stream-kib", type=int, default=4096)
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between a stream's 64 KiB pieces")
    parser.add_argument("--concurrency", type=int, default=8, help="connections in flight per proxy")
    parser.add_argument("--handover-every", type=float, default=1.0)
    parser.add_argument("--switch-every", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=900, help="the whole run's time bound")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the backend process
    options = parser.parse_args()
    if options.serve:
        asyncio.run(serve(options.serve))
        return
    result = asyncio.run(soak(options))
    print(json.dumps(result))
    raise SystemExit(result["status"])


if __name__ == "__main__":
    main()
