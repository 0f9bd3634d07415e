# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twins of the framing walk in :mod:`millpond.proxy.protocol.codec`.

The proxy walks the 5-byte header of every message it forwards, in both directions;
in Python that loop is a good part of its cost per transaction. These functions do
the same walk in C with the same results and the same errors (the pure-Python
versions in codec.py stay the reference, and the tests hold the two to each other).
Built when a C compiler is there; millpond runs without it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memset

cdef object _bad_length = None
cdef object _bad_ready = None
cdef tuple _STATUS = (b"I", b"T", b"E")


def set_error_factories(bad_length, bad_ready):
    """codec.py's ProtocolError builders, so the errors read the same as its own."""
    global _bad_length, _bad_ready
    _bad_length = bad_length
    _bad_ready = bad_ready


cdef tuple _walk(const unsigned char* buf, Py_ssize_t end, Py_ssize_t start,
                 Py_ssize_t limit, const unsigned char* stop, Py_ssize_t nstop):
    cdef Py_ssize_t pos = start, last = start, ready = -1, length, count = 0, i
    cdef unsigned char kind
    cdef unsigned char small[64]
    cdef bytearray many = None
    cdef object status = None
    while pos + 5 <= end:
        length = _length_at(buf + pos + 1)
        if length < 4 or length > limit:
            raise _bad_length(buf[pos], length, limit)
        if pos + 1 + length > end:
            break
        kind = buf[pos]
        if count < 64:
            small[count] = kind
        else:
            if many is None:
                many = bytearray((<char*>small)[:64])
            many.append(kind)
        count += 1
        if kind == 90:  # 'Z'
            ready = pos
        last = pos
        pos += 1 + length
        for i in range(nstop):
            if kind == stop[i]:
                end = pos  # stop after this message
                break
    if ready >= 0:
        length = _length_at(buf + ready + 1)
        kind = buf[ready + 5] if length == 5 else 0  # the message is complete
        if kind == 73:  # 'I'
            status = _STATUS[0]
        elif kind == 84:  # 'T'
            status = _STATUS[1]
        elif kind == 69:  # 'E'
            status = _STATUS[2]
        else:
            raise _bad_ready((<const char*>buf)[ready:ready + 1 + length], 0)
    types = PyBytes_FromStringAndSize(<char*>small, count) if many is None else bytes(many)
    return (pos - start, types, last - start, status)


cdef tuple _walk_object(object buf, Py_ssize_t start, Py_ssize_t limit, bytes stop):
    """_walk over any buffer: bytes directly, anything else through the buffer protocol."""
    cdef Py_buffer view
    if type(buf) is bytes:
        return _walk(<const unsigned char*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf),
                     start, limit, <const unsigned char*>PyBytes_AS_STRING(stop),
                     PyBytes_GET_SIZE(stop))
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _walk(<const unsigned char*>view.buf, view.len, start, limit,
                     <const unsigned char*>PyBytes_AS_STRING(stop), PyBytes_GET_SIZE(stop))
    finally:
        PyBuffer_Release(&view)


def walk(object buf, Py_ssize_t start, Py_ssize_t limit, bytes stop):
    """``(length, types, last_offset, ready_status)`` of the complete messages of
    ``buf`` from ``start``: codec._walk, compiled."""
    return _walk_object(buf, start, limit, stop)


def whole(object data, Py_ssize_t limit, bytes stop):
    """``(types, last_offset, ready_status)`` if the walk of ``data`` from 0 covers all
    of it (whole messages), else None: codec._whole, compiled."""
    cdef tuple found = _walk_object(data, 0, limit, stop)
    if <Py_ssize_t>found[0] != len(data):
        return None
    return (found[1], found[2], found[3])


def names_statements(bytes data):
    """Does any of the whole client messages in ``data`` name a prepared statement
    (Parse, Bind, or Describe/Close of a statement)? codec.names_statements, compiled."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data), pos = 0, length, i, stop
    cdef unsigned char kind
    while pos + 5 <= end:
        kind = p[pos]
        length = _length_at(p + pos + 1)
        stop = pos + 1 + length
        if length < 4 or stop > end:
            return True  # not whole messages: let the careful path look
        if kind == 80:  # 'P': the statement name comes first
            if length < 5 or p[pos + 5] != 0:
                return True
        elif kind == 66:  # 'B': the portal name, then the statement name
            i = pos + 5
            while i < stop and p[i] != 0:
                i += 1
            if i + 1 >= stop or p[i + 1] != 0:
                return True
        elif kind == 68 or kind == 67:  # 'D', 'C': b'S' or b'P', then the name
            if length < 6 or (p[pos + 5] == 83 and p[pos + 6] != 0):
                return True
        pos = stop
    return pos != end


# -- session-state hint ---------------------------------------------------------------

cdef bint _word_char[256]  # ASCII letters, digits and the underscore
for _c in range(256):
    _word_char[_c] = chr(_c).isascii() and (chr(_c).isalnum() or _c == 95)


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef tuple _WORDS = ()  # keeps the bytes alive that _word_at points into
cdef tuple _PREFIXES = ()
cdef const unsigned char* _word_at[64]
cdef Py_ssize_t _word_len[64]
cdef Py_ssize_t _nwords = 0, _nprefixes = 0
# a quick no for almost every word: is there a word of this length (0: 64 or more)
# starting with this letter, or a prefix starting with it (and how short is the shortest)?
cdef bint _word_start[64][256]
cdef bint _prefix_start[256]
cdef Py_ssize_t _shortest_prefix = 1 << 30


def set_hint_words(words, prefixes):
    """The words (then word prefixes) of session.hint's pattern, in lower case."""
    global _WORDS, _PREFIXES, _nwords, _nprefixes
    words, prefixes = tuple(words), tuple(prefixes)
    if len(words) + len(prefixes) > 64:
        raise ValueError("at most 64 words and prefixes")
    global _shortest_prefix
    if not all(w and w == w.lower() for w in words + prefixes):
        raise ValueError("the words and prefixes must be in lower case (and not empty)")
    _WORDS, _PREFIXES = words, prefixes
    for i, w in enumerate(words + prefixes):
        _word_at[i] = <const unsigned char*>PyBytes_AS_STRING(w)
        _word_len[i] = PyBytes_GET_SIZE(w)
    _nwords, _nprefixes = len(words), len(prefixes)
    memset(_word_start, 0, sizeof(_word_start))
    memset(_prefix_start, 0, sizeof(_prefix_start))
    _shortest_prefix = 1 << 30
    for w in words:
        _word_start[len(w) % 64][w[0]] = True
    for w in prefixes:
        _prefix_start[w[0]] = True
        _shortest_prefix = min(_shortest_prefix, len(w))


cdef bint _listed(const unsigned char* low, Py_ssize_t size, bint whole) noexcept nogil:
    cdef Py_ssize_t k
    if whole:
        for k in range(_nwords):
            if _word_len[k] == size and memcmp(_word_at[k], low, size) == 0:
                return True
    for k in range(_nwords, _nwords + _nprefixes):
        if _word_len[k] <= size and memcmp(_word_at[k], low, _word_len[k]) == 0:
            return True
    return False


def hint(object data):
    """session.hint, compiled: is any whole word of ``data`` (a run of ASCII letters,
    digits and underscores, in lower case) one of the words, or does it start with
    one of the prefixes, given to set_hint_words?"""
    cdef Py_buffer view
    cdef bint found
    if type(data) is bytes:
        return _hint(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    found = _hint(<const unsigned char*>view.buf, view.len)
    PyBuffer_Release(&view)
    return found


cdef bint _hint(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0, start, j, size
    cdef unsigned char low[64]
    cdef unsigned char first
    while i < n:
        if not _word_char[p[i]]:
            i += 1
            continue
        start = i
        while i < n and _word_char[p[i]]:
            i += 1
        first = _lower(p[start])
        if not _word_start[(i - start) % 64][first] and not (
            _prefix_start[first] and i - start >= _shortest_prefix
        ):
            continue  # no word or prefix of its length and first letter: most words
        size = i - start if i - start < 64 else 64  # longer: only a prefix can match
        for j in range(size):
            low[j] = _lower(p[start + j])
        if _listed(low, size, i - start == size):
            return True
    return False
