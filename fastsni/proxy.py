"""fastsni's connection: read the ClientHello, route by SNI, relay (pure twin).

This module is the specification; ``pyx/_proxy.pyx`` mirrors it function for function.
"""

from __future__ import annotations

import errno
import os

from fastsni.addresses import describe, of_descriptor, proxy_header
from fastsni.engine import (
    NO_BACKEND,
    Handler,
    Relay,
    Service,
    Side,
    connect_backend,
    failure,
    fair_share_counts,
)
from fastsni.logs import failures
from fastsni.tls import INTERNAL_ERROR, UNRECOGNIZED_NAME, USER_CANCELED, HelloError, HelloReader, alert

HELLO_TIMEOUT = 10.0  # seconds from accept to a complete ClientHello
BACKEND_SOCKET = "tls-socket"
# Failures that mean "nobody serves this name here" (RFC 6066 §3 unrecognized_name): no
# backend (absent, leading out of the tree, another owner's socket), or none listening.
ABSENT = NO_BACKEND | {errno.EACCES, errno.ECONNREFUSED}


# The counters of the SIGUSR1 line (fastsni.server): connections routed to a backend,
# closed by the client before naming one, and the fatal alerts sent, by description.
COUNTS = {"routed": 0, "closed_early": 0}
ALERTS: dict[int, int] = {}


def counts() -> dict:
    return {**COUNTS, **fair_share_counts(), "alerts": dict(ALERTS)}


def log(fd: int, name: str | None, reason: str) -> None:
    try:
        client = describe(of_descriptor(fd)[0])
    except OSError:
        client = "(gone)"
    failures.write(f"fastsni: {client} {name or '-'}: {reason}\n")


class TlsConnection(Handler):
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    REFUSED = alert(INTERNAL_ERROR)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, service: Service, fd: int) -> None:
        self.service = service
        self.fd = fd
        self.client = Side(service.reactor, fd)
        self.reader: HelloReader | None = HelloReader()
        self.name: str | None = None  # once routed
        service.reactor.add(fd, self)
        self.timer = service.reactor.call_later(HELLO_TIMEOUT, self.expire)

    def ready(self, fd: int, events: int) -> None:
        """Read what the client sent (edge-triggered: until the kernel has no more)."""
        client = self.client
        client.saw(events)
        while client.readable:
            data = client.read()
            if data is None:
                return
            if not data:  # closed (or reset) before the hello was complete: nothing to answer
                COUNTS["closed_early"] += 1
                self.close()
                return
            try:
                name = self.reader.feed(data)
            except HelloError as exc:
                self.fail(exc.alert, None, exc.reason)
                return
            if name is not None:
                self.route(name)
                return

    def route(self, name: str) -> None:
        """Connect to the backend for ``name``; the client may have sent more already
        (``client.readable``), which the Relay reads."""
        self.timer.cancel()
        try:
            fd, proxy, _ = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, failure(exc, BACKEND_SOCKET))
            return
        backend = Side(self.service.reactor, fd)
        backend.queued = bytes(self.reader.received)  # the hello goes first, untouched
        self.reader = None
        if proxy:  # in one write with the hello
            backend.queued = proxy_header(proxy, self.fd, self.service.family, name) + backend.queued
        COUNTS["routed"] += 1
        self.name = name
        Relay(self.service.reactor, self.client, backend, self.relay_closed, self.backend_failed)

    def expire(self) -> None:
        self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    def fail(self, code: int, name: str | None, reason: str) -> None:
        """Answer with one fatal alert, log one line, close."""
        ALERTS[code] = ALERTS.get(code, 0) + 1
        log(self.fd, name, reason)
        try:
            os.write(self.fd, alert(code))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.timer.cancel()
        self.reader = None
        self.service.reactor.close(self.fd)
        self.service.closed(self)

    def shed(self) -> bool:
        """Out of descriptors (engine.Service.shed): close now if no backend was named yet."""
        if self.reader is None:
            return False  # routed (or closed)
        self.close()
        return True

    def relay_closed(self) -> None:
        self.service.closed(self)

    def backend_failed(self, err: int) -> None:
        """The backend reset (or failed) while relaying: one line, then the relay closes."""
        log(self.fd, self.name, f"{BACKEND_SOCKET}: {errno.errorcode.get(err, err)} while relaying")

    def drain(self) -> None:
        """SIGHUP: nothing to do; a TLS stream has no request boundary to stop at."""
