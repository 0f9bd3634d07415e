# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A compiled twin of :class:`millpond.pool.stats.PyHistogramBase`.

Every lease records one or two durations (time in use; time waited, when it waited),
so :meth:`record` runs on every release and every hand-off, in the library pool and
in the proxy. In Python it is some seventy bytecodes; here it is a few nanoseconds.
The pure-Python class in stats.py stays the reference: the tests hold the two to the
same buckets, counts, sums and maxima. Built when a C compiler is there; millpond
runs without it.
"""

from array import array


cdef extern from *:
    int clzll "__builtin_clzll"(unsigned long long x) nogil

cdef enum:
    SUB = 4  # buckets per power of two (stats._SUB)
    NBUCKETS = 37 * 4  # stats._NBUCKETS


cdef class HistogramBase:
    """count, sum, max and log buckets (4 per power of two of microseconds)."""

    cdef readonly object buckets  # array("Q"): what snapshots read (record writes via _view)
    cdef public long long count
    cdef public double sum
    cdef public double max
    cdef unsigned long long[::1] _view

    def __init__(self):
        self.buckets = array("Q", bytes(8 * NBUCKETS))
        self._view = self.buckets
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, double seconds):
        cdef long long us
        cdef int bits, idx
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds
        # Past the last bucket (2**36 us), or too large for a long long, or not a number:
        # the last bucket, as the Python version's arithmetic ends up there too.
        if not (seconds < 1e12):
            self._view[NBUCKETS - 1] += 1
            return
        us = <long long>(seconds * 1000000.0)  # truncates toward zero, as int() does
        if us < SUB:
            self._view[us if us > 0 else 0] += 1
            return
        bits = 64 - clzll(<unsigned long long>us)
        idx = (bits - 2) * SUB + <int>((us >> (bits - 3)) & (SUB - 1))
        self._view[idx if idx < NBUCKETS else NBUCKETS - 1] += 1
