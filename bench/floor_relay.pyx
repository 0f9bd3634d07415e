# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The floor of a pooler whose data path is compiled: floor_pooler.py's relay in C.

floor_pooler.py measures the least a transaction pooler costs when every read reaches
Python through uvloop's Protocol callbacks. This is the same pooler (same canned login,
same free list and queue, same six-byte ReadyForQuery test, same sloppiness: only
pgbench's own scripts are served correctly) with the data path moved under the
interpreter: its own epoll set, registered once with the event loop, and one Python
call per event-loop wake-up however many sockets are ready, each served with a recv()
and a send() in C. It answers one design question with a number: how far a compiled
data path inside a Python process could go, next to PgBouncer and the Python floor.

Not for use: no partial-write buffering (a full socket buffer is retried in a loop),
no framing, no cancel, no errors, no limits.
"""

from collections import deque

from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport memcpy, memmove


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
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int accept4(int fd, void *addr, socklen_t *addrlen, int flags)
    enum:
        MSG_NOSIGNAL
        SOCK_NONBLOCK
        SOCK_CLOEXEC


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<sys/socket.h>" nogil:
    int setsockopt(int fd, int level, int name, const void *value, socklen_t size)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)


cdef enum:
    BUFSIZE = 65536
    MAXEVENTS = 256

cdef char buf[BUFSIZE]
cdef epoll_event events[MAXEVENTS]


cdef class Conn:
    cdef int fd
    cdef bint server
    cdef bint started
    cdef Conn peer
    cdef bytes held  # a queued client's read, sent when a server is free
    cdef char tail[6]  # a server's last six bytes: a ReadyForQuery may straddle reads


cdef int send_all(int fd, const char *data, ssize_t size) noexcept:
    """Write everything (looping on a full socket buffer: a floor, not a pooler)."""
    cdef ssize_t sent
    while size > 0:
        sent = send(fd, data, size, MSG_NOSIGNAL)
        if sent < 0:
            if errno == EAGAIN or errno == EINTR:
                continue
            return -1
        data += sent
        size -= sent
    return 0


cdef class Relay:
    """The pool and its data path. ``on_ready`` is the event loop's reader callback."""

    cdef int epfd
    cdef int listen_fd
    cdef bytes welcome
    cdef dict conns  # fd -> Conn: keeps each alive while epoll holds a pointer to it
    cdef list free
    cdef object waiting

    def __cinit__(self, int listen_fd, bytes welcome, list server_fds):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        self.listen_fd = listen_fd
        self.welcome = welcome
        self.conns = {}
        self.free = []
        self.waiting = deque()
        self._watch(listen_fd, NULL)
        cdef Conn server
        for fd in server_fds:
            server = self._add(fd, True)
            self.free.append(server)

    @property
    def fileno(self):
        return self.epfd

    cdef void _watch(self, int fd, void *conn):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.ptr = conn
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)

    cdef Conn _add(self, int fd, bint server):
        cdef Conn conn = Conn.__new__(Conn)
        conn.fd = fd
        conn.server = server
        conn.started = server
        self.conns[fd] = conn
        self._watch(fd, <void *>conn)
        return conn

    def on_ready(self):
        cdef int n = epoll_wait(self.epfd, events, MAXEVENTS, 0)
        cdef int i
        cdef Conn conn
        for i in range(n):
            if events[i].data.ptr == NULL:
                self._accept()
                continue
            conn = <Conn>events[i].data.ptr
            if conn.fd < 0:
                continue
            if conn.server:
                self._from_server(conn)
            else:
                self._from_client(conn)

    cdef void _accept(self):
        cdef int fd, one = 1
        while True:
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                return
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            self._add(fd, False)

    cdef void _close(self, Conn conn):
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, conn.fd, NULL)
        close(conn.fd)
        del self.conns[conn.fd]
        conn.fd = -1

    cdef void _from_client(self, Conn client):
        cdef ssize_t n = recv(client.fd, buf, BUFSIZE, 0)
        cdef Conn server
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        if n <= 0 or (n == 5 and buf[0] == b"X" and buf[4] == 4):
            self._close(client)
            return
        if not client.started:
            if n == 8 and buf[4] == 4 and buf[5] == <char>0xd2:  # SSLRequest: no
                send_all(client.fd, b"N", 1)
            else:
                client.started = True
                send_all(client.fd, self.welcome, len(self.welcome))
            return
        server = client.peer
        if server is None:
            if not self.free:
                client.held = buf[:n]
                self.waiting.append(client)
                return
            server = self.free.pop()
            server.peer, client.peer = client, server
        send_all(server.fd, buf, n)

    cdef void _from_server(self, Conn server):
        cdef ssize_t n = recv(server.fd, buf, BUFSIZE, 0)
        cdef Conn client = server.peer
        if n <= 0:
            return  # a floor: a server that goes away is not replaced
        if n >= 6:
            memcpy(server.tail, buf + n - 6, 6)
        else:
            memmove(server.tail, server.tail + n, 6 - n)
            memcpy(server.tail + 6 - n, buf, n)
        if client is None:
            return
        if client.fd >= 0:
            send_all(client.fd, buf, n)
        if server.tail[0] == b"Z" and server.tail[5] == b"I":  # transaction over
            client.peer = None
            server.peer = None
            self._release(server)

    cdef void _release(self, Conn server):
        cdef Conn client
        cdef bytes held
        while self.waiting:
            client = self.waiting.popleft()
            if client.fd < 0:
                continue
            held, client.held = client.held, None
            server.peer, client.peer = client, server
            send_all(server.fd, held, len(held))
            return
        self.free.append(server)
