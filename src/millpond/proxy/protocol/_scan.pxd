# What other compiled modules share with _scan.pyx (the lane cimports these).

cdef inline Py_ssize_t _length_at(const unsigned char* p) noexcept nogil:
    """A message's length field (big-endian, the 4 bytes after its type byte)."""
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | p[3]

cdef bint _hint(const unsigned char* p, Py_ssize_t n) noexcept nogil
