# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of fastsni/engine.py: the event loop, accepting and the two-way relay, on descriptors.

Function for function the pure module, with the system calls made directly: no
socket objects, and no Python object per relayed chunk unless the other side is
slow (then the unsent rest waits as bytes).  The classes other compiled twins cimport
(Handler, Reactor, Side) have their attributes declared in fastsni/_engine.pxd.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.errno cimport EAGAIN, EINTR, ENOENT, errno
from libc.math cimport INFINITY, ceil
from libc.string cimport memcpy
from posix.fcntl cimport O_CLOEXEC
from posix.time cimport timespec
from posix.unistd cimport close, read, write

cdef extern from "<unistd.h>":
    int pipe2(int fds[2], int flags)

cdef extern from "Python.h":
    ctypedef struct PyThreadState:
        pass
    ctypedef struct PyInterpreterState:
        pass
    PyThreadState* PyThreadState_Get()
    PyInterpreterState* PyThreadState_GetInterpreter(PyThreadState* tstate)
    PyThreadState* PyInterpreterState_ThreadHead(PyInterpreterState* interp)
    PyThreadState* PyThreadState_Next(PyThreadState* tstate)

import os
import resource
import signal
from collections import deque

from fastsni.ownerlog import owner_log
from fastsni.engine import (  # not hot: the pure module's own
    ForeignSocket,
    abandon,
    cause,
    local_of as _socket_local_of,
    peer_of as _socket_peer_of,
    errno_name,
    exists_beside,
    failure,
    ignore_signal,
    internal_error,
    open_hosts as _open_hosts,
    enter_proc_fd as _enter_proc_fd,
    out_of_descriptors,
    refusing,
    shedding,
    source_text,
    wildcard_of,
)
from fastsni.engine import (
    ACCEPT_BATCH,
    TCP_LISTEN,
    TCPI_READ,
    TCPI_STATE,
    TCPI_UNACKED,
    BENEATH,
    FAIR_SHARE_FLOOR,
    SHED_BATCH,
    SHED_SOURCES,
    CHUNK,
    NO_BACKEND,
    RELAY_CHUNK,
    SPLICE_DOWN,
    CLOSING,
    PIPE_SIZE,
    EDGE,
    LISTENING,
    MARKERS_FRESH,
    MARKERS_KEPT,
    MAX_EVENTS,
    OUT_OF_DESCRIPTORS,
    PUMP_ROUNDS,
    READABLE,
    RESUME_ACCEPT_AFTER,
    SHUT,
    FAILED,
    WRITABLE,
)

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t length)
    int accept4(int fd, sockaddr* addr, socklen_t* length, int flags)
    int getpeername(int fd, sockaddr* addr, socklen_t* length)
    int getsockname(int fd, sockaddr* addr, socklen_t* length)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)
    struct sockaddr_storage:
        sa_family_t ss_family
    int shutdown(int fd, int how)
    enum:
        AF_UNIX
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_WR

cdef extern from "<netinet/in.h>":
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short value)
    unsigned int ntohl(unsigned int value)
    enum:
        INET6_ADDRSTRLEN

cdef extern from "<netinet/tcp.h>":
    struct tcp_info:
        unsigned char tcpi_state
        unsigned int tcpi_unacked
    enum:
        IPPROTO_TCP
        TCP_INFO

cdef extern from "<arpa/inet.h>":
    const char* inet_ntop(int family, const void* address, char* text, socklen_t size)
    int inet_pton(int family, const char* text, void* address)

cdef extern from "<sys/un.h>":
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]

cdef extern from "<fcntl.h>":
    ssize_t splice(int fd_in, long long* off_in, int fd_out, long long* off_out, size_t length, unsigned int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        O_NONBLOCK
        O_PATH
        O_NOFOLLOW
        AT_SYMLINK_NOFOLLOW
        AT_EMPTY_PATH

cdef extern from "<sys/epoll.h>":
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout) nogil
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL

cdef extern from "<sys/stat.h>":
    struct stat:
        unsigned long long st_dev  # dev_t and ino_t: 64 bits on Linux's 64-bit ABIs
        unsigned long long st_ino
        unsigned int st_uid
        timespec st_ctim

cdef extern from *:
    """
    #include <fcntl.h>
    #include <sys/stat.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* Python.h sets _FILE_OFFSET_BITS=64, so glibc links fcntl as fcntl64 (GLIBC_2.28) and
       fstatat as fstatat64 (GLIBC_2.33): symbols glibc 2.17 lacks, which would make the
       wheel manylinux_2_34. On x86_64 and aarch64 both are plain system calls whose
       arguments (glibc's struct stat is the kernel's there) need no translation, so make
       them directly; the strace is the same. Elsewhere keep glibc's wrappers. */
    #if defined(__x86_64__) || defined(__aarch64__)
    static int fastsni_fcntl(int fd, int command, int value) {
        return (int)syscall(SYS_fcntl, fd, command, value);
    }
    static int fastsni_fstatat(int dirfd, const char *path, struct stat *buf, int flags) {
        return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags);
    }
    #else
    #define fastsni_fcntl(fd, command, value) fcntl(fd, command, value)
    #define fastsni_fstatat fstatat
    #endif
    /* openat2(2), Linux 5.6: glibc has no wrapper and old kernel headers (manylinux2014)
       no struct open_how, so both are spelled out (linux/openat2.h). EAGAIN: a rename
       raced a ".." in the walk; EINTR: a signal; both are tried again, a few times. */
    struct fastsni_open_how { unsigned long long flags, mode, resolve; };
    static int fastsni_openat2(int dirfd, const char *path, unsigned long long flags, unsigned long long resolve) {
        struct fastsni_open_how how = {flags, 0, resolve};
        long fd;
        int tries = 8;
        do {
            fd = syscall(437, dirfd, path, &how, sizeof how);
        } while (fd < 0 && (errno == EAGAIN || errno == EINTR) && --tries);
        return (int)fd;
    }
    """
    int fcntl "fastsni_fcntl"(int fd, int command, int value)
    int fstatat "fastsni_fstatat"(int dirfd, const char* path, stat* buf, int flags)
    int c_openat2 "fastsni_openat2"(int dirfd, const char* path, unsigned long long flags, unsigned long long resolve)

cdef enum:
    C_CHUNK = 128 * 1024
    C_RELAY_CHUNK = 256 * 1024
    C_PIPE_SIZE = 512 * 1024
    C_MARKER_PATH = 272  # <entry>/send-proxy-vN: an entry of up to 255 bytes, a marker, the NUL

assert CHUNK == C_CHUNK and RELAY_CHUNK == C_RELAY_CHUNK and PIPE_SIZE == C_PIPE_SIZE and MAX_EVENTS == C_MAX_EVENTS
cdef int C_ACCEPT_BATCH = ACCEPT_BATCH
cdef int C_TCP_LISTEN = TCP_LISTEN
cdef socklen_t C_TCPI_READ = TCPI_READ
assert TCPI_STATE == <size_t>&(<tcp_info*>NULL).tcpi_state and TCPI_UNACKED == <size_t>&(<tcp_info*>NULL).tcpi_unacked
cdef double C_MARKERS_FRESH = MARKERS_FRESH
cdef Py_ssize_t C_MARKERS_KEPT = MARKERS_KEPT
cdef int C_PUMP_ROUNDS = PUMP_ROUNDS
cdef unsigned int C_READABLE = READABLE, C_WRITABLE = WRITABLE, C_CLOSING = CLOSING, C_EDGE = EDGE
cdef unsigned int C_LISTENING = LISTENING, C_SHUT = SHUT, C_FAILED = FAILED
cdef unsigned long long C_BENEATH = BENEATH
cdef int C_HOSTS = -1  # the hosts directory's O_PATH descriptor, once open_hosts() ran
cdef int C_PROC_FD = 14  # how much of "/proc/self/fd/" names a descriptor: 0 once enter_proc_fd() ran
cdef bint C_SPLICE_DOWN = SPLICE_DOWN
cdef char _buffer[C_RELAY_CHUNK]  # every relay reads into this one buffer: the loop is single-threaded

# The counters of the SIGUSR1 line, as in the pure twin's COUNTS (indexes into _counts).
cdef enum:
    ACCEPTED = 0
    UP = 1
    DOWN = 2
    UP_SPLICED = 3
    DOWN_SPLICED = 4
cdef unsigned long long _counts[5]
# Refused for a source's fair share, and unrouted ones closed out of descriptors, as the
# pure twin's FAIR.
cdef unsigned long long _refused_fair_share = 0, _shed_fair_share = 0
cdef Py_ssize_t C_FAIR_SHARE_FLOOR = FAIR_SHARE_FLOOR
cdef Py_ssize_t C_SHED_BATCH = SHED_BATCH


def counts():
    """This process's connections accepted and bytes relayed so far."""
    return {
        "accepted": _counts[ACCEPTED],
        "up": _counts[UP],
        "down": _counts[DOWN],
        "up_spliced": _counts[UP_SPLICED],
        "down_spliced": _counts[DOWN_SPLICED],
    }


def fair_share_counts():
    return {"refused_fair_share": _refused_fair_share, "shed_fair_share": _shed_fair_share}


cdef inline bint _retry(int err) noexcept:
    return err == EAGAIN or err == EINTR  # EWOULDBLOCK is EAGAIN on Linux


cdef object _oserror(int err, bytes filename=None):
    if filename is None:
        return OSError(err, os.strerror(err))
    return OSError(err, os.strerror(err), filename.decode("ascii"))


cdef inline int _decimal(char* out, unsigned int value) noexcept:
    """Write ``value`` in decimal at ``out``, without snprintf's cost: the digits written."""
    cdef char digits[10]
    cdef int count = 0, i
    while True:
        digits[count] = 48 + value % 10
        count += 1
        value //= 10
        if value == 0:
            break
    for i in range(count):
        out[i] = digits[count - 1 - i]
    return count


cdef bytes _path(bytes entry, str leaf):
    """``entry + b"/" + leaf.encode("ascii")`` in one allocation (bytes + bytes goes through
    the buffer protocol, twice here)."""
    cdef bytes encoded = leaf.encode("ascii")
    cdef Py_ssize_t size = PyBytes_GET_SIZE(entry)
    cdef bytes path = PyBytes_FromStringAndSize(NULL, size + 1 + PyBytes_GET_SIZE(encoded))
    cdef char* at = PyBytes_AS_STRING(path)
    memcpy(at, PyBytes_AS_STRING(entry), size)
    at[size] = 47  # "/"
    memcpy(at + size + 1, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded))
    return path


cdef int _connect_proc_fd(int fd, int path) noexcept:
    """connect(2) to the Unix socket file held by the O_PATH descriptor ``path``, through
    /proc/self/fd/N, or N once enter_proc_fd() ran: 0, or -1 with errno set."""
    cdef sockaddr_un address
    cdef int length = C_PROC_FD
    address.sun_family = AF_UNIX
    memcpy(address.sun_path, b"/proc/self/fd/", length)
    length += _decimal(address.sun_path + length, path)
    address.sun_path[length] = 0
    return connect(fd, <sockaddr*>&address, <socklen_t>(sizeof(sa_family_t) + length + 1))


def open_hosts():
    """Hold the working directory as the hosts tree (the pure twin's open_hosts, which
    checks openat2(2) and /proc/self/fd); the descriptor."""
    global C_HOSTS
    C_HOSTS = _open_hosts()
    return C_HOSTS


def enter_proc_fd():
    """Make /proc/self/fd the working directory (the pure twin's enter_proc_fd, which the
    owner log's names follow too); a socket file is then connected through "N"."""
    global C_PROC_FD
    _enter_proc_fd()
    C_PROC_FD = 0


def openat2(int dirfd, str path, unsigned long long flags, unsigned long long resolve):
    """openat2(2) with ``struct open_how {flags, mode 0, resolve}``; the descriptor, or OSError."""
    cdef bytes encoded = path.encode("ascii")
    cdef int fd = c_openat2(dirfd, encoded, flags, resolve)
    if fd < 0:
        raise _oserror(errno, encoded)
    return fd


def connect_backend(str name, str leaf):
    """Connect to ``<name>/<leaf>`` beneath the hosts tree, looked up afresh; if no entry
    ``<name>`` exists, to ``*.<rest>/<leaf>``; only to the entry owner's socket."""
    cdef int version
    cdef unsigned long long identity[2]
    cdef int fd = connect_fd(name, leaf, &version, identity)
    return fd, version, (identity[0], identity[1])


cdef int connect_fd(str name, str leaf, int* version, unsigned long long identity[2]) except -1:
    """connect_backend for the compiled proxies (cimported: fastsni/_engine.pxd), without
    a Python call or tuples: the descriptor; the PROXY version and the socket file's
    (st_dev, st_ino) in ``version`` and ``identity``."""
    cdef stat entry_status, socket_status
    cdef int fd, path
    cdef str entry = _entry(name, leaf, &entry_status)
    cdef bytes encoded = entry.encode("ascii")
    cdef bytes target = _path(encoded, leaf)
    path = c_openat2(C_HOSTS, target, O_PATH | O_CLOEXEC, C_BENEATH)
    if path < 0:
        raise _oserror(errno, target)
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        close(path)
        raise _oserror(errno)
    try:
        try:
            _check_owner(path, entry_status.st_uid, target, &socket_status)
            if _connect_proc_fd(fd, path) < 0:  # the very inode checked
                raise _oserror(errno, target)
        finally:
            close(path)
        version[0] = _markers_of(entry, encoded, &entry_status, &socket_status)
        identity[0], identity[1] = socket_status.st_dev, socket_status.st_ino
        return fd
    except BaseException:
        close(fd)
        raise


def socket_identity(str name, str leaf):
    """What connect_backend would connect ``name`` to now, without connecting: the socket
    file's (st_dev, st_ino), found and checked as connect_backend does; None if it would
    find none; OSError if the lookup failed for want of a descriptor."""
    cdef stat entry_status, socket_status
    cdef int path
    cdef bytes target
    try:
        target = _path(_entry(name, leaf, &entry_status).encode("ascii"), leaf)
    except OSError:
        return None
    path = c_openat2(C_HOSTS, target, O_PATH | O_CLOEXEC, C_BENEATH)
    if path < 0:
        err = errno  # before any Python call can change it
        if err in OUT_OF_DESCRIPTORS:
            raise _oserror(err, target)
        return None
    try:
        _check_owner(path, entry_status.st_uid, target, &socket_status)
        return socket_status.st_dev, socket_status.st_ino
    except OSError:
        return None
    finally:
        close(path)


cdef str _entry(str name, str leaf, stat* status):
    """The entry that serves ``name`` (``<name>`` if listed, of any kind, else its
    wildcard entry); its lstat in ``status`` (``st_uid``: its owner)."""
    cdef int err
    if fstatat(C_HOSTS, name.encode("ascii"), status, AT_SYMLINK_NOFOLLOW) == 0:
        return name
    err = errno  # before any Python call can change it
    wildcard = wildcard_of(name)
    if err != ENOENT or wildcard is None:
        exc = _oserror(err, f"{name}/{leaf}".encode("ascii"))
        exc.no_entry = err == ENOENT  # see the pure twin's cause()
        raise exc
    if fstatat(C_HOSTS, wildcard.encode("ascii"), status, AT_SYMLINK_NOFOLLOW) == 0:
        return wildcard
    err = errno
    exc = _oserror(err, f"{wildcard}/{leaf}".encode("ascii"))
    exc.no_entry = err == ENOENT
    raise exc


cdef int _check_owner(int path, unsigned int owner, bytes target, stat* status) except -1:
    """ForeignSocket unless the socket file ``path`` is the entry owner's or root's, or
    the entry is root's; its fstat in ``status`` if it passes."""
    if fstatat(path, b"", status, AT_EMPTY_PATH) < 0:
        raise _oserror(errno, target)
    if owner != 0 and status.st_uid != 0 and status.st_uid != owner:
        raise ForeignSocket(owner, status.st_uid, target.decode("ascii"))
    return 0


cdef class _Marked:
    """What _markers_of remembers of one entry (the pure twin's tuple, as C values)."""

    cdef unsigned long long dev, ino, entry_ino
    cdef long ctime_sec, ctime_nsec
    cdef int version
    cdef double until


cdef dict _markers = {}  # entry -> _Marked


cdef int _markers_of(str entry, bytes encoded, stat* entry_status, stat* socket_status) except -1:
    """_proxy_version(entry), remembered while the socket file, the entry's lstat and at
    most MARKERS_FRESH seconds say it cannot have changed (see the pure twin)."""
    cdef double now = _monotonic()
    cdef _Marked known = _markers.get(entry)
    if (
        known is not None and known.until > now
        and known.dev == socket_status.st_dev and known.ino == socket_status.st_ino
        and known.entry_ino == entry_status.st_ino
        and known.ctime_sec == entry_status.st_ctim.tv_sec and known.ctime_nsec == entry_status.st_ctim.tv_nsec
    ):
        return known.version
    if known is None:
        if len(_markers) >= C_MARKERS_KEPT:
            _markers.clear()
        known = _Marked.__new__(_Marked)
        _markers[entry] = known
    known.version = _proxy_version(encoded)
    known.dev, known.ino = socket_status.st_dev, socket_status.st_ino
    known.entry_ino = entry_status.st_ino
    known.ctime_sec, known.ctime_nsec = entry_status.st_ctim.tv_sec, entry_status.st_ctim.tv_nsec
    known.until = now + C_MARKERS_FRESH
    return known.version


cdef int _proxy_version(bytes entry) except -1:
    """2 if ``<entry>/send-proxy-v2`` exists beneath the tree (any file type), else 1 if
    ``send-proxy-v1`` does, else 0."""
    cdef int fd
    cdef char path[C_MARKER_PATH]
    cdef Py_ssize_t length = PyBytes_GET_SIZE(entry)
    if length > C_MARKER_PATH - 16:
        raise ValueError("entry name too long")
    memcpy(path, PyBytes_AS_STRING(entry), length)
    memcpy(path + length, b"/send-proxy-v2", 15)  # with the NUL
    fd = c_openat2(C_HOSTS, path, O_PATH | O_NOFOLLOW | O_CLOEXEC, C_BENEATH)
    if fd >= 0:
        close(fd)
        return 2
    path[length + 13] = 49  # "1"
    fd = c_openat2(C_HOSTS, path, O_PATH | O_NOFOLLOW | O_CLOEXEC, C_BENEATH)
    if fd >= 0:
        close(fd)
        return 1
    return 0


cdef str _dotted_quad(const unsigned char* raw):
    """An IPv4 address as inet_ntop(3) writes it, without its sprintf (a third of the
    instructions of accepting a connection)."""
    cdef char text[16]
    cdef int i, at = 0
    for i in range(4):
        at += _decimal(text + at, raw[i])
        text[at] = 46  # "."
        at += 1
    return PyUnicode_DecodeASCII(text, at - 1, NULL)


cdef object _address(const sockaddr_storage* address, int fd):
    """The address in ``address`` (from getpeername(2) or accept4(2) of ``fd``) as
    socket.getpeername() gives it; an IPv6 address without the %scope suffix, which the
    proxies drop.  Another family (a Unix socket): the pure twin's peer_of (one more
    getpeername(2))."""
    cdef char text[INET6_ADDRSTRLEN]
    cdef const sockaddr_in* ipv4
    cdef const sockaddr_in6* ipv6
    if address.ss_family == AF_INET:
        ipv4 = <const sockaddr_in*>address
        return (_dotted_quad(<const unsigned char*>&ipv4.sin_addr), ntohs(ipv4.sin_port))
    if address.ss_family == AF_INET6:
        ipv6 = <const sockaddr_in6*>address
        inet_ntop(AF_INET6, &ipv6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(ipv6.sin6_port), ntohl(ipv6.sin6_flowinfo), ipv6.sin6_scope_id)
    return _socket_peer_of(fd, address.ss_family)


ctypedef int (*_name_call)(int fd, sockaddr* addr, socklen_t* length)


cdef object _end_of(int fd, int family, _name_call call, pure):
    """One end of a connected socket descriptor of ``family`` from one ``call``
    (getpeername or getsockname), as the socket object's method gives it; another
    family than IP: ``pure``, the pure twin's function."""
    cdef sockaddr_storage address
    cdef socklen_t length = sizeof(address)
    if family != AF_INET and family != AF_INET6:
        return pure(fd, family)
    if call(fd, <sockaddr*>&address, &length) < 0:
        raise _oserror(errno)
    return _address(&address, fd)


def peer_of(int fd, int family):
    """The peer address of a connected socket descriptor of ``family``, as
    socket.getpeername() gives it, from one getpeername(2) (socket() adds a
    getsockname(2)): what Listener passes with each connection, for a descriptor from
    elsewhere."""
    return _end_of(fd, family, getpeername, _socket_peer_of)


def local_of(int fd, int family):
    """Our end of a connected socket descriptor of ``family``, as socket.getsockname()
    gives it, from one getsockname(2) (the pure twin's socket object costs a PROXY
    header some 10k instructions)."""
    return _end_of(fd, family, getsockname, _socket_local_of)


def source_of(peer, int family):
    """Whom a connection from ``peer`` (its address, as accept gave it, on a socket of
    ``family``) counts against under pressure: its IPv4 address (4 bytes), or its IPv6
    address's /64 (8 bytes; an IPv4-mapped address counts as its IPv4 one); None for no
    address or another family (a Unix socket).  No system call."""
    cdef unsigned char raw[16]
    cdef bytes host
    if peer is None or (family != AF_INET and family != AF_INET6):
        return None
    host = (<str>peer[0]).encode("ascii")
    if family == AF_INET:
        if inet_pton(AF_INET, host, raw) != 1:
            raise OSError("illegal IP address string passed to inet_pton")
        return PyBytes_FromStringAndSize(<const char*>raw, 4)
    if inet_pton(AF_INET6, host.partition(b"%")[0], raw) != 1:
        raise OSError("illegal IP address string passed to inet_pton")
    if (raw[0] | raw[1] | raw[2] | raw[3] | raw[4] | raw[5] | raw[6] | raw[7] | raw[8] | raw[9]) == 0 \
            and raw[10] == 0xFF and raw[11] == 0xFF:
        return PyBytes_FromStringAndSize(<const char*>raw + 12, 4)
    return PyBytes_FromStringAndSize(<const char*>raw, 8)


def shutdown_write(int fd):
    """shutdown(fd, SHUT_WR); errors are left for the next read or write to report."""
    shutdown(fd, SHUT_WR)


cdef inline bint _only_thread() noexcept:
    """No other Python thread exists, so none can be waiting for the GIL."""
    cdef PyThreadState* head = PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(PyThreadState_Get()))
    return PyThreadState_Next(head) == NULL


cdef dict _owner_logs = owner_log.found  # the one dict OwnerLog keeps (forget() clears it)


cdef bint no_owner_log(str name, double now) except -1:
    """What owner_log.target(name) would answer without a lookup, at C cost, for the
    compiled proxies: True if ``name`` is known, for now, to have no log socket (the
    common case)."""
    cdef tuple known = _owner_logs.get(name)
    return known is not None and <long>known[1] < 0 and <double>known[0] > now


cdef class Timer:
    """``callback(*args)`` at ``when`` (time.monotonic()) unless cancelled first."""

    def __init__(self, double when, callback, tuple args):
        self.when = when
        self.callback = callback
        self.args = args

    cpdef cancel(self):
        """Drop the callback (and what it holds) now; the entry leaves its queue later."""
        self.callback = None
        self.args = ()

    cpdef fire(self):
        callback, args = self.callback, self.args
        if callback is not None:
            self.cancel()
            callback(*args)


cdef class Handler:
    """What the Reactor hands a ready descriptor to: ``ready(fd, events)``, called as a
    C method (a Python subclass's own ``ready`` is found and called too)."""

    cpdef ready(self, int fd, unsigned int events):
        raise NotImplementedError


cdef class Side:
    """One end of a connection: its descriptor, the bytes a short write left for later,
    and what epoll said of it (attributes in fastsni/_engine.pxd)."""

    def __init__(self, Reactor reactor, int fd):
        self.setup(reactor, fd)

    cdef setup(self, Reactor reactor, int fd):
        """__init__'s work, which new_side() does without a Python call."""
        self.reactor = reactor
        self.fd = fd
        self.queued = b""
        self.readable = False
        self.closing = False
        self.shut = False
        self.ended = False
        self.writable = True
        self.error = 0

    cpdef saw(self, unsigned int events):
        """Note what one epoll event says of this side."""
        if events & (C_READABLE | C_CLOSING):
            self.readable = True
            if events & C_CLOSING:
                self.closing = True
                self.shut = (self.shut or (events & C_SHUT) != 0) and not (events & C_FAILED)
        if events & (C_WRITABLE | C_CLOSING):
            self.writable = True

    cdef Py_ssize_t recv(self, Py_ssize_t size) noexcept:
        """read() as read() below does it, into the engine's buffer: the count; 0 at EOF
        or on an error (its errno in ``error``); -1 if there are none now."""
        if self.ended:
            return 0
        cdef ssize_t got = read(self.fd, _buffer, size)
        if got < 0:
            if _retry(errno):
                self.readable = False
                return -1
            self.error = errno
            return 0
        if got < size:
            if not self.closing:
                self.readable = False
            elif self.shut and got > 0:
                self.ended = True
        return got

    cpdef read(self, Py_ssize_t size=C_CHUNK):
        """Up to ``size`` bytes; b"" at EOF or on an error (its errno in ``error``); None
        if there are none now.  A short read clears ``readable`` too, unless the side is
        closing: bytes that come later bring a new edge.  A short read after the peer shut
        its side took the last bytes, so the EOF after them costs no read(2)."""
        cdef Py_ssize_t got = self.recv(min(size, C_RELAY_CHUNK))
        if got < 0:
            return None
        return PyBytes_FromStringAndSize(_buffer, got)

    cpdef Py_ssize_t send(self, bytes data) except -2:
        """Write ``data`` after what is queued; what the kernel does not take now is
        queued.  Returns the bytes written now, or -1 if the write failed (see write)."""
        if self.queued or not self.writable:
            self.queued += data
            return 0
        return self.write_from(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cpdef Py_ssize_t flush(self) except -2:
        """Write what is queued: the bytes written, or -1 (see write)."""
        cdef bytes data = self.queued
        self.queued = b""
        if not data:
            return 0
        return self.write_from(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cpdef Py_ssize_t write(self, bytes data) except -2:
        """write(2) ``data`` if the side may take it; queue the rest and ask for EPOLLOUT.
        Returns the bytes written, or -1 with the errno in ``error`` (nothing queued)."""
        return self.write_from(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef Py_ssize_t write_from(self, const char* data, Py_ssize_t size) except -2:
        """write() from a C buffer (the engine's, when a relay copies)."""
        cdef ssize_t sent = 0
        if self.writable:
            sent = write(self.fd, data, size)
            if sent < 0:
                if not _retry(errno):
                    self.error = errno
                    return -1
                sent = 0
        if sent < size:
            self.queued = PyBytes_FromStringAndSize(data + sent, size - sent)
            self.wait_writable()
        return sent

    cpdef wait_writable(self):
        """It took less than it was given: go on at the next EPOLLOUT edge."""
        self.writable = False
        self.reactor.want_write(self.fd)


cdef class Reactor(Handler):
    """Edge-triggered readiness for connection descriptors: ``handler.ready(fd, events)``."""

    def __init__(self):
        self.epoll = epoll_create1(EPOLL_CLOEXEC)
        if self.epoll < 0:
            raise _oserror(errno)
        self.handlers = {}
        self.writers = set()
        self.again = []
        self.timers = {}
        self.earliest = INFINITY
        self.signals = {}
        self.wakeup = -1
        self.stopping = False

    cpdef add(self, int fd, Handler handler, unsigned int events=C_EDGE):
        cdef epoll_event event
        event.events = events
        event.data.fd = fd
        if epoll_ctl(self.epoll, EPOLL_CTL_ADD, fd, &event) < 0:
            raise _oserror(errno)
        self.handlers[fd] = handler

    cpdef remove(self, int fd):
        """Stop watching ``fd`` without closing it."""
        if epoll_ctl(self.epoll, EPOLL_CTL_DEL, fd, NULL) < 0:
            raise _oserror(errno)
        del self.handlers[fd]
        self.writers.discard(fd)

    cpdef want_write(self, int fd):
        """A write to ``fd`` fell short: report when it can take more."""
        cdef epoll_event event
        if fd not in self.writers:
            self.writers.add(fd)
            event.events = C_EDGE | C_WRITABLE
            event.data.fd = fd
            if epoll_ctl(self.epoll, EPOLL_CTL_MOD, fd, &event) < 0:
                raise _oserror(errno)

    cpdef close(self, int fd):
        """Forget ``fd`` and close it (which removes it from the epoll set)."""
        del self.handlers[fd]
        self.writers.discard(fd)
        close(fd)

    cpdef dispatch(self, double timeout=0):
        """Wait up to ``timeout`` seconds (-1: until an event) and hand out the events."""
        cdef int i, count, epoll = self.epoll
        cdef int milliseconds = -1 if timeout < 0 else <int>ceil(timeout * 1000)
        cdef epoll_event* events = self.events
        cdef dict handlers = self.handlers
        if _only_thread():  # the proxies: handing the GIL over and back would cost more than the call
            count = epoll_wait(epoll, events, C_MAX_EVENTS, milliseconds)
        else:
            with nogil:  # another thread may run meanwhile, as around the pure twin's poll()
                count = epoll_wait(epoll, events, C_MAX_EVENTS, milliseconds)
        if count < 0:
            if errno != EINTR:
                raise _oserror(errno)
            PyErr_CheckSignals()  # run Python's signal handlers now (the pure twin's poll does)
            return
        for i in range(count):
            handler = handlers.get(events[i].data.fd)
            if handler is not None:
                try:
                    (<Handler?>handler).ready(events[i].data.fd, events[i].events)  # a C call
                except Exception as exc:
                    abandon(handler, exc)

    cdef later(self, flow):
        """Run ``flow.pump()`` again once the other ready descriptors had their turn."""
        self.again.append(flow)

    cpdef run_again(self):
        cdef Flow flow
        flows, self.again = self.again, []
        for flow in flows:
            if not flow.relay.closed:
                flow.pump()

    def time(self):
        return _monotonic()

    def call_later(self, double delay, callback, *args):
        """``callback(*args)`` in ``delay`` seconds; ``.cancel()`` on the result stops it."""
        return self.schedule(delay, callback, args)

    cdef Timer schedule(self, double delay, callback, tuple args):
        """call_later for compiled callers, with the arguments as a tuple."""
        cdef Timer timer = Timer.__new__(Timer)
        timer.when = _monotonic() + delay
        timer.callback = callback
        timer.args = args
        fifo = self.timers.get(delay)
        if fifo is None:
            fifo = self.timers[delay] = deque()
        while fifo and (<Timer>fifo[0]).callback is None:  # cancelled ones at the head go now
            fifo.popleft()
        fifo.append(timer)
        if timer.when < self.earliest:
            self.earliest = timer.when
        return timer

    cpdef double next_timeout(self):
        """Seconds epoll_wait may block: 0 while flows wait their turn, else until
        ``earliest``, or -1 (no timer); no scan per wakeup (see the pure twin)."""
        if self.again:
            return 0.0
        if self.earliest == INFINITY:
            return -1.0
        return max(0.0, self.earliest - _monotonic())

    cpdef run_timers(self):
        """Fire the timers that are due, oldest first within each delay; then find the
        earliest one left, dropping cancelled ones at the FIFOs' heads."""
        cdef double now = _monotonic()
        cdef double earliest = INFINITY
        cdef Timer timer
        if now < self.earliest:
            return
        for fifo in list(self.timers.values()):
            while fifo and (<Timer>fifo[0]).when <= now:
                timer = fifo.popleft()
                try:
                    timer.fire()
                except Exception as exc:
                    internal_error("continuing", exc)
        for fifo in self.timers.values():
            while fifo:
                timer = fifo[0]
                if timer.callback is not None:
                    if timer.when < earliest:
                        earliest = timer.when
                    break
                fifo.popleft()
        self.earliest = earliest

    def add_signal_handler(self, int signum, callback, *args):
        """``callback(*args)`` from the loop when ``signum`` arrives (through the wakeup pipe)."""
        cdef int fds[2]
        if self.wakeup < 0:
            if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
                raise _oserror(errno)
            self.wakeup = fds[0]
            signal.set_wakeup_fd(fds[1], warn_on_full_buffer=False)
            self.add(self.wakeup, self, C_READABLE)
        self.signals[signum] = (callback, args)
        signal.signal(signum, ignore_signal)

    cpdef ready(self, int fd, unsigned int events):
        """The wakeup pipe: run the handler of each signal that arrived."""
        cdef unsigned char numbers[256]
        cdef ssize_t i, got = read(fd, numbers, 256)  # -1 (EAGAIN): nothing to do
        PyErr_CheckSignals()  # Python's handlers too, as the pure twin's eval loop would
        for i in range(got):
            handler = self.signals.get(numbers[i])
            if handler is not None:
                handler[0](*handler[1])

    def run_forever(self):
        """Standalone: one epoll_wait per wakeup for every descriptor, timer and signal,
        then the due timers and the flows that yielded; until stop()."""
        while not self.stopping:
            self.dispatch(self.next_timeout())
            self.run_timers()
            if self.again:
                self.run_again()
        self.stopping = False

    def stop(self):
        """Make run_forever return after this wakeup (at once if it is not running)."""
        self.stopping = True


cdef class Service:
    """One proxy process: its listener, its reactor and the connections still open; the
    fair share under descriptor pressure, as the pure twin's Service."""

    def __init__(self, sock, start):
        self.start = start
        self.family = sock.family  # of every accepted connection too
        self.live = {}  # the open connections, oldest first (the values are unused)
        self.reactor = Reactor()
        self.listener = Listener(self.reactor, sock, self.accepted, self.shed)
        self.refusal = getattr(start, "REFUSED", b"")
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the server raised it already
        self.pressure_above = self.limit // 2
        self.pressure_below = self.limit // 4
        self.sources = None  # connections per source, under pressure
        self.owners = {}  # connection -> its source, under pressure, oldest first
        self.refusing_logged = False
        self.shedding_logged = False

    def accepted(self, int fd, peer):
        cdef Py_ssize_t held, share
        _counts[ACCEPTED] += 1
        if self.sources is None and len(self.reactor.handlers) >= self.pressure_above:
            self.enter_pressure()
        source = None
        if self.sources is not None:
            source = source_of(peer, self.family)
            if source is not None:
                held = (<dict>self.sources).get(source, 0)
                share = self.fair_share()
                if held >= share:
                    self.refuse(fd, source, held, share)
                    return
        connection = self.start(self, fd, peer)
        self.live[connection] = None
        if source is not None:
            self.sources[source] = (<dict>self.sources).get(source, 0) + 1
            self.owners[connection] = source
        # The client speaks first (its ClientHello, its request), and its first bytes are
        # usually here by the time accept(2) returns: read them now, not after a wakeup.
        (<Handler?>connection).ready(fd, C_READABLE)

    def fair_share(self):
        """Connections a source may hold under pressure."""
        return max(C_FAIR_SHARE_FLOOR, self.limit // (2 * (len(self.sources) + 1)))

    def enter_pressure(self):
        """Count every open connection against its source, oldest first."""
        cdef dict sources = {}
        cdef dict owners = {}
        for connection in self.live:
            source = source_of(getattr(connection, "peer", None), self.family)
            if source is not None:
                sources[source] = sources.get(source, 0) + 1
                owners[connection] = source
        self.sources = sources
        self.owners = owners

    def leave_pressure(self):
        self.sources = None
        self.owners = {}
        self.refusing_logged = self.shedding_logged = False

    def refuse(self, int fd, bytes source, Py_ssize_t held, Py_ssize_t share):
        """Refuse a new connection of a source over its share: the proxy's REFUSED, close."""
        global _refused_fair_share
        _refused_fair_share += 1
        if not self.refusing_logged:
            self.refusing_logged = True
            refusing(len(self.reactor.handlers), self.limit, share, source, held, self.pressure_below)
        if self.refusal:
            write(fd, PyBytes_AS_STRING(self.refusal), PyBytes_GET_SIZE(self.refusal))
        close(fd)

    def shed(self):
        """Accept found no descriptor: close the unrouted connections of the heaviest source
        that has some, among the heaviest holding more than the floor, oldest first,
        SHED_BATCH at most (see the pure twin)."""
        global _shed_fair_share
        cdef Py_ssize_t count = 0
        if self.sources is None:
            self.enter_pressure()
        sources = self.sources
        heaviest = sorted(sources, key=sources.__getitem__, reverse=True)[:SHED_SOURCES]
        heaviest = [source for source in heaviest if sources[source] > C_FAIR_SHARE_FLOOR]
        candidates = list(self.owners.items())
        for source in heaviest:
            held = sources.get(source, 0)
            for connection, owner in candidates:
                if owner == source and connection.shed():
                    count += 1
                    if count == C_SHED_BATCH or self.sources is None:
                        break
            if count:
                _shed_fair_share += count
                if not self.shedding_logged and self.sources is not None:
                    self.shedding_logged = True
                    shedding(count, source, held)
                return

    cpdef closed(self, connection):
        self.live.pop(connection, None)
        if self.sources is not None:
            self.released(connection)
        self.listener.descriptor_freed()

    cdef released(self, connection):
        """Under pressure: ``connection`` no longer counts; below a quarter, pressure ends."""
        cdef Py_ssize_t held
        source = self.owners.pop(connection, None)
        if source is not None:
            held = self.sources[source] - 1
            if held:
                self.sources[source] = held
            else:
                del self.sources[source]
        if len(self.reactor.handlers) < self.pressure_below:
            self.leave_pressure()


cdef class Listener(Handler):
    """Accept from a listening socket; ``on_accept(fd, peer)`` gets each non-blocking
    descriptor and its peer's address as accept4(2) returned it (see the pure twin), and
    ``on_full()`` (if given) is called when accept found no descriptor."""

    def __init__(self, Reactor reactor, sock, on_accept, on_full=None):
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.on_accept = on_accept
        self.on_full = on_full
        self.accepting = False
        self.closed = False
        self.retry = None
        self.starved = False
        self.counted = self.waiting() >= 0

    def start(self):
        if not self.accepting and not self.closed:
            self.accepting = True
            self.reactor.add(self.fd, self, C_LISTENING)  # level-triggered, exclusive: see LISTENING

    cpdef ready(self, int fd, unsigned int events):
        self.accept()

    cpdef int waiting(self):
        """How many connections the accept queue holds (see TCPI_UNACKED); -1 if this is
        not a TCP listener."""
        cdef tcp_info info
        cdef socklen_t length = C_TCPI_READ
        if getsockopt(self.fd, IPPROTO_TCP, TCP_INFO, &info, &length) < 0:
            return -1
        if length < C_TCPI_READ or info.tcpi_state != C_TCP_LISTEN:
            return -1
        return info.tcpi_unacked

    cpdef accept(self):
        """Accept what the queue holds, at most ACCEPT_BATCH (see the pure twin)."""
        cdef int i, fd, err, queued
        cdef sockaddr_storage address
        cdef socklen_t length
        queued = self.waiting() if self.counted else -1
        if queued < 0:
            queued = C_ACCEPT_BATCH + 1  # unknown: until accept4(2) finds none
        for i in range(min(max(queued, 1), C_ACCEPT_BATCH)):  # the wakeup said one at least
            length = sizeof(address)
            fd = accept4(self.fd, <sockaddr*>&address, &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if _retry(err):  # another copy took it (EPOLLEXCLUSIVE), or nothing was left
                    queued = 0
                    break
                if err in OUT_OF_DESCRIPTORS:
                    self.pause(err)
                    return
                continue
            try:
                self.on_accept(fd, _address(&address, fd))
            except Exception as exc:
                internal_error("closing a new connection", exc)
                close(fd)
        if queued <= C_ACCEPT_BATCH:
            self.starved = False  # the queue was emptied: that episode is over

    def pause(self, int err):
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

    cpdef descriptor_freed(self):
        if not self.accepting and not self.closed:
            self.retry.cancel()
            self.start()

    def close(self):
        """Stop accepting and close this process's copy of the listening socket."""
        if self.accepting:
            self.reactor.remove(self.fd)
        if self.retry is not None:
            self.retry.cancel()
        self.accepting = False
        self.closed = True
        self.sock.close()


cdef class Flow:
    """One direction of a relay: read ``src`` while it has bytes, write ``dst`` while it takes them.

    Bytes go by read(2) and write(2) through user space.  Towards the backend, once a
    read fills a whole RELAY_CHUNK (bulk data), they go by splice(2) through a pipe
    instead, never copied; from the backend (a Unix socket) they are always copied
    (SPLICE_DOWN).  What ``dst`` did not take waits in ``dst.queued`` (copied) or in the
    pipe (spliced), and nothing more is read from ``src`` meanwhile.  (Attributes in
    fastsni/_engine.pxd.)
    """

    def __init__(self, Relay relay, Side src, Side dst, bint upward):
        self.setup(relay, src, dst, upward)

    cdef setup(self, Relay relay, Side src, Side dst, bint upward):
        """__init__'s work, which Relay does without a Python call."""
        self.relay = relay
        self.src = src
        self.dst = dst
        self.way = UP if upward else DOWN
        self.pipe_r = -1
        self.pipe_w = -1
        self.piped = 0
        self.can_splice = upward or C_SPLICE_DOWN  # False once the kernel refused a pipe, too
        self.eof = False
        self.done = False
        self.moved = 0

    cpdef pump(self):
        """Move bytes until src has none, dst takes no more, or PUMP_ROUNDS chunks went."""
        cdef int i
        if not self.flush():
            return
        for i in range(C_PUMP_ROUNDS):
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

    cdef bint copy(self) except -1:
        """read() a chunk from src, write() it to dst; False once one of them must wait."""
        cdef Py_ssize_t got = self.src.recv(C_RELAY_CHUNK)
        if got < 0:
            return False
        if got == 0:
            if self.src.error:
                self.relay.fail(self.src)
                return False
            self.eof = True
            return True
        if got == C_RELAY_CHUNK and self.can_splice:
            self.open_pipe()
        # send(), without a bytes object: nothing waits for dst here (flush saw to it)
        return self.sent(self.dst.write_from(_buffer, got))

    cdef bint splice(self) except -1:
        """splice() a chunk from src into the pipe and on to dst; False once one must wait."""
        cdef ssize_t moved = splice(self.src.fd, NULL, self.pipe_w, NULL, C_PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if moved < 0:
            if _retry(errno):
                self.src.readable = False
            else:
                self.src.error = errno
                self.relay.fail(self.src)
            return False
        if moved == 0:
            self.eof = True
            return True
        self.piped = moved
        return self.flush()

    cdef bint flush(self) except -1:
        """Write what waits (queued for dst, or in the pipe) to dst; True once nothing does."""
        cdef ssize_t moved = 0
        if self.dst.queued:
            return self.sent(self.dst.flush())
        if not self.piped:
            return True
        if self.dst.writable:
            moved = splice(self.pipe_r, NULL, self.dst.fd, NULL, self.piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if moved < 0:
                if not _retry(errno):
                    self.dst.error = errno
                    self.relay.fail(self.dst)
                    return False
                moved = 0
        self.piped -= moved
        self.moved += moved
        _counts[self.way] += moved
        _counts[self.way + 2] += moved  # UP_SPLICED or DOWN_SPLICED
        if not self.piped:
            return True
        self.dst.wait_writable()
        return False

    cpdef bint send(self, bytes data) except -1:
        """Write ``data`` to dst; True if all of it went (the rest is queued for dst)."""
        return self.sent(self.dst.send(data))

    cdef bint sent(self, Py_ssize_t count) except -1:
        """After a write to dst of ``count`` bytes (-1: it failed): True if nothing waits."""
        if count < 0:
            self.relay.fail(self.dst)
            return False
        self.moved += count
        _counts[self.way] += count
        return not self.dst.queued

    cdef open_pipe(self):
        """A pipe of PIPE_SIZE for splicing; if the kernel refuses one, copy instead, for good."""
        cdef int fds[2]
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            self.can_splice = False
            return
        if fcntl(fds[1], F_SETPIPE_SZ, C_PIPE_SIZE) < 0:
            close(fds[0])
            close(fds[1])
            self.can_splice = False
            return
        self.pipe_r = fds[0]
        self.pipe_w = fds[1]

    cpdef release(self):
        if self.pipe_w >= 0:
            close(self.pipe_r)
            close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


cdef class Relay(Handler):
    """Join the ``client`` and ``backend`` sides both ways; then close both and call
    ``on_close()`` (attributes in fastsni/_engine.pxd)."""

    def __init__(self, Reactor reactor, Side client, Side backend, on_close, on_backend_error=None):
        self.setup(reactor, client, backend, on_close, on_backend_error)

    cdef setup(self, Reactor reactor, Side client, Side backend, on_close, on_backend_error):
        """__init__'s work, which new_relay() does without a Python call."""
        self.reactor = reactor
        self.client = client
        self.backend = backend
        self.on_close = on_close
        self.on_backend_error = on_backend_error
        self.closed = False
        self.upstream = Flow.__new__(Flow)
        self.upstream.setup(self, client, backend, True)
        self.downstream = Flow.__new__(Flow)
        self.downstream.setup(self, backend, client, False)
        reactor.handlers[client.fd] = self
        reactor.add(backend.fd, self)
        self.upstream.pump()
        if not self.closed:
            self.downstream.pump()

    cpdef ready(self, int fd, unsigned int events):
        """Events on one side: first move what it sends, then what it may now take."""
        cdef Flow first, second
        if fd == self.client.fd:
            self.client.saw(events)
            first, second = self.upstream, self.downstream
        else:
            self.backend.saw(events)
            first, second = self.downstream, self.upstream
        first.pump()
        if not self.closed:
            second.pump()

    cpdef finished(self, Flow flow):
        """``flow``'s source sent EOF and all of it is out: shut its destination's
        writing side, or close both if the other direction is done too."""
        if self.closed:
            return
        cdef Flow other = self.downstream if flow is self.upstream else self.upstream
        if other.done:
            self.close()
        else:
            shutdown(flow.dst.fd, SHUT_WR)

    cdef fail(self, Side side):
        """A read or write on ``side`` failed (its errno in ``side.error``): close both."""
        if side is self.backend and self.on_backend_error is not None and not self.closed:
            self.on_backend_error(side.error)
        self.close()

    cpdef close(self):
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


cdef Side new_side(Reactor reactor, int fd):
    """Side(reactor, fd) for the compiled proxies, without a Python call."""
    cdef Side side = Side.__new__(Side)
    side.setup(reactor, fd)
    return side


cdef Relay new_relay(Reactor reactor, Side client, Side backend, on_close, on_backend_error):
    """Relay(...) for the compiled proxies, without a Python call."""
    cdef Relay relay = Relay.__new__(Relay)
    relay.setup(reactor, client, backend, on_close, on_backend_error)
    return relay
