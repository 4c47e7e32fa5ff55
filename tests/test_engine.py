"""The engine's reactor in process, over both twins."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest


@pytest.fixture
def engine(twin):
    return twin.module("fastsni.engine", "fastsni._engine")


def recorder(engine):
    """A Handler of that twin's engine that notes the events it gets."""

    class Recorder(engine.Handler):
        def __init__(self, fail: bool = False) -> None:
            self.events: list[int] = []
            self.fail = fail
            self.closed = False

        def ready(self, fd: int, events: int) -> None:
            self.events.append(events)
            if self.fail:
                raise MemoryError("injected")

        def close(self) -> None:
            self.closed = True

    return Recorder


def test_a_failing_handler_does_not_strand_the_batch(engine, capfd):
    """Edge-triggered events come once: one handler's exception must not lose the others'."""
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        reactor = engine.Reactor()
        Recorder = recorder(engine)
        handlers = [Recorder(fail=True), Recorder(), Recorder()]
        for (ours, theirs), handler in zip(pairs, handlers, strict=True):
            ours.setblocking(False)
            reactor.add(ours.fileno(), handler)
            theirs.send(b"x")
        reactor.dispatch()
        assert all(handler.events for handler in handlers)
        assert [handler.closed for handler in handlers] == [True, False, False]
        assert "internal error" in capfd.readouterr().err
        for handler in handlers:
            handler.events.clear()
        reactor.dispatch()  # edge-triggered: nothing new, nothing reported
        assert not any(handler.events for handler in handlers)
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_reactor_close_forgets_and_closes(engine):
    ours, theirs = socket.socketpair()
    try:
        reactor = engine.Reactor()
        fd = os.dup(ours.fileno())
        reactor.add(fd, recorder(engine)())
        reactor.want_write(fd)
        reactor.close(fd)
        assert fd not in reactor.handlers and fd not in reactor.writers
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        ours.close()
        theirs.close()


def test_timers_are_not_scanned_per_wakeup(engine):
    """next_timeout() looks at one number, not at every timer: a cancelled earliest timer
    still bounds the wait (one wakeup for nothing) until run_timers() finds the next live
    one; cancelled timers at a FIFO's head go when the next one of that delay is set, so
    a FIFO holds no more than the live span of its timers."""
    reactor = engine.Reactor()
    first = reactor.call_later(30, print)
    live = reactor.call_later(60, print)
    assert 29 < reactor.next_timeout() <= 30
    first.cancel()
    assert 29 < reactor.next_timeout() <= 30  # stale: one early wakeup, no scan
    reactor.earliest = 0  # as if that wakeup came: run_timers looks again
    reactor.run_timers()
    assert 59 < reactor.next_timeout() <= 60
    live.cancel()
    for _ in range(1000):  # a busy proxy: each hello timer cancelled before the next is set
        reactor.call_later(10, print).cancel()
    assert len(reactor.timers[10]) == 1
    assert reactor.next_timeout() <= 10
    reactor.earliest = 0
    reactor.run_timers()
    assert reactor.next_timeout() == -1  # nothing live: epoll_wait blocks until an event


def test_standalone_reactor_dispatches_runs_timers_and_stops(engine):
    """The Reactor is its own loop: events, timers in order (a cancelled one never fires), stop()."""
    reactor = engine.Reactor()
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        handler = recorder(engine)()
        reactor.add(ours.fileno(), handler)
        theirs.send(b"x")
        fired: list[str] = []
        reactor.call_later(0.05, fired.append, "late")
        reactor.call_later(0.01, fired.append, "cancelled").cancel()
        reactor.call_later(0.02, fired.append, "early")
        reactor.call_later(0.1, reactor.stop)
        started = time.monotonic()
        reactor.run_forever()
        assert 0.1 <= time.monotonic() - started < 5
        assert handler.events and handler.events[0] & engine.READABLE
        assert fired == ["early", "late"]
        reactor.stop()
        reactor.run_forever()  # stopped before it ran: returns at once
    finally:
        ours.close()
        theirs.close()


def test_standalone_reactor_wakes_for_a_signal(engine):
    """A signal interrupting a blocked epoll_wait runs its handler from the loop."""
    reactor = engine.Reactor()
    previous = signal.getsignal(signal.SIGUSR1)
    got: list[str] = []

    def handle(how: str) -> None:
        got.append(how)
        reactor.stop()

    try:
        reactor.add_signal_handler(signal.SIGUSR1, handle, "usr1")
        reactor.call_later(10, reactor.stop)  # a bound in case the signal is lost
        sender = threading.Timer(0.1, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
        sender.start()
        reactor.run_forever()
        sender.join()
        assert got == ["usr1"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(signal.set_wakeup_fd(-1))
        os.close(reactor.wakeup)


def test_a_failing_accept_loses_that_connection_not_the_listener(engine, capfd):
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    accepted: list[int] = []

    class Served(engine.Handler):
        def ready(self, fd: int, events: int) -> None:  # called at once: the client speaks first
            os.close(fd)
            service.reactor.stop()

    def start(service, fd: int, peer: tuple):
        accepted.append(fd)
        if len(accepted) == 1:
            raise MemoryError("injected")
        return Served()

    service = engine.Service(listening, start)
    service.listener.start()
    first = socket.create_connection(listening.getsockname(), timeout=5)
    second = socket.create_connection(listening.getsockname(), timeout=5)
    try:
        service.reactor.call_later(5, service.reactor.stop)  # a bound
        service.reactor.run_forever()
        assert len(accepted) == 2 and service.listener.accepting
        assert first.recv(1) == b""
        assert "internal error" in capfd.readouterr().err
    finally:
        service.listener.close()
        first.close()
        second.close()


def test_a_new_connection_is_read_at_once(engine):
    """The client speaks first: Service calls the new Handler's ready(fd, READABLE) as
    soon as it is made, before any epoll wakeup, data there or not."""
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    calls: list[tuple] = []

    class Reader(engine.Handler):
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def ready(self, fd: int, events: int) -> None:
            calls.append((fd == self.fd, events))
            os.close(fd)

    service = engine.Service(listening, lambda service, fd, peer: Reader(fd))
    clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(2)]
    try:
        clients[0].sendall(b"\x16\x03\x01")  # bytes or none, each is read at once
        service.listener.accept()
        assert calls == [(True, engine.READABLE)] * 2
    finally:
        listening.close()
        for sock in clients:
            sock.close()


@pytest.mark.parametrize(
    "family, listen_on, connect_to",
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual-stack: the peer is IPv4-mapped
    ],
)
def test_peer_of_and_local_of_are_what_the_socket_says(engine, family, listen_on, connect_to):
    """The compiled twin asks getpeername(2) and getsockname(2) itself; both twins give
    socket.getpeername()'s and socket.getsockname()'s tuples."""
    listener = socket.socket(family)
    try:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((listen_on, 0))
        listener.listen()
        with socket.create_connection((connect_to, listener.getsockname()[1]), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert engine.peer_of(accepted.fileno(), family) == accepted.getpeername()
                assert engine.local_of(accepted.fileno(), family) == accepted.getsockname()
    finally:
        listener.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.10.99", "127.100.200.255", "127.255.0.90"])
def test_ipv4_addresses_read_as_inet_ntop_writes_them(engine, address):
    """The compiled twin writes an IPv4 address itself: one, two and three digits, and 0."""
    with socket.socket() as listener, socket.socket() as client:
        listener.bind((address, 0))
        listener.listen()
        client.bind((address, 0))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            assert engine.peer_of(accepted.fileno(), socket.AF_INET) == (address, client.getsockname()[1])


@pytest.mark.parametrize("events_name", ["EPOLLRDHUP", "EPOLLRDHUP|EPOLLHUP"])
def test_eof_after_a_fin_costs_no_read(engine, events_name):
    """A peer that shut its writing side queued everything before its FIN: once a short
    read took those bytes, EOF is known without another read(2) (the descriptor is gone
    before that read, so a system call would fail with EBADF)."""
    events = engine.READABLE
    for name in events_name.split("|"):
        events |= getattr(select, name)
    ours, peer = socket.socketpair()
    with peer:
        peer.sendall(b"last bytes")
        peer.shutdown(socket.SHUT_WR)
        side = engine.Side(engine.Reactor(), ours.fileno())
        side.saw(events)
        assert side.read() == b"last bytes"
        ours.close()
        assert side.read() == b"" and side.error == 0


def test_an_error_pending_is_read_not_assumed(engine):
    """EPOLLERR with the FIN: the error is what a read says, not a clean EOF."""
    ours, peer = socket.socketpair()
    with peer, ours:
        peer.sendall(b"last bytes")
        peer.shutdown(socket.SHUT_WR)
        side = engine.Side(engine.Reactor(), ours.fileno())
        side.saw(engine.READABLE | select.EPOLLRDHUP | select.EPOLLERR)
        assert side.read() == b"last bytes"
        assert not side.ended
        assert side.read() == b""  # from the kernel: EOF here, since no error was really pending


def peers_accepted(engine, listening: socket.socket, connect) -> list:
    """The ``peer`` each connection gets from the twin's Listener: ``connect()`` makes
    them (and may end them) before the Listener accepts."""
    listening.listen()
    listening.setblocking(False)
    got: list = []

    def on_accept(fd: int, peer) -> None:
        got.append(peer)
        os.close(fd)

    listener = engine.Listener(engine.Reactor(), listening, on_accept)
    try:
        connect()
        listener.accept()
    finally:
        listener.close()
    return got


@pytest.mark.parametrize(
    "family, listen_on, connect_to, expected",
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", lambda port: ("127.0.0.1", port)),
        (socket.AF_INET6, "::1", "::1", lambda port: ("::1", port, 0, 0)),
        (socket.AF_INET6, "::", "127.0.0.1", lambda port: ("::ffff:127.0.0.1", port, 0, 0)),  # IPv4-mapped
    ],
)
@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_the_listener_passes_the_address_accept_gave(engine, family, listen_on, connect_to, expected, reset):
    """on_accept(fd, peer): socket.getpeername()'s tuple, from accept itself, so a client
    that reset before it was accepted still has its address (getpeername(2) says ENOTCONN)."""
    listening = socket.socket(family)
    if family == socket.AF_INET6:
        listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listening.bind((listen_on, 0))
    ports: list[int] = []

    def connect() -> None:
        client = socket.create_connection((connect_to, listening.getsockname()[1]), timeout=5)
        ports.append(client.getsockname()[1])
        if reset:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # before the accept: a FIN, or with SO_LINGER 0 a reset

    assert peers_accepted(engine, listening, connect) == [expected(ports[0])]


def test_a_unix_listener_passes_what_socket_accept_gives(engine, tmp_path):
    path = str(tmp_path / "socket")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    clients: list[socket.socket] = []

    def connect() -> None:
        clients.append(socket.socket(socket.AF_UNIX))
        clients[0].connect(path)

    try:
        assert peers_accepted(engine, listening, connect) == [""]  # unnamed, as socket.accept() says
    finally:
        clients[0].close()


# Accepts a queue of three with the twin's Listener, in a process of its own so that
# strace sees its accept4 calls.  argv: the module, "tcp" or "unix".
ACCEPT_THREE = """
import importlib, os, socket, sys, time
engine = importlib.import_module(sys.argv[1])
if sys.argv[2] == "tcp":
    listening = socket.create_server(("127.0.0.1", 0))
    address = listening.getsockname()
else:
    listening = socket.socket(socket.AF_UNIX)
    address = "\\0fastsni-accept-test-%d" % os.getpid()
    listening.bind(address)
    listening.listen()
listening.setblocking(False)
clients = [socket.socket(listening.family) for _ in range(3)]
for client in clients:
    client.connect(address)
got = []
listener = engine.Listener(engine.Reactor(), listening, lambda fd, peer: (got.append(fd), os.close(fd)))
for _ in range(500):  # a TCP handshake's last ACK may still be on its way: up to 5 s
    if sys.argv[2] != "tcp" or listener.waiting() == 3:
        break
    time.sleep(0.01)
listener.starved = True
listener.accept()
print(len(got), listener.counted, listener.starved)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
@pytest.mark.parametrize(
    "kind, calls, counted",
    [("tcp", 3, True), ("unix", 4, False)],  # a Unix listener's queue is unread: one accept finds none
)
def test_the_listener_accepts_what_the_queue_holds(twin, tmp_path, kind, calls, counted):
    """A TCP listener's queue length is read (TCP_INFO) before accepting, so no accept4
    comes back empty (EAGAIN: a socket and a file allocated for nothing); either way the
    queue is emptied and an out-of-descriptors episode is over."""
    module = "fastsni.engine" if twin.name == "pure" else "fastsni._engine"
    trace = tmp_path / "strace.txt"
    strace = ("strace", "-f", "-qq", "-e", "trace=accept4", "-o", str(trace))
    done = subprocess.run(
        [*strace, sys.executable, "-c", ACCEPT_THREE, module, kind],
        env=twin.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["3", str(counted), "False"]
    accepts = [line for line in trace.read_text().splitlines() if "accept4(" in line]
    assert len(accepts) == calls, accepts
    assert sum("EAGAIN" in line for line in accepts) == calls - 3, accepts
