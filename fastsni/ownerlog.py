"""An entry owner's own log: one datagram per connection (fastsni) or request (fasthttpdir).

If the entry serving a name holds ``log-socket`` (a Unix datagram socket its owner
binds, owned like the backend sockets: by the entry's owner or root), each outcome for
that name is sent to it as one line of text, ``key=value`` fields separated by single
spaces (values never hold a space), e.g.::

    time=2026-12-05T23:50:01.123Z proxy=fastsni client=192.0.2.7:53744 name=a.test
    outcome=routed up=517 down=4096 duration=0.012   (one line; docs/logs.md)

Looked up beneath the hosts tree as the backend sockets are (openat2 RESOLVE_BENEATH,
the owner rule), and remembered per name for at most FRESH seconds, so a name without a
log socket costs one lookup a second, not one per connection; with one, one sendto(2)
per line, never blocking: a full or absent receiver loses the line, which is counted.
Not hot (one call per connection or request): pure only, shared by both proxies.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from fastsni import engine
from fastsni.logs import timestamp

LEAF = "log-socket"
FRESH = 1.0  # seconds a lookup (found or not) is trusted
MAX_NAMES = 256  # names remembered at once; then all are forgotten (a wildcard serves any)
# Lines sent, and lost (receiver absent, not reading, refusing), since start.
COUNTS = {"owner_log_sent": 0, "owner_log_dropped": 0}


def counts() -> dict[str, int]:
    return dict(COUNTS)


def line(proxy: str, client: str, name: str, outcome: str, **fields) -> bytes:
    """One log line: time, proxy, client, name, outcome, then ``fields`` in order."""
    parts = [f"time={timestamp(time.time())}", f"proxy={proxy}", f"client={client}", f"name={name}"]
    parts.append(f"outcome={outcome}")
    parts.extend(f"{key}={value}" for key, value in fields.items() if value is not None)
    return (" ".join(parts) + "\n").encode("ascii")


class OwnerLog:
    """``target(name)``: the O_PATH descriptor of the log socket serving ``name``, or -1;
    ``send(fd, data)``: one datagram to it, dropped (and counted) if it cannot go now."""

    def __init__(self) -> None:
        self.enabled = False  # set by the server at start: lookups begin
        self.sock: socket.socket | None = None  # the one unbound datagram socket lines leave through
        self.found: dict[str, tuple[float, int]] = {}  # name -> (trusted until, descriptor or -1)

    def open(self) -> None:
        self.enabled = True

    def target(self, name: str) -> int:
        now = time.monotonic()
        known = self.found.get(name)
        if known is not None:
            if known[0] > now:
                return known[1]
            if known[1] >= 0:
                os.close(known[1])
        elif len(self.found) >= MAX_NAMES:
            self.forget()
        fd = lookup(name) if self.enabled else -1
        if fd >= 0 and self.sock is None:  # made when first needed (socket(2) of AF_UNIX, which
            # confinement allows), so a proxy no owner logs from holds no socket for it
            self.sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        self.found[name] = (now + FRESH, fd)
        return fd

    def forget(self) -> None:
        for _, fd in self.found.values():
            if fd >= 0:
                os.close(fd)
        self.found.clear()

    def send(self, fd: int, data: bytes) -> None:
        try:
            self.sock.sendto(data, socket.MSG_DONTWAIT, f"{engine.PROC_FD}{fd}")  # the very inode checked
        except OSError:  # EAGAIN (not reading), ECONNREFUSED (nobody bound), ...: never wait
            COUNTS["owner_log_dropped"] += 1
            return
        COUNTS["owner_log_sent"] += 1


def lookup(name: str) -> int:
    """``<entry>/log-socket`` for the entry serving ``name`` (exact, else its wildcard),
    beneath the tree, a socket that passes the backend sockets' owner rule
    (engine._check_owner): its O_PATH descriptor, or -1."""
    try:
        entry, status = engine._entry(name, LEAF)
        target = f"{entry}/{LEAF}"
        fd = engine.openat2(engine.HOSTS, target, os.O_PATH | os.O_CLOEXEC, engine.BENEATH)
    except OSError:
        return -1
    try:
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            engine._check_owner(fd, status.st_uid, target)  # ForeignSocket (an OSError) if not the owner's
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


owner_log = OwnerLog()
