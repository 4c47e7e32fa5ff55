"""Descriptors, not transports: accepting, readiness and the two-way relay (pure twin).

Both proxies share this module; ``pyx/_engine.pyx`` mirrors it function for function
with direct system calls.  Bytes move with plain read(2) and write(2), so every line
of an strace has one obvious cause:

- Listener: accepts what the listen queue holds (its length read first, so no
  accept(2) comes back empty), in batches; out of descriptors, it stops accepting until a
  connection closes (or a second passes) instead of spinning.  With several copies
  on one socket, a new connection wakes one of them (EPOLLEXCLUSIVE).
- Service: the open connections; under descriptor pressure, each source's fair share
  (see Service).
- Reactor: one edge-triggered epoll instance; each connection descriptor is added
  once (closing it removes it).  Writability is asked for only after a write fell
  short (one EPOLL_CTL_MOD, kept).  Edge-triggered means "read until the kernel has no
  more, write until it takes no more", which the Flow below does.  It is the process's
  only poller: one epoll_wait per wakeup for the listening socket, every connection,
  the timers and the signals.
- Relay: both directions at once, each reading only while the other side keeps up
  (at most a RELAY_CHUNK per direction in user space, or a PIPE_SIZE in a pipe); bulk data
  towards the backend goes by splice(2), uncopied, bulk data from it by read/write
  (SPLICE_DOWN); EOF becomes shutdown(SHUT_WR) on the other side once everything before
  it is out; an error on either side closes both.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import math
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

from fastsni.logs import failures

CHUNK = 128 * 1024  # bytes per read() of a hello or request head
RELAY_CHUNK = 256 * 1024  # bytes per read() of a relay; also the most that waits unsent per direction
PIPE_SIZE = 512 * 1024  # a splicing pipe's capacity and the most one splice moves (pipe-max-size: 1 MiB)
ACCEPT_BATCH = 64  # accepts per wakeup, so established connections keep flowing
# A TCP listener's accept queue length: struct tcp_info's tcpi_unacked, which a socket in
# TCP_LISTEN state reports as the connections ready for accept() (linux/tcp.h; the
# kernel's tcp_get_info).  Reading it (getsockopt, 0.6 us here) spares the accept(2)
# that finds the queue empty, which allocates a socket and a file before it fails with
# EAGAIN (3.8 us here: perf/lookup_cost.py).
TCP_LISTEN = 10  # include/net/tcp_states.h
TCPI_STATE, TCPI_UNACKED = 0, 24  # byte offsets in struct tcp_info
TCPI_READ = 32  # bytes of struct tcp_info read: up to tcpi_sacked
PUMP_ROUNDS = 8  # chunks one direction moves before letting others run
MAX_EVENTS = 256  # epoll events taken per wakeup
RESUME_ACCEPT_AFTER = 1.0  # seconds out of descriptors before trying again anyway
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
RETRY = (BlockingIOError, InterruptedError)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Splice nothing from the backend to the client.  The backend is a Unix socket: splice
# from AF_UNIX copies each skb's linear head into the pipe anyway, and splice on into TCP
# turns every pipe buffer into one skb fragment, so loopback TCP carries more, smaller
# skbs (17 fragments each) than a plain write of the same bytes builds.  perf/bench.py's
# C and Cb rows: copying through RELAY_CHUNK (256 KiB) costs 0.7-0.8 x the splice's proxy
# CPU per GB, through 128 KiB 0.9 x (perf/README.md).  Towards the backend, splicing stays.
SPLICE_DOWN = False

READABLE = select.EPOLLIN
WRITABLE = select.EPOLLOUT
CLOSING = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # read to learn what it is
SHUT = select.EPOLLRDHUP  # the peer shut its writing side: after its last bytes, EOF...
FAILED = select.EPOLLERR  # ...unless an error is pending, which only a read can tell
EDGE = READABLE | select.EPOLLRDHUP | select.EPOLLET  # writability only once a write fell short
# Level-triggered (a batch cut short comes back) and exclusive: when several copies share
# the socket, a new connection wakes one copy blocked in epoll_wait, not all (Linux 4.5,
# epoll_ctl(2)).  EPOLLEXCLUSIVE is refused by EPOLL_CTL_MOD: the listener is only ever
# added and removed.
LISTENING = READABLE | select.EPOLLEXCLUSIVE


# The counters of the SIGUSR1 line (fastsni.server): plain integers, no system call.
# "up" is what the relays wrote towards backends, "down" towards clients; "_spliced" the
# part of it that went by splice(2).
COUNTS = {"accepted": 0, "up": 0, "down": 0, "up_spliced": 0, "down_spliced": 0}
# Connections refused at accept for holding a source's fair share already, and unrouted
# ones closed when accept found no descriptor (see Service); each proxy's counts() adds them.
FAIR = {"refused_fair_share": 0, "shed_fair_share": 0}


def counts() -> dict[str, int]:
    """This process's connections accepted and bytes relayed so far."""
    return dict(COUNTS)


def fair_share_counts() -> dict[str, int]:
    return dict(FAIR)


# Fair share under descriptor pressure (Service): nothing is tracked while fewer than half
# of RLIMIT_NOFILE's descriptors are in use; above that, until fewer than a quarter are,
# a source (an IPv4 address, an IPv6 /64) holding max(FAIR_SHARE_FLOOR, limit / (2 x
# (sources + 1))) connections gets no more: the limit's half shared by the sources that
# hold connections and one more that may come.
FAIR_SHARE_FLOOR = 8
SHED_BATCH = 16  # unrouted connections closed, at most, each time accept finds no descriptor
SHED_SOURCES = 4  # the heaviest sources whose unrouted connections may be closed, heaviest first
V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d


PROXY_MARKERS = ((2, "send-proxy-v2"), (1, "send-proxy-v1"))  # in this order: v2 wins over v1
# An entry's markers are looked up again when its socket, its lstat (a switched link, a
# directory whose files changed) or MARKERS_FRESH seconds say they may have changed.
MARKERS_FRESH = 1.0
MARKERS_KEPT = 256  # entries remembered at once; then all are forgotten (a wildcard serves any)

# The hosts tree is the working directory at start, held as an O_PATH descriptor
# (open_hosts); every path a connection names is resolved beneath it with openat2(2)
# (Linux 5.6), so no symlink and no ".." leads a connection out of the tree, however
# the proxy was started.
SYS_OPENAT2 = 437  # one number on every architecture (asm-generic/unistd.h)
RESOLVE_NO_MAGICLINKS = 0x02  # linux/openat2.h
RESOLVE_BENEATH = 0x08
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
OPENAT2_RETRIES = 8  # EAGAIN: a rename raced a ".." in the walk (openat2(2)); try again
# Why connect_backend found no backend: nothing there, a path that leads out of the tree
# (EXDEV: RESOLVE_BENEATH; ELOOP: too many links, or a magic link), a foreign socket (EPERM).
NO_BACKEND = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EXDEV, errno.ELOOP, errno.EPERM))
HOSTS = -1  # the O_PATH descriptor of the hosts directory, once open_hosts() ran
PROC_FD = "/proc/self/fd/"  # where a descriptor's file is named; "" once enter_proc_fd() ran


class ForeignSocket(PermissionError):
    """The socket an entry leads to belongs neither to the entry's owner nor to root."""

    def __init__(self, entry_uid: int, socket_uid: int, filename: str) -> None:
        super().__init__(errno.EPERM, "socket owned by another user", filename)
        self.entry_uid = entry_uid
        self.socket_uid = socket_uid


def open_hosts() -> int:
    """Hold the working directory as the hosts tree; check that openat2(2) and
    /proc/self/fd work.  Returns the descriptor; OSError says what is missing."""
    global HOSTS
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.close(openat2(fd, ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, BENEATH))
        except OSError as exc:
            exc.filename = "openat2(2)"  # the kernel's answer, not the directory's
            raise
        os.stat(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    HOSTS = fd
    return fd


def enter_proc_fd() -> None:
    """Make /proc/self/fd the working directory, once the hosts tree is held by its
    descriptor (open_hosts) and nothing is named from the start directory any more: a
    socket file is then connected through "N", one name for the kernel to walk, not
    "/proc/self/fd/N", four (perf/lookup_cost.py: 1.6 us less per connection)."""
    global PROC_FD
    os.chdir("/proc/self/fd")
    PROC_FD = ""


# openat2 for the pure twin, through ctypes (glibc has no wrapper): set up at import, so
# no module is loaded after start; the compiled twin makes the system call itself.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) with ``struct open_how {flags, mode 0, resolve}``; the descriptor, or OSError."""
    how = flags.to_bytes(8, "little") + bytes(8) + resolve.to_bytes(8, "little")
    encoded = path.encode("ascii")
    for _ in range(OPENAT2_RETRIES):
        fd = _libc.syscall(SYS_OPENAT2, dirfd, encoded, how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    raise OSError(err, os.strerror(err), path)


def connect_backend(name: str, leaf: str) -> tuple[int, int, tuple[int, int]]:
    """Connect to ``<name>/<leaf>`` beneath the hosts tree, looked up afresh; if no entry
    ``<name>`` exists, to ``*.<rest>/<leaf>``, the one-label wildcard entry.

    Only the entry owner's socket is connected to: the socket file must belong to the
    owner of the entry (its lstat, a symlink's own owner) or to root, and an entry of
    root's may use any socket.  Returns the connected non-blocking descriptor, the
    PROXY protocol version the entry asks for (see _markers_of) and the socket file's
    identity (st_dev, st_ino: see socket_identity).  Raises OSError, its
    ``filename`` ``<entry>/<leaf>``: from lstat, openat2 (EXDEV: the path leads out of
    the tree), connect() or socket(), or ForeignSocket; the caller maps its errno to an
    answer.
    """
    entry, status = _entry(name, leaf)
    target = f"{entry}/{leaf}"
    path = openat2(HOSTS, target, os.O_PATH | os.O_CLOEXEC, BENEATH)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        try:
            identity = _check_owner(path, status.st_uid, target)
            sock.connect(f"{PROC_FD}{path}")  # the very inode checked
        except OSError as exc:
            exc.filename = target
            raise
        finally:
            os.close(path)
        return sock.detach(), _markers_of(entry, status, identity), identity
    finally:
        sock.close()  # a no-op once detached


def socket_identity(name: str, leaf: str) -> tuple[int, int] | None:
    """What connect_backend would connect ``name`` to now, without connecting: the socket
    file's (st_dev, st_ino), found and checked as connect_backend does; None if it would
    find none.  A kept-alive backend connection whose identity is no longer this one was
    made before a switch (a new target, a restarted backend).  OSError if the lookup
    itself failed for want of a descriptor (OUT_OF_DESCRIPTORS): no answer then."""
    try:
        entry, status = _entry(name, leaf)
        target = f"{entry}/{leaf}"
        path = openat2(HOSTS, target, os.O_PATH | os.O_CLOEXEC, BENEATH)
    except OSError as exc:
        if exc.errno in OUT_OF_DESCRIPTORS:
            raise
        return None
    try:
        return _check_owner(path, status.st_uid, target)
    except OSError:
        return None
    finally:
        os.close(path)


def wildcard_of(name: str) -> str | None:
    """The one-label wildcard entry for ``name`` (``a.example.com`` -> ``*.example.com``,
    as a wildcard certificate matches, RFC 6125 §6.4.3); None for a one-label name."""
    dot = name.find(".")
    return None if dot < 0 else "*" + name[dot:]


def _entry(name: str, leaf: str) -> tuple[str, os.stat_result]:
    """The entry that serves ``name`` and its lstat (``st_uid``: its owner): ``<name>`` if
    the hosts directory lists it (any kind, even a dangling symlink: a specific name is
    never served by ``*.`` by accident), else its wildcard entry."""
    try:
        return name, os.stat(name, dir_fd=HOSTS, follow_symlinks=False)
    except OSError as exc:
        wildcard = wildcard_of(name)
        if exc.errno != errno.ENOENT or wildcard is None:
            exc.filename = f"{name}/{leaf}"
            exc.no_entry = exc.errno == errno.ENOENT
            raise
    try:
        return wildcard, os.stat(wildcard, dir_fd=HOSTS, follow_symlinks=False)
    except OSError as exc:
        exc.filename = f"{wildcard}/{leaf}"
        exc.no_entry = exc.errno == errno.ENOENT  # neither the name nor its wildcard: see cause()
        raise


def _check_owner(path: int, owner: int, target: str) -> tuple[int, int]:
    """ForeignSocket unless the socket file ``path`` is the entry owner's or root's, or
    the entry is root's; its (st_dev, st_ino) if it passes."""
    status = os.fstat(path)
    socket_owner = status.st_uid
    if owner != 0 and socket_owner != 0 and socket_owner != owner:
        raise ForeignSocket(owner, socket_owner, target)
    return status.st_dev, status.st_ino


def exists_beside(failed: OSError, leaf: str) -> bool:
    """Whether ``leaf`` exists beneath the tree in the entry where connect_backend
    failed: the exact entry, or the wildcard that stood in for it."""
    directory = os.path.dirname(failed.filename or "")
    if not directory:
        return False
    try:
        os.close(openat2(HOSTS, f"{directory}/{leaf}", os.O_PATH | os.O_CLOEXEC, BENEATH))
    except OSError:
        return False
    return True


_markers: dict[str, tuple[tuple[int, int, int, int], int, float]] = {}  # entry -> (stamp, version, until)


def _markers_of(entry: str, status: os.stat_result, identity: tuple[int, int]) -> int:
    """_proxy_version(entry), remembered while nothing says it may have changed: the same
    socket file (``identity``), the same lstat of the entry (a link switched by rename is a
    new inode; a file made or removed in an entry directory changes its ctime) and at most
    MARKERS_FRESH seconds.  A switch to a release brings that release's markers at once;
    a marker added beside a running socket counts within a second."""
    now = time.monotonic()
    stamp = (identity[0], identity[1], status.st_ino, status.st_ctime_ns)
    known = _markers.get(entry)
    if known is not None and known[0] == stamp and known[2] > now:
        return known[1]
    if known is None and len(_markers) >= MARKERS_KEPT:
        _markers.clear()
    version = _proxy_version(entry)
    _markers[entry] = (stamp, version, now + MARKERS_FRESH)
    return version


def _proxy_version(entry: str) -> int:
    """2 if ``<entry>/send-proxy-v2`` exists beneath the tree (any file type, a dangling
    symlink too), else 1 if ``send-proxy-v1`` does, else 0: one openat2 for an absent
    marker, one and a close for a present one."""
    for version, marker in PROXY_MARKERS:
        try:
            os.close(openat2(HOSTS, f"{entry}/{marker}", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, BENEATH))
            return version
        except OSError:
            pass
    return 0


# What each cause() means for the operator, in a few words, with what to do.
HINTS = {
    "no_entry": "no entry for this name, nor a wildcard entry: nobody serves it here",
    "no_socket": "no socket there: start the backend (fastsni-check NAME says more)",
    "denied": "the proxy's user may not connect: see fastsni-check --user USER NAME",
    "refused": "nobody listens on the socket (stale): start the backend",
    "error": "not a stream socket the proxy can connect to: see fastsni-check NAME",
}


def cause(exc: OSError) -> str:
    """Why connect_backend failed, in one word, for counters and owners' logs: no_entry,
    no_socket, denied (EACCES), refused (ECONNREFUSED), outside_tree (EXDEV, ELOOP),
    not_owner (another owner's socket), error (anything else, e.g. a datagram socket)."""
    if isinstance(exc, ForeignSocket):
        return "not_owner"
    err = exc.errno
    if err == errno.ENOENT or err == errno.ENOTDIR:
        return "no_entry" if getattr(exc, "no_entry", False) else "no_socket"
    if err == errno.EACCES:
        return "denied"
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.EXDEV or err == errno.ELOOP:
        return "outside_tree"
    return "error"


def failure(exc: OSError, leaf: str) -> str:
    """How connect_backend failed, for a log line: the path tried (the wildcard's, if it
    stood in), the errno, and what it means and what to do; or what the isolation
    refused and why."""
    if isinstance(exc, ForeignSocket):
        return (
            f"{exc.filename}: socket owned by uid {exc.socket_uid}, not by the entry's owner "
            f"uid {exc.entry_uid}: not served; the owner must bind it"
        )
    if exc.errno == errno.EXDEV:
        return (
            f"{exc.filename}: leads out of the hosts tree (EXDEV): not followed; keep links inside the tree"
        )
    if exc.errno == errno.ELOOP:
        return f"{exc.filename}: too many symbolic links, or one into /proc (ELOOP): not followed"
    return f"{exc.filename or leaf}: {errno_name(exc)}: {HINTS[cause(exc)]}"


def errno_name(exc: OSError) -> str:
    """ENOENT, ECONNREFUSED, ...: how connect_backend failed, for log lines."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def peer_of(fd: int, family: int) -> tuple:
    """The peer address of a connected socket descriptor of ``family``, as
    socket.getpeername() gives it: what Listener passes with each connection, for a
    descriptor from elsewhere."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        return sock.getpeername()
    finally:
        sock.detach()


def local_of(fd: int, family: int) -> tuple:
    """Our end of a connected socket descriptor of ``family``, as socket.getsockname()
    gives it: the server address of a PROXY header."""
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        return sock.getsockname()
    finally:
        sock.detach()


def source_of(peer: tuple | None, family: int) -> bytes | None:
    """Whom a connection from ``peer`` (its address, as accept gave it, on a socket of
    ``family``) counts against under pressure: its IPv4 address (4 bytes), or its IPv6
    address's /64 (8 bytes; an IPv4-mapped address counts as its IPv4 one); None for no
    address or another family (a Unix socket)."""
    if peer is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    if family == socket.AF_INET:
        return socket.inet_aton(peer[0])
    packed = socket.inet_pton(socket.AF_INET6, peer[0].partition("%")[0])
    if packed[:12] == V4_MAPPED:
        return packed[12:]
    return packed[:8]


def source_text(source: bytes) -> str:
    """A source for a log line: ``192.0.2.1`` or ``2001:db8:1:2::/64``."""
    if len(source) == 4:
        return socket.inet_ntoa(source)
    return socket.inet_ntop(socket.AF_INET6, source + bytes(8)) + "/64"


def refusing(in_use: int, limit: int, share: int, source: bytes, held: int, below: int) -> None:
    """The pressure episode's line about refusals (the first one only)."""
    failures.write(
        f"{failures.program}: fair share: {in_use} of {limit} descriptors (RLIMIT_NOFILE) in use; new "
        f"connections from a source holding {share} or more are refused until fewer than {below} are in use "
        f"(first {source_text(source)}, holding {held})\n"
    )


def shedding(count: int, source: bytes, held: int) -> None:
    """The pressure episode's line about unrouted connections closed (the first time only)."""
    failures.write(
        f"{failures.program}: fair share: out of descriptors: closed {count} unrouted connections of "
        f"{source_text(source)} (holding {held}), oldest first, to admit others\n"
    )


def shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR); errors are left for the next read or write to report."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def ignore_signal(signum: int, frame) -> None:
    """Python's handler for a signal the Reactor handles: the C-level handler has
    already written the signal's number to the wakeup pipe, the loop does the rest."""


def internal_error(what: str, exc: Exception) -> None:
    """Log an unexpected exception the loop goes on after."""
    failures.write(f"{failures.program}: {what} after an internal error: {exc!r}\n")


def out_of_descriptors(err: int) -> None:
    """Log that accepting paused: once per episode (see Listener.starved), with what to do."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    failures.write(
        f"{failures.program}: accept: {errno.errorcode.get(err, str(err))}: out of descriptors at "
        f"RLIMIT_NOFILE {soft}; open connections go on and accepting resumes as they close; raise the limit "
        "(systemd: LimitNOFILE=; system-wide: fs.file-max) for more at once\n"
    )


def abandon(handler, exc: Exception) -> None:
    """A connection's handler failed unexpectedly (e.g. epoll_ctl ENOSPC): log, close it."""
    internal_error("closing a connection", exc)
    try:
        handler.close()
    except Exception:
        pass


class Timer:
    """``callback(*args)`` at ``when`` (time.monotonic()) unless cancelled first."""

    __slots__ = ("when", "callback", "args")

    def __init__(self, when: float, callback: Callable, args: tuple) -> None:
        self.when = when
        self.callback: Callable | None = callback
        self.args = args

    def cancel(self) -> None:
        """Drop the callback (and what it holds) now; the entry leaves its queue later."""
        self.callback = None
        self.args = ()

    def fire(self) -> None:
        callback, args = self.callback, self.args
        if callback is not None:
            self.cancel()
            callback(*args)


class Handler:
    """What the Reactor hands a ready descriptor to: ``ready(fd, events)``.  Every
    connection object derives from it, so the compiled Reactor calls it as a C method."""

    __slots__ = ()

    def ready(self, fd: int, events: int) -> None:
        raise NotImplementedError


class Side:
    """One end of a connection: its descriptor, the bytes a short write left for later,
    and what epoll said of it.  Edge-triggered, so ``readable`` holds from an event until
    a read finds the kernel has no more, and ``writable`` until a write falls short.

    Both proxies' connections and the Relay read and write only through it.
    """

    __slots__ = ("reactor", "fd", "queued", "readable", "closing", "shut", "ended", "writable", "error")

    def __init__(self, reactor: Reactor, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.queued = b""  # bytes for this side that it did not take yet
        self.readable = False  # may have bytes to read
        self.closing = False  # reported hang-up or error: read until it says which
        self.shut = False  # reported that the peer shut its writing side, and no error
        self.ended = False  # shut, and a short read took the last bytes: EOF is next
        self.writable = True  # may take bytes
        self.error = 0  # errno of the read or write that failed

    def saw(self, events: int) -> None:
        """Note what one epoll event says of this side."""
        if events & (READABLE | CLOSING):
            self.readable = True
            if events & CLOSING:
                self.closing = True
                self.shut = (self.shut or bool(events & SHUT)) and not events & FAILED
        if events & (WRITABLE | CLOSING):
            self.writable = True

    def read(self, size: int = CHUNK) -> bytes | None:
        """Up to ``size`` bytes; b"" at EOF or on an error (its errno in ``error``); None
        if there are none now.  A short read clears ``readable`` too, unless the side is
        closing: bytes that come later bring a new edge.  A short read after the peer shut
        its side (a FIN: everything it sent was queued before it) took the last bytes, so
        the EOF after them costs no read(2)."""
        if self.ended:
            return b""
        try:
            data = os.read(self.fd, size)
        except RETRY:
            self.readable = False
            return None
        except OSError as exc:
            self.error = exc.errno
            return b""
        if len(data) < size:
            if not self.closing:
                self.readable = False
            elif self.shut and data:
                self.ended = True
        return data

    def send(self, data: bytes) -> int:
        """Write ``data`` after what is queued; what the kernel does not take now is
        queued.  Returns the bytes written now, or -1 if the write failed (see write)."""
        if self.queued or not self.writable:
            self.queued += data
            return 0
        return self.write(data)

    def flush(self) -> int:
        """Write what is queued: the bytes written, or -1 (see write)."""
        data = self.queued
        self.queued = b""
        return self.write(data) if data else 0

    def write(self, data: bytes) -> int:
        """write(2) ``data`` if the side may take it; queue the rest and ask for EPOLLOUT.
        Returns the bytes written, or -1 with the errno in ``error`` (nothing queued)."""
        sent = 0
        if self.writable:
            try:
                sent = os.write(self.fd, data)
            except RETRY:
                pass
            except OSError as exc:
                self.error = exc.errno
                return -1
        if sent < len(data):
            self.queued = data[sent:]
            self.wait_writable()
        return sent

    def wait_writable(self) -> None:
        """It took less than it was given: go on at the next EPOLLOUT edge."""
        self.writable = False
        self.reactor.want_write(self.fd)


class Reactor(Handler):
    """Edge-triggered readiness for connection descriptors: ``handler.ready(fd, events)``.

    It is the process's event loop, with the few loop methods the server uses: time,
    call_later, add_signal_handler, run_forever and stop.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.writers: set[int] = set()  # descriptors also watched for EPOLLOUT
        self.again: list[Flow] = []  # flows that yielded to others mid-work
        self.timers: dict[float, deque[Timer]] = {}  # one FIFO per delay: each is in order
        self.earliest = math.inf  # when the first timer is due (or a cancelled one was): see run_timers
        self.signals: dict[int, tuple[Callable, tuple]] = {}
        self.wakeup = -1  # read end of the pipe signal numbers arrive on
        self.stopping = False

    def add(self, fd: int, handler: Handler, events: int = EDGE) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` without closing it."""
        self.epoll.unregister(fd)
        del self.handlers[fd]
        self.writers.discard(fd)

    def want_write(self, fd: int) -> None:
        """A write to ``fd`` fell short: report when it can take more."""
        if fd not in self.writers:
            self.writers.add(fd)
            self.epoll.modify(fd, EDGE | WRITABLE)

    def close(self, fd: int) -> None:
        """Forget ``fd`` and close it (which removes it from the epoll set)."""
        del self.handlers[fd]
        self.writers.discard(fd)
        os.close(fd)

    def dispatch(self, timeout: float = 0) -> None:
        """Wait up to ``timeout`` seconds (-1: until an event) and hand out the events."""
        handlers = self.handlers
        for fd, events in self.epoll.poll(timeout, MAX_EVENTS):
            handler = handlers.get(fd)
            if handler is not None:  # closed by an earlier event of this batch
                try:
                    handler.ready(fd, events)
                except Exception as exc:  # never strand the rest of the batch (edge-triggered)
                    abandon(handler, exc)

    def later(self, flow: Flow) -> None:
        """Run ``flow.pump()`` again once the other ready descriptors had their turn."""
        self.again.append(flow)

    def run_again(self) -> None:
        flows, self.again = self.again, []
        for flow in flows:
            if not flow.relay.closed:
                flow.pump()

    def time(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        """``callback(*args)`` in ``delay`` seconds; ``.cancel()`` on the result stops it.

        Timers of one delay are due in the order they are set, so a FIFO per delay
        keeps them sorted: no heap, and a few delays in all (hello, retry, drain)."""
        timer = Timer(self.time() + delay, callback, args)
        fifo = self.timers.get(delay)
        if fifo is None:
            fifo = self.timers[delay] = deque()
        while fifo and fifo[0].callback is None:  # cancelled ones at the head go now
            fifo.popleft()
        fifo.append(timer)
        if timer.when < self.earliest:
            self.earliest = timer.when
        return timer

    def next_timeout(self) -> float:
        """Seconds epoll_wait may block: 0 while flows wait their turn, else until
        ``earliest``, or -1 (no timer).  No scan per wakeup: a timer cancelled since
        run_timers last looked wakes the loop once for nothing, when it would have been due."""
        if self.again:
            return 0.0
        if self.earliest == math.inf:
            return -1.0
        return max(0.0, self.earliest - self.time())

    def run_timers(self) -> None:
        """Fire the timers that are due, oldest first within each delay; then find the
        earliest one left, dropping cancelled ones at the FIFOs' heads."""
        now = self.time()
        if now < self.earliest:
            return
        for fifo in list(self.timers.values()):  # a callback may add a delay
            while fifo and fifo[0].when <= now:
                try:
                    fifo.popleft().fire()
                except Exception as exc:
                    internal_error("continuing", exc)
        earliest = math.inf
        for fifo in self.timers.values():
            while fifo and fifo[0].callback is None:
                fifo.popleft()
            if fifo and fifo[0].when < earliest:
                earliest = fifo[0].when
        self.earliest = earliest

    def add_signal_handler(self, signum: int, callback: Callable, *args) -> None:
        """``callback(*args)`` from the loop when ``signum`` arrives (as asyncio does it:
        the signal's number comes through a pipe in the epoll set, so it wakes epoll_wait)."""
        if self.wakeup < 0:
            self.wakeup, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self.add(self.wakeup, self, READABLE)  # level-triggered: one read per wakeup
        self.signals[signum] = (callback, args)
        signal.signal(signum, ignore_signal)

    def ready(self, fd: int, events: int) -> None:
        """The wakeup pipe: run the handler of each signal that arrived."""
        try:
            numbers = os.read(fd, 256)
        except RETRY:
            return
        for signum in numbers:
            handler = self.signals.get(signum)
            if handler is not None:
                handler[0](*handler[1])

    def run_forever(self) -> None:
        """Standalone: one epoll_wait per wakeup for every descriptor, timer and signal,
        then the due timers and the flows that yielded; until stop()."""
        while not self.stopping:
            self.dispatch(self.next_timeout())
            self.run_timers()
            if self.again:
                self.run_again()
        self.stopping = False

    def stop(self) -> None:
        """Make run_forever return after this wakeup (at once if it is not running)."""
        self.stopping = True


class Service:
    """One proxy process: its listener, its reactor and the connections still open.

    ``start(service, fd, peer)`` makes the Handler that serves an accepted connection
    (``peer``: the client's address, as accept gave it), registered with the reactor;
    its ``ready(fd, READABLE)`` is then called at once (the client speaks first).  It
    calls ``service.closed(itself)`` when it is done, and has ``fd`` (the client's),
    ``peer`` and ``shed()`` (close now if still unrouted: True if it did).  Its class's
    ``REFUSED`` bytes, if any, are written to a connection refused its fair share.

    Fair share: while fewer than half of RLIMIT_NOFILE's descriptors are in use (the
    reactor's), nothing is tracked.  Beyond that ("pressure", until fewer than a quarter
    are) every open connection is counted against its source once (source_of its
    ``peer``: no system call), and so is each new one; a new connection from a source
    that holds its share already (fair_share) is refused at once.  When accept finds no
    descriptor at all, the heaviest sources' unrouted connections are closed, oldest
    first (shed).  Only sources with open connections are in the table, and only under
    pressure.
    """

    def __init__(self, sock: socket.socket, start: Callable) -> None:
        self.start = start
        self.family = sock.family  # of every accepted connection too
        self.live: dict = {}  # the open connections, oldest first (the values are unused)
        self.reactor = Reactor()
        self.listener = Listener(self.reactor, sock, self.accepted, self.shed)
        self.refusal: bytes = getattr(start, "REFUSED", b"")
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the server raised it already
        self.pressure_above = self.limit // 2
        self.pressure_below = self.limit // 4
        self.sources: dict[bytes, int] | None = None  # connections per source, under pressure
        self.owners: dict = {}  # connection -> its source, under pressure, oldest first
        self.refusing_logged = False  # this episode's lines
        self.shedding_logged = False

    def accepted(self, fd: int, peer: tuple) -> None:
        COUNTS["accepted"] += 1
        if self.sources is None and len(self.reactor.handlers) >= self.pressure_above:
            self.enter_pressure()
        source = None
        if self.sources is not None:
            source = source_of(peer, self.family)
            if source is not None:
                held = self.sources.get(source, 0)
                share = self.fair_share()
                if held >= share:
                    self.refuse(fd, source, held, share)
                    return
        connection = self.start(self, fd, peer)
        self.live[connection] = None
        if source is not None:
            self.sources[source] = self.sources.get(source, 0) + 1
            self.owners[connection] = source
        # The client speaks first (its ClientHello, its request), and its first bytes are
        # usually here by the time accept(2) returns: read them now, not after a wakeup.
        connection.ready(fd, READABLE)

    def fair_share(self) -> int:
        """Connections a source may hold under pressure."""
        return max(FAIR_SHARE_FLOOR, self.limit // (2 * (len(self.sources) + 1)))

    def enter_pressure(self) -> None:
        """Count every open connection against its source, oldest first."""
        sources: dict[bytes, int] = {}
        owners: dict = {}
        for connection in self.live:
            source = source_of(getattr(connection, "peer", None), self.family)
            if source is not None:
                sources[source] = sources.get(source, 0) + 1
                owners[connection] = source
        self.sources = sources
        self.owners = owners

    def leave_pressure(self) -> None:
        self.sources = None
        self.owners = {}
        self.refusing_logged = self.shedding_logged = False

    def refuse(self, fd: int, source: bytes, held: int, share: int) -> None:
        """Refuse a new connection of a source over its share: the proxy's REFUSED, close."""
        FAIR["refused_fair_share"] += 1
        if not self.refusing_logged:
            self.refusing_logged = True
            refusing(len(self.reactor.handlers), self.limit, share, source, held, self.pressure_below)
        if self.refusal:
            try:
                os.write(fd, self.refusal)
            except OSError:
                pass
        os.close(fd)

    def shed(self) -> None:
        """Accept found no descriptor: close the unrouted connections (hello or request head
        incomplete) of the heaviest source that has some, among the SHED_SOURCES heaviest
        holding more than FAIR_SHARE_FLOOR, oldest first, SHED_BATCH at most, so that
        others get in (a new one from a source over its share is refused).  Sources that
        hold no more than the floor are never shed."""
        if self.sources is None:
            self.enter_pressure()
        sources = self.sources
        heaviest = sorted(sources, key=sources.__getitem__, reverse=True)[:SHED_SOURCES]
        heaviest = [source for source in heaviest if sources[source] > FAIR_SHARE_FLOOR]
        candidates = list(self.owners.items())
        count = 0
        for source in heaviest:
            held = sources.get(source, 0)
            for connection, owner in candidates:
                if owner == source and connection.shed():
                    count += 1
                    if count == SHED_BATCH or self.sources is None:
                        break
            if count:
                FAIR["shed_fair_share"] += count
                if not self.shedding_logged and self.sources is not None:
                    self.shedding_logged = True
                    shedding(count, source, held)
                return

    def closed(self, connection) -> None:
        self.live.pop(connection, None)
        if self.sources is not None:
            self.released(connection)
        self.listener.descriptor_freed()

    def released(self, connection) -> None:
        """Under pressure: ``connection`` no longer counts; below a quarter, pressure ends."""
        source = self.owners.pop(connection, None)
        if source is not None:
            held = self.sources[source] - 1
            if held:
                self.sources[source] = held
            else:
                del self.sources[source]
        if len(self.reactor.handlers) < self.pressure_below:
            self.leave_pressure()


class Listener(Handler):
    """Accept from a listening socket; ``on_accept(fd, peer)`` gets each non-blocking
    descriptor and its peer's address as accept(2) returned it (socket.accept()'s tuple:
    no getpeername(2) later, and a client that has reset since still has one), and
    ``on_full()`` (if given) is called when accept found no descriptor."""

    def __init__(
        self, reactor: Reactor, sock: socket.socket, on_accept: Callable, on_full: Callable | None = None
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.on_accept = on_accept
        self.on_full = on_full
        self.accepting = False
        self.closed = False
        self.retry: Timer | None = None
        self.starved = False  # out of descriptors since the accept queue was last emptied
        self.counted = self.waiting() >= 0  # a TCP listener: its queue can be read

    def start(self) -> None:
        if not self.accepting and not self.closed:
            self.accepting = True
            self.reactor.add(self.fd, self, LISTENING)

    def ready(self, fd: int, events: int) -> None:
        self.accept()

    def waiting(self) -> int:
        """How many connections the accept queue holds (see TCPI_UNACKED); -1 if this is
        not a TCP listener, whose queue cannot be read so."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_READ)
        except OSError:
            return -1
        if len(info) < TCPI_READ or info[TCPI_STATE] != TCP_LISTEN:
            return -1
        return int.from_bytes(info[TCPI_UNACKED : TCPI_UNACKED + 4], sys.byteorder)

    def accept(self) -> None:
        """Accept what the queue holds, at most ACCEPT_BATCH; a listener whose queue
        cannot be read accepts until accept(2) finds none."""
        queued = self.waiting() if self.counted else -1
        if queued < 0:
            queued = ACCEPT_BATCH + 1  # unknown: until accept(2) finds none
        for _ in range(min(max(queued, 1), ACCEPT_BATCH)):  # the wakeup said one at least
            try:
                conn, peer = self.sock.accept()
            except RETRY:  # another copy took it (EPOLLEXCLUSIVE), or nothing was left
                queued = 0
                break
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self.pause(exc.errno)
                    return
                continue  # ECONNABORTED and the like: that connection is gone
            conn.setblocking(False)
            fd = conn.detach()
            try:
                self.on_accept(fd, peer)
            except Exception as exc:  # e.g. epoll_ctl ENOSPC: lose this connection, not the listener
                internal_error("closing a new connection", exc)
                os.close(fd)
        if queued <= ACCEPT_BATCH:
            self.starved = False  # the queue was emptied: that episode is over

    def pause(self, err: int) -> None:
        """Out of descriptors: stop until one is freed (descriptor_freed) or a second passes."""
        if not self.starved:
            self.starved = True
            out_of_descriptors(err)
        self.reactor.remove(self.fd)
        self.accepting = False
        self.retry = self.reactor.call_later(RESUME_ACCEPT_AFTER, self.start)
        if self.on_full is not None:
            try:
                self.on_full()  # what it closes starts accepting again (descriptor_freed)
            except Exception as exc:  # never lose the listener over it
                internal_error("accepting", exc)

    def descriptor_freed(self) -> None:
        if not self.accepting and not self.closed:
            self.retry.cancel()
            self.start()

    def close(self) -> None:
        """Stop accepting and close this process's copy of the listening socket."""
        if self.accepting:
            self.reactor.remove(self.fd)
        if self.retry is not None:
            self.retry.cancel()
        self.accepting = False
        self.closed = True
        self.sock.close()


class Flow:
    """One direction of a relay: read ``src`` while it has bytes, write ``dst`` while it takes them.

    Bytes go by read(2) and write(2) through user space.  Towards the backend, once a
    read fills a whole RELAY_CHUNK (bulk data), they go by splice(2) through a pipe
    instead, never copied; from the backend (a Unix socket) they are always copied
    (SPLICE_DOWN).  What ``dst`` did not take waits in ``dst.queued`` (copied) or in the
    pipe (spliced), and nothing more is read from ``src`` meanwhile.
    """

    def __init__(self, relay: Relay, src: Side, dst: Side, upward: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.way = "up" if upward else "down"  # towards the backend or the client, for COUNTS
        self.way_spliced = self.way + "_spliced"
        self.pipe_r = -1  # the pipe, once bulk data made splicing worth it
        self.pipe_w = -1
        self.piped = 0  # bytes in the pipe, not yet taken by dst
        self.can_splice = upward or SPLICE_DOWN  # False once the kernel refused a pipe, too
        self.eof = False  # src has sent everything
        self.done = False  # ... and all of it reached dst
        self.moved = 0  # bytes written to dst, for the owner's log (Relay.up, Relay.down)

    def pump(self) -> None:
        """Move bytes until src has none, dst takes no more, or PUMP_ROUNDS chunks went."""
        if not self.flush():
            return
        for _ in range(PUMP_ROUNDS):
            if self.eof:
                if not self.done:
                    self.done = True
                    self.relay.finished(self)
                return
            if not self.src.readable:
                return
            if not (self.splice() if self.pipe_w >= 0 else self.copy()):
                return
        self.relay.reactor.later(self)

    def copy(self) -> bool:
        """read() a chunk from src, write() it to dst; False once one of them must wait."""
        data = self.src.read(RELAY_CHUNK)
        if data is None:
            return False
        if not data:
            if self.src.error:
                self.relay.fail(self.src)
                return False
            self.eof = True
            return True
        if len(data) == RELAY_CHUNK and self.can_splice:
            self.open_pipe()  # bulk data: splice from now on
        return self.send(data)

    def splice(self) -> bool:
        """splice() a chunk from src into the pipe and on to dst; False once one must wait.

        A short splice says nothing about what is left in src (the pipe may have run
        out of slots), so only EAGAIN clears src.readable here."""
        try:
            moved = os.splice(self.src.fd, self.pipe_w, PIPE_SIZE, flags=SPLICE_FLAGS)
        except RETRY:
            self.src.readable = False
            return False
        except OSError as exc:
            self.src.error = exc.errno
            self.relay.fail(self.src)
            return False
        if not moved:
            self.eof = True
            return True
        self.piped = moved
        return self.flush()

    def flush(self) -> bool:
        """Write what waits (queued for dst, or in the pipe) to dst; True once nothing does."""
        if self.dst.queued:
            return self.sent(self.dst.flush())
        if not self.piped:
            return True
        moved = 0
        if self.dst.writable:
            try:
                moved = os.splice(self.pipe_r, self.dst.fd, self.piped, flags=SPLICE_FLAGS)
            except RETRY:
                pass
            except OSError as exc:
                self.dst.error = exc.errno
                self.relay.fail(self.dst)
                return False
        self.piped -= moved
        self.moved += moved
        COUNTS[self.way] += moved
        COUNTS[self.way_spliced] += moved
        if not self.piped:
            return True
        self.dst.wait_writable()
        return False

    def send(self, data: bytes) -> bool:
        """Write ``data`` to dst; True if all of it went (the rest is queued for dst)."""
        return self.sent(self.dst.send(data))

    def sent(self, count: int) -> bool:
        """After a write to dst of ``count`` bytes (-1: it failed): True if nothing waits."""
        if count < 0:
            self.relay.fail(self.dst)
            return False
        self.moved += count
        COUNTS[self.way] += count
        return not self.dst.queued

    def open_pipe(self) -> None:
        """A pipe of PIPE_SIZE for splicing.  If the kernel refuses one (out of descriptors,
        or the user's fs.pipe-user-pages-soft used up, which leaves pipes of two pages),
        this flow copies instead, for good."""
        try:
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.can_splice = False
            return
        try:
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            os.close(pipe_r)
            os.close(pipe_w)
            self.can_splice = False
            return
        self.pipe_r, self.pipe_w = pipe_r, pipe_w

    def release(self) -> None:
        if self.pipe_w >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class Relay(Handler):
    """Join the ``client`` and ``backend`` sides both ways; then close both and call
    ``on_close()``.

    What is already queued for a side (a ClientHello and PROXY header for the backend,
    a 101 for the client) goes out before anything else.  The client's descriptor is
    already in the reactor (``client.readable``: it may hold unread bytes); the
    backend's is added here.  If a read or write on the backend fails (a reset),
    ``on_backend_error(errno)`` is called before both are closed, to log it; a client's
    errors are its own business, and an EOF on either side is no error.
    """

    def __init__(
        self,
        reactor: Reactor,
        client: Side,
        backend: Side,
        on_close: Callable[[], None],
        on_backend_error: Callable[[int], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.backend = backend
        self.on_close = on_close
        self.on_backend_error = on_backend_error
        self.closed = False
        self.up = self.down = 0  # bytes relayed each way, once closed
        self.upstream = Flow(self, client, backend, True)
        self.downstream = Flow(self, backend, client, False)
        reactor.handlers[client.fd] = self
        reactor.add(backend.fd, self)
        self.upstream.pump()
        if not self.closed:
            self.downstream.pump()

    def ready(self, fd: int, events: int) -> None:
        """Events on one side: first move what it sends, then what it may now take."""
        if fd == self.client.fd:
            self.client.saw(events)
            first, second = self.upstream, self.downstream
        else:
            self.backend.saw(events)
            first, second = self.downstream, self.upstream
        first.pump()
        if not self.closed:
            second.pump()

    def finished(self, flow: Flow) -> None:
        """``flow``'s source sent EOF and all of it is out: shut its destination's
        writing side, or close both if the other direction is done too."""
        if self.closed:
            return
        other = self.downstream if flow is self.upstream else self.upstream
        if other.done:
            self.close()
        else:
            shutdown_write(flow.dst.fd)

    def fail(self, side: Side) -> None:
        """A read or write on ``side`` failed (its errno in ``side.error``): close both."""
        if side is self.backend and self.on_backend_error is not None and not self.closed:
            self.on_backend_error(side.error)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reactor.close(self.client.fd)
        self.reactor.close(self.backend.fd)
        self.upstream.release()
        self.downstream.release()
        self.up, self.down = self.upstream.moved, self.downstream.moved
        self.upstream = self.downstream = None  # each refers back to the relay: unlink them,
        self.on_close()  # so refcounting frees all three now, not the cyclic GC later
