"""fastsni's connection: read the ClientHello, route by SNI, relay (pure twin).

This module is the specification; ``pyx/_proxy.pyx`` mirrors it function for function.
"""

from __future__ import annotations

import errno
import os
import time

from fastsni.addresses import describe, proxy_header
from fastsni.engine import (
    NO_BACKEND,
    Handler,
    Relay,
    Service,
    Side,
    Timer,
    cause,
    connect_backend,
    failure,
    fair_share_counts,
    local_of,
)
from fastsni.logs import failures
from fastsni.ownerlog import line, owner_log
from fastsni.tls import (
    INTERNAL_ERROR,
    MARK_ECH,
    MARK_GREASE,
    UNRECOGNIZED_NAME,
    USER_CANCELED,
    HelloError,
    HelloReader,
    alert,
)

HELLO_TIMEOUT = 10.0  # seconds from accept to a complete ClientHello
BACKEND_SOCKET = "tls-socket"
# Failures that mean "nobody serves this name here" (RFC 6066 §3 unrecognized_name): no
# backend (absent, leading out of the tree, another owner's socket), or none listening.
ABSENT = NO_BACKEND | {errno.EACCES, errno.ECONNREFUSED}
# A relay that ends with one of these from the backend ended normally: counted, not logged.
ENDINGS = frozenset((errno.EPIPE, errno.ECONNRESET))


# The counters of the SIGUSR1 line (fastsni.server): connections routed to a backend,
# closed by the client before naming one, ClientHellos offering ECH or GREASE, relays
# the backend ended with a reset, the fatal alerts sent, by description, and by cause
# ("alert_112_refused": fastsni.engine.cause, hello_cause).
COUNTS = {"routed": 0, "closed_early": 0, "hello_ech": 0, "hello_grease": 0, "relay_resets": 0}
ALERTS: dict[int, int] = {}
CAUSES: dict[str, int] = {}


def counts() -> dict:
    return {**COUNTS, **fair_share_counts(), "alerts": dict(ALERTS), "causes": dict(CAUSES)}


def hello_cause(exc: HelloError) -> str | None:
    """Why a hello named no routable host (alert 112): no_sni or invalid_name."""
    if exc.alert != UNRECOGNIZED_NAME:
        return None
    return "invalid_name" if exc.reason.startswith("invalid") else "no_sni"


def log(peer: tuple, name: str | None, reason: str) -> None:
    """One failure line about the connection from ``peer`` (its address, as accept gave it)."""
    failures.write(f"fastsni: {describe(peer)} {name or '-'}: {reason}\n")


def counted(code: int, why: str | None) -> None:
    """One more alert ``code``, and one more of its cause ``why`` (if any)."""
    ALERTS[code] = ALERTS.get(code, 0) + 1
    if why is not None:
        key = f"alert_{code}_{why}"
        CAUSES[key] = CAUSES.get(key, 0) + 1


def tell_owner(name: str, client: str, outcome: str, started: float, **fields) -> None:
    """One line to the owner's log of ``name``, if its entry has one (ownerlog)."""
    target = owner_log.target(name)
    if target >= 0:
        seconds = f"{time.monotonic() - started:.3f}"
        owner_log.send(target, line("fastsni", client, name, outcome, **fields, duration=seconds))


class TlsConnection(Handler):
    """An accepted client connection until its ClientHello names a backend; then a Relay."""

    REFUSED = alert(INTERNAL_ERROR)  # to a new connection over its source's fair share (engine.Service)

    def __init__(self, service: Service, fd: int, peer: tuple) -> None:
        self.service = service
        self.fd = fd
        self.peer = peer  # the client's address, as accept gave it: for log lines and PROXY headers
        self.client = Side(service.reactor, fd)
        self.reader: HelloReader | None = HelloReader()
        self.name: str | None = None  # once routed
        self.started = time.monotonic()  # for the owner's log
        self.owner_line = False  # routed to an entry with an owner's log: a line when the relay ends
        self.relay: Relay | None = None
        self.timer: Timer | None = None  # the hello's deadline, set once a read finds it incomplete
        service.reactor.add(fd, self)

    def ready(self, fd: int, events: int) -> None:
        """Read what the client sent (edge-triggered: until the kernel has no more)."""
        client = self.client
        client.saw(events)
        while client.readable:
            data = client.read()
            if data is None:
                break
            if not data:  # closed (or reset) before the hello was complete: nothing to answer
                COUNTS["closed_early"] += 1
                self.close()
                return
            try:
                name = self.reader.feed(data)
            except HelloError as exc:
                self.fail(exc.alert, None, exc.reason, hello_cause(exc))
                return
            if name is not None:
                self.route(name)
                return
        if self.timer is None:  # incomplete: the deadline holds however the rest trickles in
            self.timer = self.service.reactor.call_later(HELLO_TIMEOUT, self.expire)

    def route(self, name: str) -> None:
        """Connect to the backend for ``name``; the client may have sent more already
        (``client.readable``), which the Relay reads."""
        self.stop_timer()
        try:
            fd, proxy, _ = connect_backend(name, BACKEND_SOCKET)
        except OSError as exc:
            code = UNRECOGNIZED_NAME if exc.errno in ABSENT else INTERNAL_ERROR
            self.fail(code, name, failure(exc, BACKEND_SOCKET), cause(exc))
            return
        backend = Side(self.service.reactor, fd)
        backend.queued = bytes(self.reader.received)  # the hello goes first, untouched
        marks = self.reader.marks()
        if marks:
            COUNTS["hello_ech"] += marks & MARK_ECH
            COUNTS["hello_grease"] += (marks & MARK_GREASE) >> 1
        self.reader = None
        self.owner_line = owner_log.target(name) >= 0
        if proxy:  # in one write with the hello
            backend.queued = (
                proxy_header(proxy, self.peer, local_of(self.fd, self.service.family), name) + backend.queued
            )
        COUNTS["routed"] += 1
        self.name = name
        self.relay = Relay(self.service.reactor, self.client, backend, self.relay_closed, self.backend_failed)

    def expire(self) -> None:
        self.fail(USER_CANCELED, None, f"no ClientHello within {HELLO_TIMEOUT:g} s")

    def fail(self, code: int, name: str | None, reason: str, why: str | None = None) -> None:
        """Answer with one fatal alert, log one line (and one to the owner's log), close."""
        counted(code, why)
        client = describe(self.peer)
        failures.write(f"fastsni: {client} {name or '-'}: {reason}\n")
        if name is not None and why != "no_entry":
            tell_owner(name, client, f"alert_{code}", self.started, cause=why)
        try:
            os.write(self.fd, alert(code))
        except OSError:
            pass
        self.close()

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.stop_timer()
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
        relay, self.relay = self.relay, None  # it refers back to us: let both go now
        if self.owner_line:  # (no relay yet: it closed as it began)
            up, down = (relay.up, relay.down) if relay is not None else (None, None)
            tell_owner(self.name, describe(self.peer), "routed", self.started, up=up, down=down)
        self.service.closed(self)

    def backend_failed(self, err: int) -> None:
        """The backend failed while relaying: a reset or broken pipe is how relays end
        (counted); anything else gets one line.  Then the relay closes."""
        if err in ENDINGS:
            COUNTS["relay_resets"] += 1
            return
        log(self.peer, self.name, f"{BACKEND_SOCKET}: {errno.errorcode.get(err, err)} while relaying")

    def drain(self) -> None:
        """SIGHUP: nothing to do; a TLS stream has no request boundary to stop at."""
