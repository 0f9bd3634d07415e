# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled lane: transaction pooling's query cycle, in C.

docs/proxy-data-path.md has the why and the plan. uvloop keeps owning every socket; a
socket *enters* the lane (its transport has stopped reading and has nothing buffered to
write) and the lane watches it in the loop's :class:`Hub`, one epoll set shared by
every lane and the door and registered once with the event loop: one Python call per
wake-up, then recv() and send() in C for every ready socket.

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
``session_check`` is on (the session tracker's own first look, in C), a message
longer than ``max_message``, a bad length, a
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

The :class:`Door` at the end of this file accepts the proxy's connections and answers
logins it has seen before in C; its clients enter a lane as *guests*, with no Python
object until one is needed (millpond/proxy/door.py).
"""

from collections import deque

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, errno

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
    int accept4(int fd, void *addr, void *addrlen, int flags)
    int setsockopt(int fd, int level, int name, const void *value, unsigned int size)
    int getsockopt(int fd, int level, int name, void *value, unsigned int *size)
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SOCK_NONBLOCK
        SOCK_CLOEXEC


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t n, unsigned int flags)


cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)


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


cdef enum:
    SIDE = 1
    GUEST = 2
    LISTENER = 3


cdef class _Member:
    """Something in a hub's epoll set: its events carry a pointer to it."""

    cdef unsigned char kind
    cdef bint watched  # in the set now (else its events are stale)


cdef dict _hubs = {}  # event loop -> its Hub


cdef Hub _hub(loop):
    """The loop's hub, shared by every lane and door on it (one more user)."""
    cdef Hub hub = _hubs.get(loop)
    if hub is None:
        hub = Hub.__new__(Hub)
        hub.epfd = epoll_create1(EPOLL_CLOEXEC)
        if hub.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        hub.loop = loop
        hub.graveyard = []
        loop.add_reader(hub.epfd, hub.on_ready)
        _hubs[loop] = hub
    hub.users += 1
    return hub


cdef class Hub:
    """One epoll set per event loop for every lane's sockets and the door's, registered
    with the loop once: one wake-up of the loop (and one epoll_wait here) serves
    whatever is ready, in any lane or at the door. A set of its own per lane and door
    would cost an extra wake-up and epoll_wait for each set with something ready, and
    nested sets cost the kernel more per event."""

    cdef int epfd
    cdef object loop
    cdef list graveyard  # members unwatched during this wake-up, alive until its end
    cdef bint serving  # inside on_ready
    cdef readonly Py_ssize_t users  # the lanes and doors sharing it
    cdef readonly long long wakeups
    cdef double now  # the clock, read once per wake-up

    @property
    def closed(self):
        return self.epfd < 0

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    cdef int add(self, _Member member, int fd, unsigned int events) except -1:
        cdef epoll_event event
        event.events = events
        event.data.ptr = <void *>member
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event) < 0:
            raise OSError(errno, f"cannot watch fd {fd}")
        return 0

    cdef void change(self, _Member member, int fd, unsigned int events) noexcept:
        """What wakes us for ``fd`` (0: only hang-ups and errors), and for whom."""
        cdef epoll_event event
        event.events = events
        event.data.ptr = <void *>member
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &event)

    cdef void drop(self, _Member member, int fd, bint closing):
        """``member`` out of the set (``closing``: its fd is about to be closed, which
        takes it out)."""
        if member.watched:
            member.watched = False
            if not closing and self.epfd >= 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
            if self.serving:
                self.graveyard.append(member)

    cdef release(self):
        """One user less; the last one takes the set off the loop."""
        self.users -= 1
        if self.users == 0:
            if _hubs.get(self.loop) is self:
                del _hubs[self.loop]
            self.loop.remove_reader(self.epfd)
            close(self.epfd)
            self.epfd = -1

    def on_ready(self):
        """The event loop's reader callback: serve every socket that is ready."""
        cdef int count = epoll_wait(self.epfd, ready_events, MAX_EVENTS, 0)
        cdef int i
        cdef _Member member
        cdef Side side
        cdef Lane lane
        cdef Guest guest
        self.wakeups += 1
        self.now = _monotonic()
        self.serving = True
        try:
            for i in range(count):
                member = <_Member>ready_events[i].data.ptr
                if member.kind == SIDE:
                    side = <Side>member
                elif member.kind == GUEST:  # a guest keeps its registration from the
                    guest = <Guest>member  # door through the lane: where is it now?
                    side = guest.side
                    if side is None:
                        if guest.watched:  # (else gone earlier in this wake-up)
                            guest.door._login(guest)
                        continue
                else:
                    if member.watched:
                        (<_Listener>member).door._accept(<_Listener>member, self.now)
                    continue
                if side.watched:  # not ejected earlier in this wake-up
                    lane = side.lane
                    lane.now = self.now
                    if lane.woken != self.wakeups:
                        lane.woken = self.wakeups
                        lane.wakeups += 1
                    lane._read(side)
        finally:
            self.serving = False
            self.graveyard.clear()


cdef class Lane


cdef inline _Member _token(Side side):
    """What the epoll set's events for ``side`` point to: a guest's side is reached
    through its Guest, registered when it waited at the door."""
    return <_Member>side.owner if side.guest else side


cdef class Side(_Member):
    """One socket in the lane."""

    cdef readonly int fd
    cdef readonly object owner
    cdef readonly bint server
    cdef readonly bint guest  # a client the Door let in: its owner is a Guest
    cdef Lane lane
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
    def active(self):
        """In its lane (not ejected)."""
        return self.watched

    @property
    def linked(self):
        return self.peer is not None

    @property
    def buffered(self):
        """Bytes read from it and not forwarded yet."""
        return len(self.pending) if self.pending is not None else 0

    def __repr__(self):
        role = "server" if self.server else "client"
        if not self.watched:
            state = "ejected"
        elif self.peer is not None:
            state = f"linked to fd {self.peer.fd}"
        else:
            state = "queued" if self.queued else "idle"
        return f"<lane {role} fd={self.fd} {state}>"


cdef class Lane:
    """Transaction pooling's cycle in C, for the sockets it watches in the loop's Hub."""

    cdef readonly Hub hub
    cdef object on_eject
    cdef bint session_check
    cdef Py_ssize_t max_message
    cdef bint client_ok[256]
    cdef bint server_ok[256]
    cdef set members  # the active sides: epoll holds borrowed pointers to them
    cdef list free  # idle servers, the last one in lent first (a stack, as the core's)
    cdef object waiting  # queued clients, first come first served
    cdef readonly bint closed
    cdef readonly long long wakeups  # the hub's wake-ups that had something for it
    cdef long long woken  # the last of them
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
    cdef double now  # the clock, read once per wake-up

    def __cinit__(
        self,
        loop,
        on_eject,
        bytes client_types,
        bytes server_types,
        *,
        bint session_check=False,
        Py_ssize_t max_message=65536,
        on_want=None,
    ):
        if session_check:  # its import gives _scan the words to look for
            import millpond.proxy.session  # noqa: F401
        self.on_eject = on_eject
        self.on_want = on_want
        self.session_check = session_check
        self.max_message = max_message
        self.members = set()
        self.free = []
        self.waiting = deque()
        cdef unsigned char kind
        for kind in client_types:
            self.client_ok[kind] = True
        for kind in server_types:
            self.server_ok[kind] = True
        self.hub = _hub(loop)  # last: only a lane made whole is one of its users

    def __len__(self):
        return len(self.members)

    @property
    def free_servers(self):
        return sum(1 for side in self.free if (<Side>side).watched)

    @property
    def queued_clients(self):
        return sum(1 for side in self.waiting if (<Side>side).watched)

    # -- entering and leaving ------------------------------------------------------

    def add_client(self, owner, int fd):
        """An idle client (no server, nothing read) enters; returns its side."""
        client = self._side(owner, fd, False)
        self._watch(client, EPOLLIN)
        return client

    cdef Side _add_guest(self, Guest guest):
        """A client the Door welcomed enters, idle (its fd is the lane's to close)."""
        cdef Side client = self._side(guest, guest.fd, False)
        client.guest = True
        guest.side = client  # from now on its events are the lane's (see Hub.on_ready)
        if guest.watched:  # it waited at the door: its registration in the loop's hub
            guest.door._leave(guest)  # stays, no epoll_ctl
            client.watched = True
            self.members.add(client)
        else:
            self._watch(client, EPOLLIN)
        return client

    cdef _drop(self, Side client):
        """A guest that left (Terminate, end of file, an error) while idle: closed in C,
        never having been Python's."""
        cdef Guest guest = <Guest>client.owner
        self._unwatch(client, True)
        guest.door._forget(guest)
        close(client.fd)
        guest.side = None  # no cycle left: both go by reference counting, not the GC
        # (the side stays in the hub's graveyard, and through it the guest, until the
        # end of this wake-up)

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
        if side.watched:
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
            if server.watched:
                self._eject(server, b"", b"", RETURNED)
                done += 1
        return done

    def close(self):
        """Eject everything, and leave the event loop."""
        if self.closed:
            return
        self.closed = True
        for side in list(self.members):
            if (<Side>side).watched:
                self._eject(side, b"", b"", ASKED)
        self.free.clear()
        self.waiting.clear()
        self.hub.release()

    cdef Side _side(self, owner, int fd, bint server):
        if self.closed:
            raise RuntimeError("the lane is closed")
        cdef Side side = Side.__new__(Side)
        side.kind = SIDE
        side.lane = self
        side.fd = fd
        side.owner = owner
        side.server = server
        side.status = 73  # 'I'
        side.last_active = self.now = _monotonic()
        return side

    cdef _watch(self, Side side, unsigned int events):
        self.hub.add(_token(side), side.fd, events)
        side.watched = True
        self.members.add(side)

    cdef void _listen(self, Side side, unsigned int events):
        """Change what wakes us for ``side`` (0: only hang-ups and errors)."""
        self.hub.change(_token(side), side.fd, events)

    cdef _unwatch(self, Side side, bint closing=False):
        if side.watched:
            if side.queued:
                side.queued = False
                self.queue_length -= 1
            self.hub.drop(side, side.fd, closing)
            self.members.discard(side)

    # -- serving -------------------------------------------------------------------

    cdef _read(self, Side side):
        cdef ssize_t got = recv(side.fd, read_buf, READ_SIZE, 0)
        cdef bytearray pending = side.pending
        if got < 0:
            if errno != EAGAIN and errno != EINTR:
                if side.guest and side.peer is None:
                    self._drop(side)
                else:
                    self._eject(side, b"", b"", ERROR)
            return
        if got == 0:  # the transport sees the end of file again once it reads
            if side.guest and side.peer is None:
                self._drop(side)  # a guest without a server: nothing to clean up
            else:
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
            if kind == 81 or kind == 83 or kind == 70:  # Q, Sync, FunctionCall: answered by Z
                syncs += 1
            pos += step
            count += 1
        if server is None:
            if reason is not None:  # the whole request is Python's, or none of it
                if client.guest and pos == 0 and data[0] == 88 and size == 5:
                    self._drop(client)  # a guest's Terminate, nothing else: goodbye
                    return
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
            if client.watched and client.pending is not None:
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
            if server.watched:
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
            if not client.watched:
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
        if client is not None and client.guest:  # its fd is Python's from now on
            (<Guest>client.owner).door._forget(<Guest>client.owner)
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


# -- the door: logins in C ---------------------------------------------------------

cdef enum:
    SSL_REQUEST_CODE = 80877103
    PROTOCOL_3 = 196608
    MAX_STARTUP = 10000  # PgBouncer's limit on a startup packet
    MAX_WELCOME = 16384
    KEY_BLOCK = 4096
    ACCEPTS_PER_WAKEUP = 64

cdef unsigned char welcome_buf[MAX_WELCOME + 32]
cdef unsigned char key_block[KEY_BLOCK]
cdef Py_ssize_t key_used = KEY_BLOCK


cdef inline unsigned int _be32(const unsigned char *p) noexcept nogil:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline void _put32(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 24) & 255
    p[1] = (v >> 16) & 255
    p[2] = (v >> 8) & 255
    p[3] = v & 255


cdef unsigned int _random32() except? 0:
    """4 bytes from the OS's CSPRNG, read 4 KiB at a time (the cancel keys)."""
    global key_used
    cdef ssize_t got
    if key_used + 4 > KEY_BLOCK:
        got = getrandom(key_block, KEY_BLOCK, 0)
        if got != KEY_BLOCK:
            raise OSError(errno, "getrandom failed")
        key_used = 0
    key_used += 4
    return _be32(key_block + key_used - 4)


cdef class Login:
    """A startup packet the proxy has let in before, and what to answer it with: the
    lane its clients enter, the welcome up to (not including) BackendKeyData, and
    ``info``, what the proxy needs to take such a client over (opaque here)."""

    cdef readonly Lane lane
    cdef readonly bytes welcome
    cdef readonly object info

    def __cinit__(self, Lane lane not None, bytes welcome not None, info):
        if len(welcome) > MAX_WELCOME:
            raise ValueError(f"a welcome of {len(welcome)} bytes is too long for the door")
        self.lane = lane
        self.welcome = welcome
        self.info = info


cdef class Guest(_Member):
    """A client connection accepted by the Door: logging in there, then idle or busy in
    a lane, with no Python object of its own until the Python path needs one."""

    cdef readonly int fd
    cdef readonly int pid  # its BackendKeyData
    cdef readonly unsigned int key
    cdef readonly double connect_time
    cdef readonly Login login  # once welcomed
    cdef readonly Side side  # in a lane
    cdef Door door
    cdef bytearray buf  # a startup packet that came in pieces
    cdef bint present  # counted by the door (in it, or in a lane)

    @property
    def key_bytes(self):
        cdef unsigned char out[4]
        _put32(out, self.key)
        return PyBytes_FromStringAndSize(<char *>out, 4)

    def __repr__(self):
        return f"<guest fd={self.fd} pid={self.pid}>"


cdef class _Listener(_Member):
    cdef int fd
    cdef bint tcp
    cdef bint checked  # whether its accepted sockets inherit TCP_NODELAY: looked
    cdef bint inherits  # at the first one (Linux copies it from the listening socket)
    cdef Door door


cdef void _no_delay(_Listener listener, int fd) noexcept:
    """TCP_NODELAY on an accepted socket, unless it came with it."""
    cdef int value = 0, one = 1
    cdef unsigned int size = sizeof(int)
    if not listener.checked:
        listener.checked = True
        if getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &value, &size) == 0 and value:
            listener.inherits = True
            return
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))


cdef class Door:
    """Listening sockets watched in the loop's Hub (as the lanes' sockets are), and the
    logins it can answer in C.

    A connection it accepts is a :class:`Guest`. The guest's SSLRequest is refused
    (``refuse_ssl``: 'N') and its StartupMessage looked up, byte for byte, in
    ``logins``; when found, and its lane is open, the door answers with the stored
    welcome, a BackendKeyData of its own and ReadyForQuery, and the guest enters the
    lane, idle. In the lane, a guest that sends Terminate or closes while idle is closed
    in C; anything else the lane ejects reaches ``on_eject`` with the Guest as the
    client's owner, and the proxy takes it over (the fd is then Python's). Everything
    else (an unknown or partial startup packet, TLS, a CancelRequest, the door at its
    ``limit`` of guests) is handed to ``on_handoff(fd, data, connect_time)``, with the
    bytes read so far: the fd is Python's from then on.
    """

    cdef readonly Hub hub
    cdef object on_handoff
    cdef public dict logins  # startup packet -> Login
    cdef public long long limit  # guests at most; past it, connections go to Python
    cdef public bint refuse_ssl
    cdef dict keys  # (pid << 32 | key) -> Guest
    cdef set members  # guests logging in, and listeners: epoll holds pointers to them
    cdef list listeners
    cdef int next_pid
    cdef readonly long long guests  # logging in here, or in a lane
    cdef readonly long long welcomed
    cdef readonly bint closed

    def __cinit__(self, loop, on_handoff):
        self.on_handoff = on_handoff
        self.logins = {}
        self.keys = {}
        self.members = set()
        self.listeners = []
        self.limit = 1 << 62
        self.next_pid = (_random32() & 0x3FFFFFFF) | 0x40000000
        self.hub = _hub(loop)

    def listen(self, int fd, bint tcp):
        """Accept on a listening socket (non-blocking; its owner keeps it open). A TCP
        one gets TCP_NODELAY, which the sockets it accepts inherit."""
        cdef int one = 1
        if tcp and setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int)) < 0:
            raise OSError(errno, "cannot set TCP_NODELAY on the listening socket")
        cdef _Listener listener = _Listener.__new__(_Listener)
        listener.kind = LISTENER
        listener.fd = fd
        listener.tcp = tcp
        listener.door = self
        self._watch(listener, fd)
        self.listeners.append(listener)

    def unlisten(self, int fd):
        for listener in list(self.listeners):
            if (<_Listener>listener).fd == fd:
                self.listeners.remove(listener)
                self._unwatch(listener, fd)

    def find(self, int pid, bytes key not None):
        """The guest a CancelRequest names, or None."""
        if len(key) != 4:
            return None
        return self.keys.get((<long long>pid << 32) | _be32(key))

    def forget_lane(self, Lane lane):
        """Stop answering for ``lane`` (it closed): its logins go."""
        for packet, login in list(self.logins.items()):
            if (<Login>login).lane is lane:
                del self.logins[packet]

    def expire(self, double before):
        """Guests still logging in that connected before ``before`` go to Python (its
        client_login_timeout tells them)."""
        for member in list(self.members):
            if type(member) is Guest and (<Guest>member).connect_time < before:
                buf = (<Guest>member).buf
                self._hand_off(<Guest>member, bytes(buf) if buf is not None else b"")

    def close(self):
        """Stop accepting; guests still logging in are closed (guests in lanes are the
        lanes')."""
        if self.closed:
            return
        self.closed = True
        for listener in list(self.listeners):
            self._unwatch(listener, (<_Listener>listener).fd)
        self.listeners.clear()
        for member in list(self.members):
            if type(member) is Guest:
                self._close_guest(<Guest>member)
        self.logins.clear()
        self.hub.release()

    cdef _watch(self, _Member member, int fd):
        self.hub.add(member, fd, EPOLLIN)
        member.watched = True
        self.members.add(member)

    cdef _unwatch(self, _Member member, int fd, bint closing=False):
        if member.watched:
            self.hub.drop(member, fd, closing)
            self.members.discard(member)

    cdef _leave(self, Guest guest):
        """A guest goes on to a lane with its registration (see Lane._add_guest)."""
        guest.watched = False
        self.members.discard(guest)

    cdef _forget(self, Guest guest):
        """The guest is no longer the door's to count (closed, or now Python's)."""
        if guest.present:
            guest.present = False
            self.guests -= 1
            if guest.login is not None:
                self.keys.pop((<long long>guest.pid << 32) | guest.key, None)

    cdef _accept(self, _Listener listener, double now):
        cdef int fd, n
        cdef Guest guest
        for n in range(ACCEPTS_PER_WAKEUP):
            fd = accept4(listener.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                return  # EAGAIN; or out of descriptors: the next wake-up tries again
            if listener.tcp and not listener.inherits:
                _no_delay(listener, fd)
            guest = Guest.__new__(Guest)
            guest.kind = GUEST
            guest.fd = fd
            guest.door = self
            guest.connect_time = now
            guest.present = True
            self.guests += 1
            if self.guests > self.limit or not self.logins:
                self._hand_off(guest, b"")  # Python's limit check, or nothing to answer
                continue
            self._login(guest)  # its first packet is usually here (nearly always with
            # TCP_DEFER_ACCEPT): not watched until it is not (no epoll_ctl at all for a
            # login answered at once)

    cdef _login(self, Guest guest):
        cdef ssize_t got = recv(guest.fd, read_buf, READ_SIZE, 0)
        cdef const unsigned char *data = read_buf
        cdef Py_ssize_t size, pos = 0
        cdef unsigned int length, code
        cdef bytearray buf = guest.buf
        cdef bint python = False  # the rest is Python's to judge
        if got < 0:
            if errno == EAGAIN or errno == EINTR:
                self._wait(guest)
                return
            self._close_guest(guest)
            return
        if got == 0:
            self._close_guest(guest)
            return
        size = got
        if buf is not None:
            buf.extend(read_buf[:got])
            data = buf
            size = len(buf)
        while size - pos >= 8:
            length = _be32(data + pos)
            if length < 8 or length > MAX_STARTUP:
                python = True  # its error to give
                break
            if size - pos < length:
                guest.buf = bytearray(_bytes(data, pos, size))
                self._wait(guest)
                return
            code = _be32(data + pos + 4)
            if code == SSL_REQUEST_CODE and length == 8 and self.refuse_ssl:
                if send(guest.fd, b"N", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != 1:
                    self._close_guest(guest)
                    return
                pos += 8
                continue
            if code == PROTOCOL_3 and pos + length == size:
                login = self.logins.get(_bytes(data, pos, size))
                if login is not None and self._welcome(guest, <Login>login):
                    return
            python = True
            break
        if python:
            self._hand_off(guest, _bytes(data, pos, size))
            return
        if pos == size:
            guest.buf = None
        else:  # the first bytes of a packet
            guest.buf = bytearray(_bytes(data, pos, size))
        self._wait(guest)

    cdef _wait(self, Guest guest):
        """Watch a guest whose login is not all here yet (once)."""
        if not guest.watched:
            try:
                self._watch(guest, guest.fd)
            except OSError:
                self._hand_off(guest, bytes(guest.buf) if guest.buf is not None else b"")

    cdef bint _welcome(self, Guest guest, Login login) except -1:
        cdef Lane lane = login.lane
        cdef Py_ssize_t size = len(login.welcome)
        cdef unsigned char *out = welcome_buf
        if lane.closed:
            self.forget_lane(lane)
            return False
        self.next_pid = ((self.next_pid + 1) & 0x3FFFFFFF) | 0x40000000
        guest.pid = self.next_pid
        guest.key = _random32()
        memcpy(out, <const unsigned char *>(<char *>login.welcome), size)
        out[size] = 75  # 'K'
        _put32(out + size + 1, 12)
        _put32(out + size + 5, <unsigned int>guest.pid)
        _put32(out + size + 9, guest.key)
        out[size + 13] = 90  # 'Z'
        _put32(out + size + 14, 5)
        out[size + 18] = 73  # 'I'
        if _send_all(guest.fd, out, size + 19) != size + 19:
            self._close_guest(guest)  # a fresh socket that cannot take 1 KB: gone
            return True
        guest.buf = None
        guest.login = login
        self.keys[(<long long>guest.pid << 32) | guest.key] = guest
        self.welcomed += 1
        try:
            lane._add_guest(guest)
        except (OSError, RuntimeError):  # logged in, but the lane cannot have it
            self._unwatch(guest, guest.fd)
            self._forget(guest)
            self.on_handoff(guest.fd, b"", guest.connect_time, guest)
        return True

    cdef _hand_off(self, Guest guest, bytes data):
        self._unwatch(guest, guest.fd)
        self._forget(guest)
        self.on_handoff(guest.fd, data, guest.connect_time, None)

    cdef _close_guest(self, Guest guest):
        self._unwatch(guest, guest.fd, True)
        self._forget(guest)
        close(guest.fd)
