# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled lane: transaction pooling's query cycle, in C.

docs/proxy-data-path.md has the why and the plan. uvloop keeps owning every socket; a
socket *enters* the lane (its transport has stopped reading and has nothing buffered to
write) and the lane watches it with its own epoll set, registered once with the event
loop: one Python call per wake-up, then recv() and send() in C for every ready socket.

What enters: idle clients (``add_client``), idle server connections lent to the lane
(``add_server``: its free list), and pairs linked in the middle of a transaction
(``enter``). The lane runs transaction pooling's cycle for them: a client's complete
requests take a free server (or queue for one, first come first served), are forwarded
untouched, and the server's responses go back untouched; a ReadyForQuery that answers
the last request outstanding and says idle ends the transaction, and the server goes to
the next queued client or back on the free list.

It forwards only complete messages of the types it was told it may forward in each
direction, and leaves everything else to the Python path: at the first message it may
not forward (a type not on its list, a Query that may touch session state when
``session_check`` is on (the session tracker's own first look, in C) or that its
``query_ok`` check refuses, a message longer than ``max_message``, a bad length, a
ReadyForQuery nobody asked for), at end of file or a socket error, when a write would
block, or for data from an idle server, it *ejects* the socket, with the server it is
linked to if any. Ejecting unregisters them and calls ``on_eject`` once, with for each
side the bytes read and not forwarded (to feed to its protocol's ``data_received``) and
the bytes owed to it (to write to its transport first), and the requests the server
still owes answers for; not a byte is lost or reordered. The lane never guesses: when in
doubt it ejects.

The proxy's side of it (who enters, which servers it borrows from the pool core, the
eject handler) is millpond/proxy/lane.py; the proxy runs without it when the extension
is not built or ``fast_lane = 0``.
"""

from collections import deque

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno

from millpond.proxy.protocol._scan cimport _hint, _length_at


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
        EPOLL_CTL_MOD
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


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    cdef struct timespec:
        time_t tv_sec
        long tv_nsec

    int clock_gettime(int clock, timespec *now)
    enum:
        CLOCK_MONOTONIC


cdef inline double _monotonic() noexcept nogil:
    """time.monotonic()'s clock (CLOCK_MONOTONIC on Linux), so Python can compare."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef enum:
    READ_SIZE = 65536
    MAX_EVENTS = 128

cdef unsigned char read_buf[READ_SIZE]
cdef epoll_event ready_events[MAX_EVENTS]

# why a socket left the lane (the reason passed to on_eject)
REFUSED = "refused"  # a message the lane may not forward
UNSOLICITED = "unsolicited"  # data from an idle server
EOF = "eof"
ERROR = "error"  # a socket error on read or write
BLOCKED = "blocked"  # a write would have blocked
ASKED = "asked"  # Lane.eject() or Lane.close()
RETURNED = "returned"  # an idle server given back (Lane.give_back(), or owed_back)


cdef inline Py_ssize_t _frame(const unsigned char *data, Py_ssize_t pos, Py_ssize_t size,
                              const bint *allowed, Py_ssize_t limit) noexcept nogil:
    """The size of the whole message at data[pos] (type byte included); 0 if it is not
    all here yet, -1 if the lane may not forward it (type, bad or too long a length)."""
    cdef Py_ssize_t length = _length_at(data + pos + 1)
    if length < 4 or length + 1 > limit or not allowed[data[pos]]:
        return -1
    if pos + 1 + length > size:
        return 0
    return 1 + length


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
    """One socket in the lane."""

    cdef readonly int fd
    cdef readonly object owner
    cdef readonly bint server
    cdef readonly bint active
    cdef readonly bint queued  # a client waiting for a server (its request in pending)
    cdef readonly bint muted  # a queued client that sent too much: not read until served
    cdef readonly long long outstanding  # a server's requests still to be answered
    cdef readonly long long bytes_forwarded
    cdef readonly long long messages_forwarded
    cdef readonly double last_active  # when it was last read from (time.monotonic())
    cdef readonly double queued_since  # a queued client: since when
    cdef readonly double linked_since  # a server: when its transaction began (0: idle)
    cdef readonly double busy_since  # a server: since when it owes an answer (0: none)
    cdef readonly unsigned char status  # a server: the last ReadyForQuery's status byte
    cdef readonly Side peer  # the side it is linked to, if any
    cdef bytearray pending  # read, not forwarded yet: a partial message, or a queued request

    @property
    def linked(self):
        return self.peer is not None

    @property
    def buffered(self):
        """Bytes read from it and not forwarded yet."""
        return len(self.pending) if self.pending is not None else 0

    def __repr__(self):
        role = "server" if self.server else "client"
        if not self.active:
            state = "ejected"
        elif self.peer is not None:
            state = f"linked to fd {self.peer.fd}"
        else:
            state = "queued" if self.queued else "idle"
        return f"<lane {role} fd={self.fd} {state}>"


cdef class Lane:
    """An epoll set on the event loop running transaction pooling's cycle in C."""

    cdef int epfd
    cdef object loop
    cdef object on_eject
    cdef object query_ok
    cdef bint session_check
    cdef Py_ssize_t max_message
    cdef bint client_ok[256]
    cdef bint server_ok[256]
    cdef set members  # the active sides: epoll holds borrowed pointers to them
    cdef list ejected  # sides ejected during this wake-up, kept alive until its end
    cdef list free  # idle servers, the last one in lent first (a stack, as the core's)
    cdef object waiting  # queued clients, first come first served
    cdef readonly bint closed
    cdef readonly long long wakeups
    cdef readonly long long transactions
    cdef readonly long long queries
    cdef readonly double xact_time  # seconds servers spent linked, summed
    cdef readonly double query_time  # seconds servers spent owing answers, summed
    cdef readonly double wait_time  # seconds clients spent queued, summed
    cdef readonly long long client_bytes  # forwarded from clients to servers
    cdef readonly long long server_bytes  # forwarded from servers to clients
    cdef readonly long long queue_length  # clients queued for a server
    cdef public bint asking  # on_want was called and its answer is still to come
    cdef public long long owed_back  # servers to give back at their next release
    cdef object on_want
    cdef bint serving  # inside on_ready
    cdef double now  # the clock, read once per wake-up

    def __cinit__(
        self,
        loop,
        on_eject,
        bytes client_types,
        bytes server_types,
        *,
        bint session_check=False,
        query_ok=None,
        Py_ssize_t max_message=65536,
        on_want=None,
    ):
        if session_check:  # its import gives _scan the words to look for
            import millpond.proxy.session  # noqa: F401
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.loop = loop
        self.on_eject = on_eject
        self.query_ok = query_ok
        self.on_want = on_want
        self.session_check = session_check
        self.max_message = max_message
        self.members = set()
        self.ejected = []
        self.free = []
        self.waiting = deque()
        cdef unsigned char kind
        for kind in client_types:
            self.client_ok[kind] = True
        for kind in server_types:
            self.server_ok[kind] = True
        loop.add_reader(self.epfd, self.on_ready)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    def __len__(self):
        return len(self.members)

    @property
    def free_servers(self):
        return sum(1 for side in self.free if (<Side>side).active)

    @property
    def queued_clients(self):
        return sum(1 for side in self.waiting if (<Side>side).active)

    # -- entering and leaving ------------------------------------------------------

    def add_client(self, owner, int fd):
        """An idle client (no server, nothing read) enters; returns its side."""
        client = self._side(owner, fd, False)
        self._watch(client, EPOLLIN)
        return client

    def add_server(self, owner, int fd):
        """An idle server connection lent to the lane enters its free list (served to
        the first queued client, if one waits)."""
        server = self._side(owner, fd, True)
        self._watch(server, EPOLLIN)
        self._release(server)
        return server

    def enter(self, client_owner, int client_fd, server_owner, int server_fd,
              long long outstanding=0):
        """A pair linked in the middle of a transaction enters, the server owing
        ``outstanding`` answers. Returns the (client, server) sides."""
        client = self._side(client_owner, client_fd, False)
        server = self._side(server_owner, server_fd, True)
        client.peer, server.peer = server, client
        server.outstanding = outstanding
        server.linked_since = client.last_active = server.last_active = _monotonic()
        if outstanding:
            server.busy_since = server.linked_since
        self._watch(client, EPOLLIN)
        try:
            self._watch(server, EPOLLIN)
        except OSError:
            self._unwatch(client)
            raise
        return client, server

    def eject(self, Side side not None, str reason=ASKED):
        """``side`` (with its linked peer) out of the lane now, through on_eject."""
        if side.active:
            self._eject(side, b"", b"", reason)

    def sides(self):
        """Every side in the lane (a new list)."""
        return list(self.members)

    def give_back(self, Py_ssize_t count=-1):
        """Eject up to ``count`` idle servers (all if negative), each through on_eject
        with the reason RETURNED; returns how many went."""
        cdef Py_ssize_t done = 0
        cdef Side server
        while self.free and done != count:
            server = self.free.pop()
            if server.active:
                self._eject(server, b"", b"", RETURNED)
                done += 1
        return done

    def close(self):
        """Eject everything, and leave the event loop."""
        if self.closed:
            return
        self.closed = True
        for side in list(self.members):
            if (<Side>side).active:
                self._eject(side, b"", b"", ASKED)
        if not self.serving:  # else on_ready's end lets them go
            self.ejected.clear()
        self.free.clear()
        self.waiting.clear()
        self.loop.remove_reader(self.epfd)
        close(self.epfd)
        self.epfd = -1

    cdef Side _side(self, owner, int fd, bint server):
        if self.closed:
            raise RuntimeError("the lane is closed")
        cdef Side side = Side.__new__(Side)
        side.fd = fd
        side.owner = owner
        side.server = server
        side.status = 73  # 'I'
        side.last_active = self.now = _monotonic()
        return side

    cdef _watch(self, Side side, unsigned int events):
        cdef epoll_event event
        event.events = events
        event.data.ptr = <void *>side
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, side.fd, &event) < 0:
            raise OSError(errno, f"cannot watch fd {side.fd}")
        side.active = True
        self.members.add(side)

    cdef void _listen(self, Side side, unsigned int events):
        """Change what wakes us for ``side`` (0: only hang-ups and errors)."""
        cdef epoll_event event
        event.events = events
        event.data.ptr = <void *>side
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, side.fd, &event)

    cdef _unwatch(self, Side side):
        if side.active:
            side.active = False
            if side.queued:
                side.queued = False
                self.queue_length -= 1
            if self.epfd >= 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, side.fd, NULL)
            self.members.discard(side)
            self.ejected.append(side)  # alive until the end of this wake-up

    # -- serving -------------------------------------------------------------------

    def on_ready(self):
        """The event loop's reader callback: serve every socket that is ready."""
        cdef int count = epoll_wait(self.epfd, ready_events, MAX_EVENTS, 0)
        cdef int i
        cdef Side side
        self.wakeups += 1
        self.now = _monotonic()
        self.serving = True
        try:
            for i in range(count):
                side = <Side>ready_events[i].data.ptr
                if side.active:  # not ejected earlier in this wake-up
                    self._read(side)
        finally:
            self.serving = False
            self.ejected.clear()

    cdef _read(self, Side side):
        cdef ssize_t got = recv(side.fd, read_buf, READ_SIZE, 0)
        cdef bytearray pending = side.pending
        if got < 0:
            if errno != EAGAIN and errno != EINTR:
                self._eject(side, b"", b"", ERROR)
            return
        if got == 0:  # the transport sees the end of file again once it reads
            self._eject(side, b"", b"", EOF)
            return
        side.last_active = self.now
        if side.queued:  # a request is waiting already: keep whatever else came, but
            pending.extend(read_buf[:got])  # stop reading a client that floods us
            if len(pending) > self.max_message and not side.muted:
                side.muted = True
                self._listen(side, 0)
            return
        if pending is None:
            if side.server:
                self._from_server(side, read_buf, got, None)
            else:
                self._from_client(side, read_buf, got, None)
            return
        pending.extend(read_buf[:got])
        side.pending = None
        if side.server:
            self._from_server(side, pending, len(pending), pending)
        else:
            self._from_client(side, pending, len(pending), pending)

    cdef _from_client(self, Side client, const unsigned char *data, Py_ssize_t size,
                      object keep):
        """Whole requests to the client's server (taking one first if need be)."""
        cdef Py_ssize_t pos = 0, step, count = 0, syncs = 0
        cdef unsigned char kind
        cdef object reason = None
        cdef Side server = client.peer
        while pos + 5 <= size:
            step = _frame(data, pos, size, self.client_ok, self.max_message)
            if step <= 0:
                reason = REFUSED if step < 0 else None
                break  # refused, or incomplete: wait for the rest
            kind = data[pos]
            if kind == 81:  # 'Q': one that may touch session state is Python's
                if self.session_check and _hint(data + pos + 5, step - 5):
                    reason = REFUSED
                    break
                if self.query_ok is not None and not self.query_ok(
                    PyBytes_FromStringAndSize(<char *>data + pos + 5, step - 5)
                ):
                    reason = REFUSED
                    break
            if kind == 81 or kind == 83 or kind == 70:  # Q, Sync, FunctionCall: answered by Z
                syncs += 1
            pos += step
            count += 1
        if server is None:
            if reason is not None:  # the whole request is Python's, or none of it
                self._eject(client, _bytes(data, 0, size), b"", reason)
                return
            if pos == 0:
                if size:
                    client.pending = _keep(keep, data, 0, size)
                return
            server = self._take()
            if server is None:  # queue (still read: see _read)
                client.pending = _keep(keep, data, 0, size)
                client.queued = True
                client.queued_since = self.now
                self.waiting.append(client)
                self.queue_length += 1
                if not self.asking and self.on_want is not None:
                    self.asking = True  # Python may lend another server
                    self.on_want()
                return
            client.peer, server.peer = server, client
            server.linked_since = self.now
        if pos:
            if syncs and not server.outstanding:
                server.busy_since = self.now
            server.outstanding += syncs
            client.bytes_forwarded += pos
            client.messages_forwarded += count
            self.client_bytes += pos
            if not self._forward(client, server, data, pos, size):
                return
        if reason is not None:
            self._eject(client, _bytes(data, pos, size), b"", reason)
        elif pos < size:
            client.pending = _keep(keep, data, pos, size)

    cdef _from_server(self, Side server, const unsigned char *data, Py_ssize_t size,
                      object keep):
        """Responses to the linked client; at the last ReadyForQuery, idle: release."""
        cdef Py_ssize_t pos = 0, step, count = 0
        cdef object reason = None
        cdef bint done = False
        cdef Side client = server.peer
        if client is None:
            self._eject(server, _bytes(data, 0, size), b"", UNSOLICITED)
            return
        while pos + 5 <= size:
            step = _frame(data, pos, size, self.server_ok, self.max_message)
            if step <= 0:
                reason = REFUSED if step < 0 else None
                break
            if data[pos] == 90:  # 'Z'
                if server.outstanding <= 0 or step != 6:
                    reason = REFUSED  # not an answer to anything: Python's to judge
                    break
                server.outstanding -= 1
                server.status = data[pos + 5]
                self.queries += 1
                if server.outstanding == 0:
                    self.query_time += self.now - server.busy_since
                    server.busy_since = 0
                    done = data[pos + 5] == 73  # 'I': the transaction is over
            pos += step
            count += 1
            if done:
                break
        if pos:
            server.bytes_forwarded += pos
            server.messages_forwarded += count
            self.server_bytes += pos
            if not self._forward(server, client, data, pos, size):
                return
        if done:
            self.transactions += 1
            self.xact_time += self.now - server.linked_since
            server.linked_since = 0
            client.peer = server.peer = None
            if pos < size:  # more after the end of the transaction: not ours to judge
                self._eject(server, _bytes(data, pos, size), b"", UNSOLICITED)
            else:
                self._release(server)
            if client.active and client.pending is not None:
                pending, client.pending = client.pending, None  # sent meanwhile: its
                self._from_client(client, pending, len(pending), pending)  # turn, queued
            return
        if reason is not None:
            self._eject(server, _bytes(data, pos, size), b"", reason)
        elif pos < size:
            server.pending = _keep(keep, data, pos, size)

    cdef bint _forward(self, Side source, Side target, const unsigned char *data,
                       Py_ssize_t pos, Py_ssize_t size):
        """data[:pos] to ``target``; on a short write, eject both with what is owed."""
        cdef Py_ssize_t sent = _send_all(target.fd, data, pos)
        if sent == pos:
            return True
        owed = _bytes(data, max(sent, 0), pos)
        self._eject(source, _bytes(data, pos, size), owed, ERROR if sent < 0 else BLOCKED)
        return False

    cdef Side _take(self):
        cdef Side server
        while self.free:
            server = self.free.pop()
            if server.active:
                return server
        return None

    cdef _release(self, Side server):
        """An idle server to Python if it is owed one, else to the first queued client
        still here, else to the free list."""
        cdef Side client
        if self.owed_back > 0:
            self.owed_back -= 1
            self._eject(server, b"", b"", RETURNED)
            return
        while self.waiting:
            client = self.waiting.popleft()
            if not client.active:
                continue
            client.queued = False
            self.queue_length -= 1
            self.wait_time += self.now - client.queued_since
            client.peer, server.peer = server, client
            server.linked_since = self.now
            if client.muted:
                client.muted = False
                self._listen(client, EPOLLIN)
            pending, client.pending = client.pending, None
            self._from_client(client, pending, len(pending), pending)
            return
        self.free.append(server)

    cdef _eject(self, Side side, bytes unread, bytes owed_to_peer, str reason):
        """``side`` and its linked peer out of the lane; on_eject gets what each is owed."""
        cdef Side peer = side.peer
        cdef Side client, server
        cdef bytes client_unread = b"", client_owed = b"", server_unread = b"", server_owed = b""
        if side.pending is not None:  # read before an end of file, an error, an eject
            unread = bytes(side.pending) + unread
            side.pending = None
        self._unwatch(side)
        if peer is not None:
            self._unwatch(peer)
            peer_unread = b""
            if peer.pending is not None:
                peer_unread = bytes(peer.pending)
                peer.pending = None
        if side.server:
            server, client = side, peer
            server_unread, client_owed = unread, owed_to_peer
            if peer is not None:
                client_unread = peer_unread
        else:
            client, server = side, peer
            client_unread, server_owed = unread, owed_to_peer
            if peer is not None:
                server_unread = peer_unread
        self.on_eject(
            client.owner if client is not None else None, client_unread, client_owed,
            server.owner if server is not None else None, server_unread, server_owed,
            server.outstanding if server is not None else 0, reason,
        )


cdef inline bytes _bytes(const unsigned char *data, Py_ssize_t start, Py_ssize_t end):
    return PyBytes_FromStringAndSize(<char *>data + start, end - start)


cdef inline bytearray _keep(object keep, const unsigned char *data, Py_ssize_t start,
                            Py_ssize_t end):
    """data[start:end] as a side's pending bytes (reusing ``keep``, the buffer they are in)."""
    cdef bytearray kept
    if keep is None:
        return bytearray(_bytes(data, start, end))
    kept = <bytearray>keep
    if start:
        del kept[:start]
    return kept
