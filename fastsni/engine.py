"""Descriptors, not transports: accepting, deadlines and the two-way relay (pure twin).

The event loop only says when a descriptor is ready (add_reader/add_writer); bytes
move with plain read(2) and write(2), so each line of an strace has one obvious
cause.  Both proxies share this module; ``pyx/_engine.pyx`` mirrors it function for
function with direct system calls.

- Listener: accepts in batches; out of descriptors, it stops accepting until a
  connection closes (or a second passes) instead of spinning.
- Relay: both directions at once, each reading only while the other side keeps up
  (at most one CHUNK waits per direction); EOF becomes shutdown(SHUT_WR) on the other
  side once everything before it is out; an error on either side closes both.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

CHUNK = 128 * 1024  # bytes per read(); also the most that waits unsent per direction
ACCEPT_BATCH = 64  # accepts per wakeup, so established connections keep flowing
RESUME_ACCEPT_AFTER = 1.0  # seconds out of descriptors before trying again anyway
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
RETRY = (BlockingIOError, InterruptedError)
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL


def connect_backend(name: str, leaf: str) -> tuple[int, bool]:
    """Connect to ``<name>/<leaf>`` under the current directory, looked up afresh.

    Returns the connected non-blocking descriptor and whether ``<name>/send-proxy-v1``
    exists (any file type, a dangling symlink too).  Raises OSError from open(),
    connect() or socket(); the caller maps its errno to an answer.  A path too long
    for sun_path is reached through the directory's descriptor in /proc, so every
    valid hostname works.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        path = f"{name}/{leaf}"
        if len(path) <= SUN_PATH_MAX:
            sock.connect(path)
            return sock.detach(), os.path.lexists(f"{name}/send-proxy-v1")
        dirfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dirfd}/{leaf}")
            try:
                os.stat("send-proxy-v1", dir_fd=dirfd, follow_symlinks=False)
                send_proxy = True
            except OSError:
                send_proxy = False
            return sock.detach(), send_proxy
        finally:
            os.close(dirfd)
    finally:
        sock.close()  # a no-op once detached


def shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR); errors are left for the next read or write to report."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


class Service:
    """One proxy process: its listener and the connections still open.

    ``start(service, fd)`` makes the object that serves an accepted connection; that
    object calls ``service.closed(itself)`` when it is done.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, start: Callable) -> None:
        self.loop = loop
        self.start = start
        self.live: set = set()
        self.listener = Listener(loop, sock, self.accepted)

    def accepted(self, fd: int) -> None:
        self.live.add(self.start(self, fd))

    def closed(self, connection) -> None:
        self.live.discard(connection)
        self.listener.descriptor_freed()


class Listener:
    """Accept from a listening socket; ``on_accept(fd)`` gets each non-blocking descriptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_accept: Callable) -> None:
        self.loop = loop
        self.sock = sock
        self.on_accept = on_accept
        self.accepting = False
        self.closed = False
        self.retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()  # the address is looked up only if needed
            except RETRY:
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self.pause()
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            conn.setblocking(False)
            self.on_accept(conn.detach())

    def pause(self) -> None:
        """Out of descriptors: stop until one is freed (descriptor_freed) or a second passes."""
        self.loop.remove_reader(self.sock.fileno())
        self.accepting = False
        self.retry = self.loop.call_later(RESUME_ACCEPT_AFTER, self.start)

    def descriptor_freed(self) -> None:
        if not self.accepting and not self.closed:
            self.retry.cancel()
            self.start()

    def close(self) -> None:
        """Stop accepting and close this process's copy of the listening socket."""
        if self.accepting:
            self.loop.remove_reader(self.sock.fileno())
        if self.retry is not None:
            self.retry.cancel()
        self.accepting = False
        self.closed = True
        self.sock.close()


class Flow:
    """One direction of a relay: read ``src``, write ``dst``."""

    def __init__(self, relay: Relay, src: int, dst: int) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.pending = b""  # read from src, not yet taken by dst
        self.eof = False  # src has sent everything

    def readable(self) -> None:
        try:
            data = os.read(self.src, CHUNK)
        except RETRY:
            return
        except OSError:
            self.relay.close()
            return
        if data:
            self.send(data)
            return
        self.eof = True
        self.relay.loop.remove_reader(self.src)
        self.finish()

    def send(self, data: bytes) -> None:
        """Write ``data`` to dst; what dst does not take yet waits, and src is not read meanwhile."""
        try:
            sent = os.write(self.dst, data)
        except RETRY:
            sent = 0
        except OSError:
            self.relay.close()
            return
        if sent < len(data):
            self.pending = data[sent:]
            loop = self.relay.loop
            if not self.eof:
                loop.remove_reader(self.src)
            loop.add_writer(self.dst, self.writable)

    def writable(self) -> None:
        try:
            sent = os.write(self.dst, self.pending)
        except RETRY:
            return
        except OSError:
            self.relay.close()
            return
        self.pending = self.pending[sent:]
        if self.pending:
            return
        loop = self.relay.loop
        loop.remove_writer(self.dst)
        if self.eof:
            self.finish()
        else:
            loop.add_reader(self.src, self.readable)

    def finish(self) -> None:
        """src sent EOF: once its bytes are out, shut dst's writing side; both done: close."""
        if self.pending:
            return  # writable() comes back here when they are out
        if self.relay.done():
            self.relay.close()
        else:
            shutdown_write(self.dst)


class Relay:
    """Join ``client`` and ``backend`` both ways; then close both and call ``on_close()``.

    ``to_backend`` and ``to_client`` are bytes already read from the other side (a
    ClientHello, a PROXY line); they go out before anything else.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: int,
        backend: int,
        to_backend: bytes,
        to_client: bytes,
        on_close: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.on_close = on_close
        self.closed = False
        self.upstream = Flow(self, client, backend)
        self.downstream = Flow(self, backend, client)
        loop.add_reader(client, self.upstream.readable)
        loop.add_reader(backend, self.downstream.readable)
        if to_backend:
            self.upstream.send(to_backend)
        if to_client and not self.closed:
            self.downstream.send(to_client)

    def done(self) -> bool:
        up, down = self.upstream, self.downstream
        return up.eof and down.eof and not up.pending and not down.pending

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        for fd in (self.client, self.backend):
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            os.close(fd)
        self.on_close()
