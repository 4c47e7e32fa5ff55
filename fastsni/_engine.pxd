# What the other compiled twins (pyx/_proxy.pyx, pyx/_http.pyx) cimport from fastsni._engine,
# whose code is pyx/_engine.pyx.  It lives beside the module it declares, where Cython looks
# for ``fastsni/_engine.pxd``; the classes' attributes are declared here, not in the .pyx.

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline double _monotonic() noexcept:
    """time.monotonic() at C cost, for every compiled twin."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef bint no_owner_log(str name, double now) except -1
cdef int connect_fd(str name, str leaf, int* version, unsigned long long identity[2]) except -1


cdef extern from "<sys/epoll.h>":
    ctypedef union epoll_data_t:
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data

cdef enum:
    C_MAX_EVENTS = 256


cdef class Handler:
    cpdef ready(self, int fd, unsigned int events)


cdef class Timer:
    cdef public double when
    cdef public object callback
    cdef public tuple args

    cpdef cancel(self)
    cpdef fire(self)


cdef class Reactor(Handler):
    cdef public int epoll
    cdef public dict handlers
    cdef public set writers
    cdef public list again
    cdef public dict timers
    cdef public double earliest
    cdef public dict signals
    cdef public int wakeup
    cdef public bint stopping
    cdef epoll_event events[C_MAX_EVENTS]

    cpdef add(self, int fd, Handler handler, unsigned int events=*)
    cpdef remove(self, int fd)
    cpdef want_write(self, int fd)
    cpdef close(self, int fd)
    cpdef dispatch(self, double timeout=*)
    cdef later(self, flow)
    cpdef run_again(self)
    cdef Timer schedule(self, double delay, callback, tuple args)
    cpdef double next_timeout(self)
    cpdef run_timers(self)


cdef class Service:
    cdef public object start
    cdef public int family
    cdef public dict live
    cdef public Reactor reactor
    cdef public Listener listener
    cdef public bytes refusal
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t pressure_above
    cdef public Py_ssize_t pressure_below
    cdef public object sources
    cdef public dict owners
    cdef public bint refusing_logged
    cdef public bint shedding_logged

    cpdef closed(self, connection)
    cdef released(self, connection)


cdef class Listener(Handler):
    cdef public Reactor reactor
    cdef public object sock
    cdef public int fd
    cdef public object on_accept
    cdef public object on_full
    cdef public bint accepting
    cdef public bint closed
    cdef public object retry
    cdef public bint starved
    cdef public bint counted

    cpdef int waiting(self)
    cpdef accept(self)
    cpdef descriptor_freed(self)


cdef class Side:
    cdef public Reactor reactor
    cdef public int fd
    cdef public bytes queued
    cdef public bint readable
    cdef public bint closing
    cdef public bint shut
    cdef public bint ended
    cdef public bint writable
    cdef public int error

    cdef setup(self, Reactor reactor, int fd)
    cpdef saw(self, unsigned int events)
    cdef Py_ssize_t recv(self, Py_ssize_t size) noexcept
    cpdef read(self, Py_ssize_t size=*)
    cpdef Py_ssize_t send(self, bytes data) except -2
    cpdef Py_ssize_t flush(self) except -2
    cpdef Py_ssize_t write(self, bytes data) except -2
    cdef Py_ssize_t write_from(self, const char* data, Py_ssize_t size) except -2
    cpdef wait_writable(self)


cdef Side new_side(Reactor reactor, int fd)


cdef class Flow:
    cdef public Relay relay
    cdef public Side src
    cdef public Side dst
    cdef public int pipe_r
    cdef public int pipe_w
    cdef public Py_ssize_t piped
    cdef public bint can_splice
    cdef public bint eof
    cdef public bint done
    cdef public int way  # UP or DOWN: towards the backend or the client, for _counts
    cdef public unsigned long long moved  # bytes written to dst, for the owner's log (Relay.up, .down)

    cdef setup(self, Relay relay, Side src, Side dst, bint upward)
    cpdef pump(self)
    cdef bint copy(self) except -1
    cdef bint splice(self) except -1
    cdef bint flush(self) except -1
    cpdef bint send(self, bytes data) except -1
    cdef bint sent(self, Py_ssize_t count) except -1
    cdef open_pipe(self)
    cpdef release(self)


cdef class Relay(Handler):
    cdef public Reactor reactor
    cdef public Side client
    cdef public Side backend
    cdef public object on_close
    cdef public object on_backend_error
    cdef public bint closed
    cdef public Flow upstream
    cdef public Flow downstream
    cdef public unsigned long long up, down  # bytes relayed each way, once closed

    cdef setup(self, Reactor reactor, Side client, Side backend, on_close, on_backend_error)
    cpdef finished(self, Flow flow)
    cdef fail(self, Side side)
    cpdef close(self)


cdef Relay new_relay(Reactor reactor, Side client, Side backend, on_close, on_backend_error)
