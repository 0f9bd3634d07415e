# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled lane: a linked client/server pair's messages forwarded in C.

Stage 1 of docs/proxy-data-path.md. uvloop keeps owning every socket; a pair of sockets
*enters* the lane (their transports have stopped reading, their write buffers are empty)
and the lane watches both with its own epoll set, registered once with the event loop:
one Python call per wake-up, then recv() and send() in C for every ready socket.

The lane forwards complete messages untouched, of the types it was told it may forward
in each direction, and leaves everything else to the Python path: at the first message
it may not forward (a type not on its list, a Query its ``query_ok`` check refuses, a
message longer than ``max_message``, a bad length), after a server message that ends
its work (``end_types``: ReadyForQuery by default), at end of file or a socket error,
or when a write would block, it *ejects* the pair. Ejecting unregisters both sockets
and calls ``on_eject`` once with, for each side, the bytes read from it and not
forwarded (to feed to its protocol's ``data_received``) and the bytes owed to it (to
write to its transport first, before anything else), so that not a byte is lost or
reordered. The lane never guesses: when in doubt it ejects.

Not used by the proxy yet (stage 1 wires it in); the proxy runs without it when the
extension is not built.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno


cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data:
        void *ptr
        int fd

    cdef struct epoll_event:
        unsigned int events
        epoll_data data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT


cdef extern from "<unistd.h>" nogil:
    int close(int fd)


cdef enum:
    READ_SIZE = 65536
    MAX_EVENTS = 128

cdef unsigned char read_buf[READ_SIZE]
cdef epoll_event ready_events[MAX_EVENTS]

# why a pair left the lane (the reason passed to on_eject)
END = "end"  # a server message in end_types was forwarded
REFUSED = "refused"  # a message the lane may not forward
EOF = "eof"
ERROR = "error"  # a socket error on read or write
BLOCKED = "blocked"  # a write would have blocked
ASKED = "asked"  # Lane.eject() or Lane.close()


cdef inline Py_ssize_t _length_at(const unsigned char *p) noexcept nogil:
    return (<Py_ssize_t>p[0] << 24) | (<Py_ssize_t>p[1] << 16) | (<Py_ssize_t>p[2] << 8) | p[3]


cdef Py_ssize_t _send_all(int fd, const unsigned char *data, Py_ssize_t size) noexcept nogil:
    """Bytes sent, until done or the socket would block; -1 on an error."""
    cdef Py_ssize_t done = 0
    cdef ssize_t sent
    while done < size:
        sent = send(fd, data + done, size - done, MSG_NOSIGNAL | MSG_DONTWAIT)
        if sent < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return done
            return -1
        done += sent
    return done


cdef class Side:
    """One socket of a pair in the lane."""

    cdef readonly int fd
    cdef readonly object owner
    cdef readonly bint server
    cdef readonly bint active
    cdef readonly long long bytes_forwarded
    cdef readonly long long messages_forwarded
    cdef Side peer
    cdef bytearray pending  # the start of a message not yet complete

    def __repr__(self):
        role = "server" if self.server else "client"
        state = "in the lane" if self.active else "ejected"
        return f"<lane {role} side fd={self.fd} {state}>"


cdef class Lane:
    """An epoll set on the event loop that forwards linked pairs' messages in C."""

    cdef int epfd
    cdef object loop
    cdef object on_eject
    cdef object query_ok
    cdef Py_ssize_t max_message
    cdef bint client_ok[256]
    cdef bint server_ok[256]
    cdef bint ends[256]
    cdef set members  # the active sides: epoll holds borrowed pointers to them
    cdef list ejected  # sides ejected during this wake-up, kept alive until its end
    cdef readonly bint closed
    cdef readonly long long wakeups

    def __cinit__(
        self,
        loop,
        on_eject,
        bytes client_types,
        bytes server_types,
        *,
        bytes end_types=b"Z",
        query_ok=None,
        Py_ssize_t max_message=65536,
    ):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.loop = loop
        self.on_eject = on_eject
        self.query_ok = query_ok
        self.max_message = max_message
        self.members = set()
        self.ejected = []
        cdef unsigned char kind
        for kind in client_types:
            self.client_ok[kind] = True
        for kind in server_types:
            self.server_ok[kind] = True
        for kind in end_types:
            self.ends[kind] = True
        loop.add_reader(self.epfd, self.on_ready)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    def __len__(self):
        return len(self.members)

    def enter(self, client_owner, int client_fd, server_owner, int server_fd):
        """Watch a linked pair; their transports must have stopped reading, and have
        nothing buffered to write. Returns the (client, server) sides."""
        if self.closed:
            raise RuntimeError("the lane is closed")
        client = self._side(client_owner, client_fd, False)
        server = self._side(server_owner, server_fd, True)
        client.peer, server.peer = server, client
        self._watch(client)
        try:
            self._watch(server)
        except OSError:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, client.fd, NULL)
            self.members.discard(client)
            client.active = False
            raise
        return client, server

    def eject(self, Side side not None, str reason=ASKED):
        """Take ``side``'s pair out of the lane now (on_eject is called), if it is in."""
        if side.active:
            self._eject(side, b"", b"", reason)

    def close(self):
        """Eject every pair, and leave the event loop."""
        if self.closed:
            return
        self.closed = True
        for side in list(self.members):
            if (<Side>side).active:
                self._eject(side, b"", b"", ASKED)
        self.ejected.clear()
        self.loop.remove_reader(self.epfd)
        close(self.epfd)
        self.epfd = -1

    cdef Side _side(self, owner, int fd, bint server):
        cdef Side side = Side.__new__(Side)
        side.fd = fd
        side.owner = owner
        side.server = server
        return side

    cdef _watch(self, Side side):
        cdef epoll_event event
        event.events = EPOLLIN
        event.data.ptr = <void *>side
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, side.fd, &event) < 0:
            raise OSError(errno, f"cannot watch fd {side.fd}")
        side.active = True
        self.members.add(side)

    def on_ready(self):
        """The event loop's reader callback: serve every socket that is ready."""
        cdef int count = epoll_wait(self.epfd, ready_events, MAX_EVENTS, 0)
        cdef int i
        cdef Side side
        self.wakeups += 1
        try:
            for i in range(count):
                side = <Side>ready_events[i].data.ptr
                if side.active:  # not ejected earlier in this wake-up
                    self._serve(side)
        finally:
            self.ejected.clear()

    cdef _serve(self, Side side):
        cdef ssize_t got = recv(side.fd, read_buf, READ_SIZE, 0)
        cdef const unsigned char *data = read_buf
        cdef Py_ssize_t size, pos = 0, length, count = 0, sent
        cdef unsigned char kind
        cdef bint *allowed = &self.client_ok[0]
        cdef object reason = None
        cdef bytearray pending = side.pending
        if side.server:
            allowed = &self.server_ok[0]
        if got < 0:
            if errno != EAGAIN and errno != EINTR:
                self._eject(side, b"", b"", ERROR)
            return
        if got == 0:  # the transport sees the end of file again once it reads
            self._eject(side, b"", b"", EOF)
            return
        size = got
        if pending is not None:
            pending.extend(read_buf[:got])
            data = pending
            size = len(pending)
        while pos + 5 <= size:
            kind = data[pos]
            length = _length_at(data + pos + 1)
            if length < 4 or length + 1 > self.max_message or not allowed[kind]:
                reason = REFUSED
                break
            if pos + 1 + length > size:
                break  # incomplete: wait for the rest
            if kind == 81 and not side.server and self.query_ok is not None:  # 'Q'
                if not self.query_ok(PyBytes_FromStringAndSize(<char *>data + pos + 5, length - 4)):
                    reason = REFUSED
                    break
            pos += 1 + length
            count += 1
            if side.server and self.ends[kind]:
                reason = END
                break
        if pos:
            sent = _send_all(side.peer.fd, data, pos)
            side.bytes_forwarded += pos
            side.messages_forwarded += count
            if sent != pos:
                unsent = PyBytes_FromStringAndSize(<char *>data + max(sent, 0), pos - max(sent, 0))
                rest = PyBytes_FromStringAndSize(<char *>data + pos, size - pos)
                side.pending = None
                self._eject(side, rest, unsent, ERROR if sent < 0 else BLOCKED)
                return
        if reason is not None:
            rest = PyBytes_FromStringAndSize(<char *>data + pos, size - pos)
            side.pending = None
            self._eject(side, rest, b"", reason)
        elif pos == size:
            side.pending = None
        elif pending is None:
            side.pending = bytearray(read_buf[pos:size])
        else:
            del pending[:pos]

    cdef _eject(self, Side side, bytes unread, bytes owed_to_peer, str reason):
        """Both sides out of the lane; on_eject gets what each side is owed."""
        cdef Side peer = side.peer
        cdef Side s
        if side.pending is not None:  # read before an end of file or an error
            unread = bytes(side.pending) + unread
            side.pending = None
        for s in (side, peer):
            if s.active:
                s.active = False
                if self.epfd >= 0:
                    epoll_ctl(self.epfd, EPOLL_CTL_DEL, s.fd, NULL)
                self.members.discard(s)
                self.ejected.append(s)
        if peer.pending is not None:
            peer_unread = bytes(peer.pending)
            peer.pending = None
        else:
            peer_unread = b""
        if side.server:
            self.on_eject(peer.owner, peer_unread, owed_to_peer, side.owner, unread, b"", reason)
        else:
            self.on_eject(side.owner, unread, b"", peer.owner, peer_unread, owed_to_peer, reason)
