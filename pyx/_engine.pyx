# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of fastsni/engine.py: accepting and the two-way relay, on descriptors.

Function for function the pure module, with the system calls made directly: no
socket objects, and no Python object per relayed chunk unless the other side is
slow (then the unsent rest waits as bytes).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport memcpy, strlen
from posix.fcntl cimport O_CLOEXEC, O_DIRECTORY, open as c_open
from posix.unistd cimport close, read, write

import os

from fastsni.engine import ACCEPT_BATCH, CHUNK, OUT_OF_DESCRIPTORS, RESUME_ACCEPT_AFTER, SUN_PATH_MAX

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t length)
    int accept4(int fd, sockaddr* addr, socklen_t* length, int flags)
    int shutdown(int fd, int how)
    enum:
        AF_UNIX
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_WR

cdef extern from "<sys/un.h>":
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]

cdef extern from "<fcntl.h>":
    enum:
        O_PATH
        AT_FDCWD
        AT_SYMLINK_NOFOLLOW

cdef extern from "<sys/stat.h>":
    struct stat:
        pass
    int fstatat(int dirfd, const char* path, stat* buf, int flags)

cdef enum:
    C_CHUNK = 128 * 1024

assert CHUNK == C_CHUNK
cdef int C_ACCEPT_BATCH = ACCEPT_BATCH
cdef Py_ssize_t C_SUN_PATH_MAX = SUN_PATH_MAX
cdef char _buffer[C_CHUNK]  # every relay reads into this one buffer: the loop is single-threaded


cdef inline bint _retry(int err) noexcept:
    return err == EAGAIN or err == EINTR  # EWOULDBLOCK is EAGAIN on Linux


cdef object _oserror(int err):
    return OSError(err, os.strerror(err))


cdef int _connect_path(int fd, bytes path) except -1:
    cdef sockaddr_un address
    cdef Py_ssize_t length = PyBytes_GET_SIZE(path)
    address.sun_family = AF_UNIX
    memcpy(address.sun_path, PyBytes_AS_STRING(path), length + 1)
    if connect(fd, <sockaddr*>&address, <socklen_t>(sizeof(sa_family_t) + length + 1)) < 0:
        raise _oserror(errno)
    return 0


def connect_backend(str name, str leaf):
    """Connect to ``<name>/<leaf>`` under the current directory, looked up afresh."""
    cdef stat status
    cdef int dirfd
    cdef bint send_proxy
    cdef bytes path = f"{name}/{leaf}".encode("ascii")
    cdef int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        raise _oserror(errno)
    try:
        if PyBytes_GET_SIZE(path) <= C_SUN_PATH_MAX:
            _connect_path(fd, path)
            marker = f"{name}/send-proxy-v1".encode("ascii")
            send_proxy = fstatat(AT_FDCWD, marker, &status, AT_SYMLINK_NOFOLLOW) == 0
            return fd, send_proxy
        dirfd = c_open(name.encode("ascii"), O_PATH | O_DIRECTORY | O_CLOEXEC)
        if dirfd < 0:
            raise _oserror(errno)
        try:
            _connect_path(fd, f"/proc/self/fd/{dirfd}/{leaf}".encode("ascii"))
            send_proxy = fstatat(dirfd, b"send-proxy-v1", &status, AT_SYMLINK_NOFOLLOW) == 0
            return fd, send_proxy
        finally:
            close(dirfd)
    except BaseException:
        close(fd)
        raise


def shutdown_write(int fd):
    """shutdown(fd, SHUT_WR); errors are left for the next read or write to report."""
    shutdown(fd, SHUT_WR)


cdef class Service:
    """One proxy process: its listener and the connections still open."""

    cdef public object loop
    cdef public object start
    cdef public set live
    cdef public Listener listener

    def __init__(self, loop, sock, start):
        self.loop = loop
        self.start = start
        self.live = set()
        self.listener = Listener(loop, sock, self.accepted)

    def accepted(self, int fd):
        self.live.add(self.start(self, fd))

    cpdef closed(self, connection):
        self.live.discard(connection)
        self.listener.descriptor_freed()


cdef class Listener:
    """Accept from a listening socket; ``on_accept(fd)`` gets each non-blocking descriptor."""

    cdef public object loop
    cdef public object sock
    cdef public object on_accept
    cdef public bint accepting
    cdef public bint closed
    cdef public object retry
    cdef int fd

    def __init__(self, loop, sock, on_accept):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_accept = on_accept
        self.accepting = False
        self.closed = False
        self.retry = None

    def start(self):
        if not self.accepting and not self.closed:
            self.accepting = True
            self.loop.add_reader(self.fd, self.accept)

    def accept(self):
        cdef int i, fd, err
        for i in range(C_ACCEPT_BATCH):
            fd = accept4(self.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if _retry(err):
                    return
                if err in OUT_OF_DESCRIPTORS:
                    self.pause()
                    return
                continue
            self.on_accept(fd)

    def pause(self):
        """Out of descriptors: stop until one is freed (descriptor_freed) or a second passes."""
        self.loop.remove_reader(self.fd)
        self.accepting = False
        self.retry = self.loop.call_later(RESUME_ACCEPT_AFTER, self.start)

    cpdef descriptor_freed(self):
        if not self.accepting and not self.closed:
            self.retry.cancel()
            self.start()

    def close(self):
        """Stop accepting and close this process's copy of the listening socket."""
        if self.accepting:
            self.loop.remove_reader(self.fd)
        if self.retry is not None:
            self.retry.cancel()
        self.accepting = False
        self.closed = True
        self.sock.close()


cdef class Flow:
    """One direction of a relay: read ``src``, write ``dst``."""

    cdef public Relay relay
    cdef public int src
    cdef public int dst
    cdef public bytes pending
    cdef public bint eof

    def __init__(self, Relay relay, int src, int dst):
        self.relay = relay
        self.src = src
        self.dst = dst
        self.pending = b""
        self.eof = False

    def readable(self):
        cdef ssize_t got = read(self.src, _buffer, C_CHUNK)
        if got < 0:
            if not _retry(errno):
                self.relay.close()
            return
        if got > 0:
            self._send(_buffer, got)
            return
        self.eof = True
        self.relay.loop.remove_reader(self.src)
        self.finish()

    def send(self, bytes data):
        """Write ``data`` to dst; what dst does not take yet waits, and src is not read meanwhile."""
        self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef _send(self, const char* data, Py_ssize_t size):
        cdef ssize_t sent = write(self.dst, data, size)
        if sent < 0:
            if not _retry(errno):
                self.relay.close()
                return
            sent = 0
        if sent < size:
            self.pending = PyBytes_FromStringAndSize(data + sent, size - sent)
            loop = self.relay.loop
            if not self.eof:
                loop.remove_reader(self.src)
            loop.add_writer(self.dst, self.writable)

    def writable(self):
        cdef Py_ssize_t size = PyBytes_GET_SIZE(self.pending)
        cdef ssize_t sent = write(self.dst, PyBytes_AS_STRING(self.pending), size)
        if sent < 0:
            if not _retry(errno):
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

    cpdef finish(self):
        """src sent EOF: once its bytes are out, shut dst's writing side; both done: close."""
        if self.pending:
            return
        if self.relay.done():
            self.relay.close()
        else:
            shutdown(self.dst, SHUT_WR)


cdef class Relay:
    """Join ``client`` and ``backend`` both ways; then close both and call ``on_close()``."""

    cdef public object loop
    cdef public int client
    cdef public int backend
    cdef public object on_close
    cdef public bint closed
    cdef public Flow upstream
    cdef public Flow downstream

    def __init__(self, loop, int client, int backend, bytes to_backend, bytes to_client, on_close):
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

    cpdef bint done(self):
        cdef Flow up = self.upstream, down = self.downstream
        return up.eof and down.eof and not up.pending and not down.pending

    cpdef close(self):
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        for fd in (self.client, self.backend):
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            close(fd)
        self.on_close()
