# cython: language_level=3
"""Compiled twin of fastsni/relay.py: the two-way relay.

The helpers that run once per connection outside the byte pump (backend connect,
PROXY header, log formatting) are the pure module's, imported, not copied.
"""

from fastsni.relay import (
    HIGH_WATER,
    client_ip,
    connect_backend,
    describe,
    errno_name,
    proxy_v1_header,
)

cdef extern from "sys/socket.h":
    int shutdown(int fd, int how) nogil
    enum: SHUT_WR

# Client transports with a connection open, for the graceful drain on SIGHUP.
LIVE = set()
cdef set _LIVE = LIVE
cdef Py_ssize_t C_HIGH_WATER = HIGH_WATER


def shutdown_write(transport):
    """shutdown(SHUT_WR) on the transport's socket, behind the event loop's back."""
    shutdown(transport.get_extra_info("socket").fileno(), SHUT_WR)


cdef class Side:
    """One end of a relay: bytes read here are written to ``peer``."""

    cdef public object transport
    cdef public Side peer
    cdef public bytes greeting
    cdef public bint eof
    cdef public bint shut_pending
    cdef public bint closed

    def __init__(self, Side peer=None, bytes greeting=b""):
        self.transport = None
        self.peer = peer
        self.greeting = greeting
        self.eof = False
        self.shut_pending = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(C_HIGH_WATER)
        cdef Side peer = self.peer
        if peer is None:
            return
        if peer.closed:
            transport.close()
            return
        peer.peer = self
        if self.greeting:
            transport.write(self.greeting)
            self.greeting = b""
        peer.transport.resume_reading()

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        self.eof = True
        cdef Side peer = self.peer
        if peer.eof:
            self.transport.close()
            peer.transport.close()
        else:
            peer.shut_write()
        return True

    cpdef shut_write(self):
        transport = self.transport
        if transport.get_write_buffer_size() == 0:
            shutdown_write(transport)
        else:
            self.shut_pending = True
            transport.set_write_buffer_limits(0, 0)

    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.shut_pending:
            self.shut_pending = False
            if not self.transport.is_closing():
                shutdown_write(self.transport)
        else:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        self.closed = True
        _LIVE.discard(self.transport)
        cdef Side peer = self.peer
        if peer is not None and not peer.closed and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()


def take_over(transport):
    """Make an open, paused client transport one end of a relay."""
    cdef Side side = Side()
    side.transport = transport
    transport.set_protocol(side)
    transport.set_write_buffer_limits(C_HIGH_WATER)
    return side
