#!/usr/bin/env python3
"""Fuzz fasthttpdir's answer side: the real HttpConnection of each twin, on its own real
engine (fasthttpdir.proxy on fastsni.engine, fasthttpdir._http on fastsni._engine),
between a loopback TCP client and a Unix-socket backend that sends the fuzz input.

Input: a split pattern for the backend's writes (see fuzzing.py), then one flags byte,
then the payload: the backend's answer bytes.  Flags bits 0-3 choose the client's
request (REQUESTS), bit 4 makes the backend close after its last write.  Each twin runs
the same exchange; step by step the harness writes a piece, lets the reactor dispatch
what is ready, and collects what reached the client and the backend.  Checked:

- the twins agree exactly: bytes to the client, bytes to the backend, the connection's
  state afterwards (status, final, forwarded, overrun, close-delimited, keep-alive,
  closed, lingering, relayed), and the log lines;
- the client gets the backend's bytes unchanged, cut at most, and then nothing or one
  502 answer; nothing escapes but the documented log lines (no internal error);
- a connection left idle between requests has passed whole answers, one per request;
- once client and backend have closed, the connection ends and leaves no descriptor.

    python3 tests/fuzz/fuzz_response.py -runs=200000 /tmp/fuzz-response tests/fuzz/corpus/response
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import tempfile

import httptools
from fuzzing import cut, main, printable, split_pattern, twins

pure_http, compiled_http = twins("fasthttpdir.proxy", "fasthttpdir._http", __name__ == "__main__")
pure_engine, compiled_engine = twins("fastsni.engine", "fastsni._engine", False)
from fastsni.logs import failures  # noqa: E402  (after the instrumented import of the engine)

HOST = b"a.example"
GET = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: a.example\r\n\r\n"
# (the client's bytes, the methods of its requests), chosen by the input's flags
REQUESTS = (
    (GET, (b"GET",)),
    (HEAD, (b"HEAD",)),
    (b"POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello", (b"POST",)),
    (b"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", (b"GET",)),
    (b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n", (b"GET",)),
    (b"POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 10\r\n\r\nhello", (b"POST",)),  # half a body
    (GET + GET, (b"GET", b"GET")),
    (HEAD + GET, (b"HEAD", b"GET")),
    (b"PUT /u HTTP/1.1\r\nHost: a.example\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n", (b"PUT",)),
    (
        b"POST /c HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        (b"POST",),
    ),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n", (b"GET",)),
    (
        b"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n" + GET,
        (b"GET", b"GET"),
    ),  # the GET is held until the upgrade is answered
    (
        b"POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nok" + GET,
        (b"POST", b"GET"),
    ),
    (b"GET http://a.example/abs HTTP/1.1\r\nHost: a.example\r\n\r\n", (b"GET",)),
    (b"HEAD / HTTP/1.0\r\nHost: a.example\r\n\r\n", (b"HEAD",)),
    (HEAD + HEAD, (b"HEAD", b"HEAD")),
)
BAD_GATEWAY = pure_http.error_response(502, True)
BAD_GATEWAY_HEAD = BAD_GATEWAY[: BAD_GATEWAY.index(b"\r\n\r\n") + 4]  # the answer to HEAD has no body
LOG_LINE = re.compile(r"fasthttpdir: 127\.0\.0\.1:\d+ (-|a\.example): (.*)\n\Z")
ROUNDS = 3  # reactor dispatches per step: each step is a few events (edge-triggered, all read at once)


class Twin:
    """One twin's proxy in this process: its Service on a loopback port, its reactor."""

    def __init__(self, engine, http, hosts: str) -> None:
        self.hosts = hosts
        here = os.getcwd()
        os.chdir(hosts)
        try:
            engine.open_hosts()  # every lookup beneath this descriptor, as the server's start does
        finally:
            os.chdir(here)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        self.address = listener.getsockname()
        self.service = engine.Service(listener, http.HttpConnection)
        self.service.listener.start()
        self.reactor = self.service.reactor
        self.listener_fd = listener.fileno()
        self.listener = listener

    def turn(self, until=lambda: False) -> None:
        """Let the reactor hand out what is ready (in the hosts directory: it connects backends)."""
        for _ in range(ROUNDS):
            if until():
                return
            self.reactor.dispatch(0)

    def exchange(self, backend_listener: socket.socket, request: bytes, pieces: list[bytes], eof: bool):
        """Run one connection: the client sends ``request``, the backend answers ``pieces``."""
        lines: list[str] = []
        failures.write = lines.append  # the log lines of this exchange, unlimited
        here = os.getcwd()
        os.chdir(self.hosts)
        try:
            return self._exchange(backend_listener, request, pieces, eof, lines)
        finally:
            os.chdir(here)
            del failures.write

    def _exchange(self, backend_listener, request, pieces, eof, lines):
        client = socket.create_connection(self.address)
        client.setblocking(False)
        live = self.service.live
        self.turn(lambda: live)
        assert len(live) == 1, live
        connection = next(iter(live))
        client.sendall(request)
        backend = None
        to_client = bytearray()
        to_backend = bytearray()
        client_eof = False
        connections: list[socket.socket] = []

        def accept() -> bool:
            nonlocal backend
            try:
                backend, _ = backend_listener.accept()
            except BlockingIOError:
                return False
            backend.setblocking(False)
            connections.append(backend)
            return True

        def drain() -> None:
            nonlocal client_eof
            client_eof = client_eof or receive(client, to_client)
            if backend is not None:
                receive(backend, to_backend)
            accept()  # a retry on a new backend connection: answer on that one from now on

        self.turn(accept)
        drain()
        for piece in pieces:
            if backend is None or not send(backend, piece):
                break
            self.turn()
            drain()
        if eof and backend is not None:
            try:
                backend.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.turn()
            drain()
        self.turn()
        drain()
        state = (
            connection.status,
            connection.final,
            connection.forwarded,
            connection.overrun,
            connection.close_delimited,
            connection.response_keep_alive,
            connection.closed,
            connection.lingering,
            connection.closing,
            connection.relayed,
            connection.active is None,
            client_eof,
            len(connections),
        )
        # Both peers go: the connection must end, with no timer needed.
        client.close()
        for sock in connections:
            sock.close()
        for _ in range(ROUNDS):
            if not live:
                break
            self.reactor.dispatch(0)
            while accept():  # a retry as the backend went: refuse it too
                backend.close()
        ended = not live and set(self.reactor.handlers) == {self.listener_fd}
        for handler in list(self.reactor.handlers.values()):  # clean up for the next run
            if handler is not self.service.listener:
                (handler.shut if hasattr(handler, "shut") else handler.close)()
        live.clear()
        self.reactor.timers.clear()
        return (
            bytes(to_client),
            bytes(to_backend),
            state,
            [LOG_LINE.sub(r"\1: \2", line) for line in lines],
            ended,
        )


def receive(sock: socket.socket, into: bytearray) -> bool:
    """Read what ``sock`` holds into ``into``; True at EOF (or a reset)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        into += data


def send(sock: socket.socket, data: bytes) -> bool:
    """Write ``data`` (it fits the socket buffer); False if the proxy closed its end."""
    try:
        sock.sendall(data)
    except BlockingIOError:
        return True  # the proxy stopped reading: the rest stays unsent
    except OSError:
        return False
    return True


class Answers:
    """httptools callbacks: count the whole answers in what the client received."""

    def __init__(self) -> None:
        self.begun = 0
        self.completed = 0
        self.finals = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_message_complete(self) -> None:
        self.completed += 1
        if self.parser.get_status_code() >= 200:
            self.finals += 1


hosts = tempfile.mkdtemp(prefix="fuzz-response-")  # one backend, a.example, for every exchange
atexit.register(shutil.rmtree, hosts, True)
os.mkdir(os.path.join(hosts, HOST.decode()))
backend_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
backend_listener.bind(os.path.join(hosts, HOST.decode(), "http-socket"))
backend_listener.listen(8)
backend_listener.setblocking(False)
pure = Twin(pure_engine, pure_http, hosts)
compiled = Twin(compiled_engine, compiled_http, hosts)


def test_one_input(data: bytes) -> None:
    sizes, rest = split_pattern(data)
    flags, payload = (rest[0], rest[1:]) if rest else (0, b"")
    request, methods = REQUESTS[flags & 15]
    eof = bool(flags & 16)
    pieces = cut(payload, sizes) if payload else []
    expected = pure.exchange(backend_listener, request, pieces, eof)
    got = compiled.exchange(backend_listener, request, pieces, eof)
    assert got == expected, (got, expected)
    to_client, _to_backend, state, lines, ended = expected
    assert ended, ("the connection outlived both its peers", state)
    for line in lines:  # each "name: reason", from a fasthttpdir log line about this client
        assert re.fullmatch(r"(-|a\.example): .*", line) and printable(line), line
    cut_at = len(to_client)
    if not payload.startswith(to_client):
        bad_gateway = BAD_GATEWAY if to_client.endswith(BAD_GATEWAY) else BAD_GATEWAY_HEAD
        cut_at = to_client.rfind(bad_gateway)
        assert cut_at >= 0 and to_client[cut_at:] == bad_gateway, to_client
        assert payload.startswith(to_client[:cut_at]), to_client
    idle = not (state[6] or state[7] or state[8] or state[9]) and state[10]
    if idle and b"HEAD" not in methods:
        answers = Answers()
        answers.parser.feed_data(to_client)
        assert answers.begun == answers.completed, ("a partial answer", to_client)
        assert answers.finals == len(methods), ("not one answer per request", to_client)


if __name__ == "__main__":
    main(test_one_input)
