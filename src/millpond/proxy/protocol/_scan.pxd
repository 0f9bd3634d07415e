# The C functions of _scan.pyx that other compiled modules call directly (the lane).

cdef bint _hint(const unsigned char* p, Py_ssize_t n) noexcept nogil
