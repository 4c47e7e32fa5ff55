"""The engine's reactor in process, over both twins."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest


@pytest.fixture
def engine(twin):
    return twin.module("fastsni.engine", "fastsni._engine")


class Recorder:
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


def test_a_failing_handler_does_not_strand_the_batch(engine, capfd):
    """Edge-triggered events come once: one handler's exception must not lose the others'."""
    loop = asyncio.new_event_loop()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        reactor = engine.Reactor(loop)
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
        loop.close()


def test_reactor_close_forgets_and_closes(engine):
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        reactor = engine.Reactor(loop)
        fd = os.dup(ours.fileno())
        reactor.add(fd, Recorder())
        reactor.want_write(fd)
        reactor.close(fd)
        assert fd not in reactor.handlers and fd not in reactor.writers
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        ours.close()
        theirs.close()
        loop.close()
