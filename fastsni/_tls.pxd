# What pyx/_proxy.pyx cimports from fastsni._tls, whose code is pyx/_tls.pyx: the
# HelloReader, its attributes declared here, so that its methods are C calls.

cdef class HelloReader:
    cdef public bytearray received
    cdef public Py_ssize_t record_at
    cdef public bytearray handshake
    cdef public Py_ssize_t hello_end
    cdef public int field
    cdef public Py_ssize_t at

    cpdef object feed(self, data)
    cdef object _handshake(self)
    cdef object _walk(self)
    cpdef int marks(self)
