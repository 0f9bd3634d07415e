"""The compiled lane (millpond.proxy._lane): transaction pooling's cycle in C.

The tests put the proxy's ends of socket pairs in a lane and play the clients and the
servers on the other ends. Whatever happens, the bytes a side sent must come out exactly
once, in order: forwarded by the lane, or handed back at the eject (unread, to feed to
that side's protocol; owed, to write to the other side first), or still in the socket
for the transport to read once it resumes; and a server connection goes back to the
pool only at a ReadyForQuery that answers the last request and says idle.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from millpond.proxy import session
from tests.helpers import run, until

try:
    from millpond.proxy import _lane
except ImportError:  # each test then fails saying why, instead of the whole run
    _lane = None  # type: ignore[assignment]

CLIENT_TYPES = b"QPBDESH"
SERVER_TYPES = b"123TDCInstNZ"


@pytest.fixture(autouse=True)
def _built() -> None:
    assert _lane is not None, "millpond was installed without its compiled lane"


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\x00")


RESPONSE = msg(b"T", b"\x00\x01a\x00" + bytes(18)) + msg(b"D", b"\x00\x01\x00\x00\x00\x011")
RESPONSE += msg(b"C", b"SELECT 1\x00")
READY = msg(b"Z", b"I")


@dataclass
class Eject:
    client: object
    client_unread: bytes
    client_owed: bytes
    server: object
    server_unread: bytes
    server_owed: bytes
    outstanding: int
    reason: str


@dataclass
class Rig:
    """A lane with one pair in it; ``app`` plays the client, ``db`` the server."""

    lane: Any
    app: socket.socket
    db: socket.socket
    proxy_client: socket.socket
    proxy_server: socket.socket
    client_side: Any
    server_side: Any
    ejects: list[Eject] = field(default_factory=list)
    eject_seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, sock: socket.socket, data: bytes, chunks: list[int] | None = None) -> None:
        loop = asyncio.get_running_loop()
        pos = 0
        for size in chunks or [len(data)]:
            if pos >= len(data):
                break
            await loop.sock_sendall(sock, data[pos : pos + size])
            pos += size
            await asyncio.sleep(0.001)  # let the lane read each chunk on its own
        if pos < len(data):
            await loop.sock_sendall(sock, data[pos:])

    async def receive(self, sock: socket.socket, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        got = b""
        async with asyncio.timeout(5):
            while len(got) < size:
                chunk = await loop.sock_recv(sock, size - len(got))
                if not chunk:
                    break
                got += chunk
        return got

    async def ejected(self) -> Eject:
        async with asyncio.timeout(5):
            await self.eject_seen.wait()
        assert len(self.ejects) == 1, self.ejects
        return self.ejects[0]


@asynccontextmanager
async def rig(**options: Any) -> AsyncIterator[Rig]:
    app, proxy_client = socket.socketpair()
    proxy_server, db = socket.socketpair()
    socks = (app, proxy_client, proxy_server, db)
    for sock in socks:
        sock.setblocking(False)
    ejects: list[Eject] = []
    seen = asyncio.Event()

    def on_eject(*args: Any) -> None:
        ejects.append(Eject(*args))
        seen.set()

    loop = asyncio.get_running_loop()
    lane = _lane.Lane(loop, on_eject, CLIENT_TYPES, SERVER_TYPES, **options)
    try:
        sides = lane.enter("client", proxy_client.fileno(), "server", proxy_server.fileno())
        yield Rig(lane, app, db, proxy_client, proxy_server, *sides, ejects, seen)
    finally:
        try:
            lane.close()
        finally:
            for sock in socks:
                sock.close()


def drain(sock: socket.socket) -> bytes:
    """What is still in a socket (what its transport reads once it resumes)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


chunkings = st.lists(st.integers(min_value=1, max_value=40), max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    sqls=st.lists(
        st.text(min_size=1, max_size=200).map(lambda s: s.replace("\x00", "")),
        min_size=1,
        max_size=6,
    ),
    client_chunks=chunkings,
    server_chunks=chunkings,
    tail=st.binary(max_size=30),
)
def test_a_query_cycle_is_forwarded_untouched_in_any_chunking(
    sqls: list[str], client_chunks: list[int], server_chunks: list[int], tail: bytes
) -> None:
    async def main() -> None:
        async with rig() as r:
            requests = b"".join(query(sql) for sql in sqls)
            await r.send(r.app, requests, client_chunks)
            assert await r.receive(r.db, len(requests)) == requests
            assert r.server_side.outstanding == len(sqls)
            # a ReadyForQuery per request; only the last one ends the transaction
            response = (RESPONSE + READY) * len(sqls)
            await r.send(r.db, response + tail, server_chunks)
            assert await r.receive(r.app, len(response)) == response
            if tail:  # more after the end of the transaction: the server leaves
                eject = await r.ejected()
                assert (eject.reason, eject.client, eject.server) == (
                    _lane.UNSOLICITED,
                    None,
                    "server",
                )
                assert eject.server_unread + drain(r.proxy_server) == tail
                assert r.client_side.active, "the client stays, idle"
            else:
                await asyncio.sleep(0.005)
                assert not r.ejects
                assert r.lane.free_servers == 1, "the server is back in the free list"
            assert not r.server_side.linked
            assert not r.client_side.linked
            assert (r.lane.transactions, r.lane.queries) == (1, len(sqls))

    run(main())


@pytest.mark.parametrize(
    ("refused", "options"),
    [
        (msg(b"X"), {}),  # Terminate: not on the list
        (query("SET search_path TO x"), {"session_check": True}),  # session state
        (msg(b"Q", bytes(100)), {"max_message": 64}),  # too long for the lane
        (b"Q\x00\x00\x00\x02", {}),  # a bad length: the Python path says so
    ],
    ids=["type", "session_check", "max_message", "bad length"],
)
def test_a_message_the_lane_may_not_forward_ejects_with_it_unread(
    refused: bytes, options: dict[str, Any]
) -> None:
    async def main() -> None:
        async with rig(**options) as r:
            before = query("select 1") + query("select 2")
            after = query("select 3")
            await r.send(r.app, before + refused + after)
            assert await r.receive(r.db, len(before)) == before
            eject = await r.ejected()
            assert eject.reason == _lane.REFUSED
            assert eject.client_unread + drain(r.proxy_client) == refused + after
            assert drain(r.db) == b"", "nothing after the refused message was forwarded"

    run(main())


def test_end_of_file_ejects_with_the_partial_message_unread() -> None:
    async def main() -> None:
        async with rig() as r:
            whole, partial = query("select 1"), query("select 2")[:7]
            await r.send(r.app, whole + partial)
            assert await r.receive(r.db, len(whole)) == whole
            await asyncio.sleep(0.01)
            assert not r.ejects, "a partial message waits for the rest"
            r.app.shutdown(socket.SHUT_WR)
            eject = await r.ejected()
            assert eject.reason == _lane.EOF
            assert eject.client_unread == partial
            assert r.proxy_client.recv(10) == b"", "the end of file is still there to be read"

    run(main())


def test_a_write_that_would_block_ejects_with_the_rest_owed() -> None:
    async def main() -> None:
        async with rig() as r:
            rows = b"".join(msg(b"D", bytes([i % 256]) * 60_000) for i in range(100))
            sender = asyncio.create_task(r.send(r.db, rows + READY))  # the app reads nothing
            eject = await r.ejected()
            assert eject.reason == _lane.BLOCKED
            assert eject.client_owed, "the bytes that did not fit are owed to the client"
            forwarded, rest = drain(r.app), eject.server_unread
            while not sender.done():  # the server's transport reads the rest
                rest += drain(r.proxy_server)
                await asyncio.sleep(0.001)
            await sender
            rest += drain(r.proxy_server)
            assert forwarded + eject.client_owed + rest == rows + READY

    run(main())


def test_eject_and_close_hand_back_what_was_read() -> None:
    async def main() -> None:
        async with rig() as r:
            partial = query("select 1")[:4]
            await r.send(r.app, partial)
            await asyncio.sleep(0.01)
            client = r.client_side
            r.lane.eject(client)
            eject = await r.ejected()
            assert (eject.reason, eject.client_unread) == (_lane.ASKED, partial)
            assert not client.active
            r.lane.eject(client)  # a second time: nothing happens
            assert len(r.ejects) == 1
            assert len(r.lane) == 0
        assert r.lane.closed

    run(main())


def test_counters_and_one_wakeup_for_many_ready_sockets() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig() as r:
            app2, proxy2 = socket.socketpair()
            server2, db2 = socket.socketpair()
            try:
                for sock in (app2, proxy2, server2, db2):
                    sock.setblocking(False)
                r.lane.enter("client", proxy2.fileno(), "server", server2.fileno())
                before = r.lane.wakeups
                # both clients' queries are in their sockets before the loop runs again
                r.app.send(query("select 1"))
                app2.send(query("select 2"))
                assert await r.receive(r.db, len(query("select 1"))) == query("select 1")
                assert await loop.sock_recv(db2, 100) == query("select 2")
                assert r.lane.wakeups - before == 1
                client = r.client_side
                assert (client.messages_forwarded, client.bytes_forwarded) == (1, 14)
                assert (client.fd, client.owner, client.server) == (
                    r.proxy_client.fileno(),
                    "client",
                    False,
                )
            finally:
                for sock in (app2, proxy2, server2, db2):
                    sock.close()

    run(main())


def test_lanes_on_one_loop_share_one_hub_and_its_wakeups() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with rig() as one, rig() as two:
            hub = one.lane.hub
            assert two.lane.hub is hub
            assert hub.users == 2
            before = (hub.wakeups, one.lane.wakeups, two.lane.wakeups)
            # a query in each lane, both ready before the loop runs again: one wake-up
            one.app.send(query("select 1"))
            two.app.send(query("select 2"))
            assert await one.receive(one.db, 14) == query("select 1")
            assert await loop.sock_recv(two.db, 100) == query("select 2")
            after = (hub.wakeups, one.lane.wakeups, two.lane.wakeups)
            assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
            one.lane.close()  # the other lane keeps being served
            assert hub.users == 1
            assert not hub.closed
            two.db.send(RESPONSE + READY)
            assert await two.receive(two.app, len(RESPONSE + READY)) == RESPONSE + READY
        assert hub.users == 0
        assert hub.closed
        async with rig() as three:  # and a new lane gets a new one
            assert three.lane.hub is not hub
            assert not three.lane.hub.closed

    run(main())


# -- pooling: idle clients, a free list of servers, a queue ---------------------------


class Database:
    """Plays a server connection: answers each Query with its text and a ReadyForQuery
    (in a transaction from BEGIN to COMMIT), after ``delay`` seconds (and once ``hold``
    is set, if there is one)."""

    def __init__(self, sock: socket.socket, delay: float = 0.0) -> None:
        self.sock, self.delay = sock, delay
        self.hold: asyncio.Event | None = None
        self.seen: list[bytes] = []
        self.status = b"I"
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = b""
        while chunk := await loop.sock_recv(self.sock, 65536):
            buffer += chunk
            while len(buffer) >= 5 and len(buffer) >= 1 + struct.unpack("!I", buffer[1:5])[0]:
                size = 1 + struct.unpack("!I", buffer[1:5])[0]
                sql, buffer = buffer[5 : size - 1], buffer[size:]
                self.seen.append(sql)
                if sql.startswith(b"BEGIN"):
                    self.status = b"T"
                elif sql.startswith(b"COMMIT"):
                    self.status = b"I"
                if self.hold is not None:
                    await self.hold.wait()
                await asyncio.sleep(self.delay)
                await loop.sock_sendall(self.sock, answer(sql, self.status))


def answer(sql: bytes, status: bytes = b"I") -> bytes:
    return msg(b"C", sql + b"\x00") + msg(b"Z", status)


class Ejects(list[Eject]):
    """on_eject's calls, and a wait for the first."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def __call__(self, *args: Any) -> None:
        self.append(Eject(*args))
        self.seen.set()

    async def first(self) -> Eject:
        async with asyncio.timeout(5):
            await self.seen.wait()
        return self[0]


@asynccontextmanager
async def pool(
    clients: int,
    servers: int,
    delay: float = 0.0,
    sides: list[Any] | None = None,
    **options: Any,
) -> AsyncIterator[Any]:
    """A lane with idle clients and free servers; yields (lane, apps, databases, ejects)
    (and fills ``sides``, if given, with the clients' sides)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    ejects = Ejects()

    def pair() -> tuple[socket.socket, socket.socket]:
        outer, inner = socket.socketpair()
        for sock in (outer, inner):
            sock.setblocking(False)
            socks.append(sock)
        return outer, inner

    lane = _lane.Lane(loop, ejects, CLIENT_TYPES, SERVER_TYPES, **options)
    databases: list[Database] = []
    try:
        for i in range(servers):
            db, proxy_end = pair()
            databases.append(Database(db, delay))
            lane.add_server(f"server {i}", proxy_end.fileno())
        apps = []
        for i in range(clients):
            app, proxy_end = pair()
            apps.append(app)
            side = lane.add_client(f"client {i}", proxy_end.fileno())
            if sides is not None:
                sides.append(side)
        yield lane, apps, databases, ejects
    finally:
        lane.close()
        for database in databases:
            database.task.cancel()
        for sock in socks:
            sock.close()


async def ask(app: socket.socket, sql: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(app, msg(b"Q", sql + b"\x00"))
    expected = len(answer(sql))
    got = b""
    async with asyncio.timeout(5):
        while len(got) < expected:
            got += await loop.sock_recv(app, expected - len(got))
    return got


def test_clients_queue_for_the_one_server_first_come_first_served() -> None:
    async def main() -> None:
        async with pool(clients=3, servers=1, delay=0.02) as (lane, apps, dbs, ejects):
            asks = []
            for i, app in enumerate(apps):
                asks.append(asyncio.create_task(ask(app, b"select %d" % i)))
                await asyncio.sleep(0.003)  # in this order
            assert lane.queued_clients == 2
            answers = await asyncio.gather(*asks)
            assert answers == [answer(b"select %d" % i) for i in range(3)]
            assert dbs[0].seen == [b"select 0", b"select 1", b"select 2"]
            assert (lane.transactions, lane.free_servers, lane.queued_clients) == (3, 1, 0)
            assert not ejects

    run(main())


def test_the_lane_asks_once_for_servers_and_gives_back_what_it_owes() -> None:
    """on_want when a client queues with no server free (once, until Python answers),
    owed_back: the next release goes back to Python instead of to the queue, give_back:
    free servers back on demand; each side knows its peer and its last status."""

    async def main() -> None:
        wants: list[int] = []
        async with pool(clients=3, servers=1, delay=0.05, on_want=lambda: wants.append(1)) as (
            lane, apps, _dbs, ejects,
        ):  # fmt: skip
            a = asyncio.create_task(ask(apps[0], b"BEGIN"))
            await asyncio.sleep(0.01)
            b = asyncio.create_task(ask(apps[1], b"select 1"))
            c = asyncio.create_task(ask(apps[2], b"select 2"))
            await asyncio.sleep(0.01)
            assert (wants, lane.asking, lane.queue_length) == ([1], True, 2)
            assert await a == answer(b"BEGIN", b"T")
            linked = [s for s in lane.sides() if s.server and s.peer is not None]
            assert [s.status for s in linked] == [ord("T")]
            assert linked[0].peer.peer is linked[0]
            lane.owed_back = 1
            await asyncio.sleep(0.01)
            await asyncio.get_running_loop().sock_sendall(apps[0], query("COMMIT"))
            eject = await ejects.first()
            assert (eject.client, eject.server, eject.reason) == (None, "server 0", _lane.RETURNED)
            assert (lane.owed_back, lane.queue_length, lane.free_servers) == (0, 2, 0)
            db, proxy_end = socket.socketpair()  # Python answers on_want: another server
            try:
                for sock in (db, proxy_end):
                    sock.setblocking(False)
                database = Database(db)
                lane.asking = False
                lane.add_server("server 1", proxy_end.fileno())
                assert await b == answer(b"select 1")
                assert await c == answer(b"select 2")
                assert (lane.queue_length, lane.free_servers, wants) == (0, 1, [1])
                assert lane.give_back() == 1
                assert [(e.server, e.reason) for e in ejects[1:]] == [("server 1", _lane.RETURNED)]
                assert lane.free_servers == 0
            finally:
                database.task.cancel()
                db.close()
                proxy_end.close()

    run(main())


def test_a_transaction_keeps_its_server_until_idle() -> None:
    async def main() -> None:
        async with pool(clients=2, servers=2) as (lane, apps, dbs, ejects):
            a, b = apps
            assert await ask(a, b"BEGIN") == answer(b"BEGIN", b"T")
            assert lane.free_servers == 1, "in a transaction: the server stays linked"
            assert await ask(b, b"select 1") == answer(b"select 1")
            assert await ask(a, b"update x") == answer(b"update x", b"T")
            assert await ask(a, b"COMMIT") == answer(b"COMMIT")
            a_db = next(db for db in dbs if b"BEGIN" in db.seen)
            assert a_db.seen == [b"BEGIN", b"update x", b"COMMIT"]
            assert (lane.transactions, lane.free_servers) == (2, 2)
            assert not ejects

    run(main())


def test_data_from_an_idle_server_ejects_it_alone() -> None:
    async def main() -> None:
        async with pool(clients=1, servers=1) as (lane, apps, dbs, ejects):
            notice = msg(b"N", b"SWARNING\x00\x00")
            dbs[0].task.cancel()
            await asyncio.get_running_loop().sock_sendall(dbs[0].sock, notice)
            eject = await ejects.first()
            assert len(ejects) == 1
            assert (eject.client, eject.server, eject.reason) == (
                None, "server 0", _lane.UNSOLICITED)  # fmt: skip
            assert eject.server_unread == notice
            assert lane.free_servers == 0
            await asyncio.get_running_loop().sock_sendall(apps[0], query("select 1"))
            await asyncio.sleep(0.01)
            assert lane.queued_clients == 1, "no server left: the client waits"

    run(main())


def test_a_refused_request_from_an_idle_client_is_all_handed_back() -> None:
    async def main() -> None:
        async with pool(clients=1, servers=1) as (lane, apps, dbs, ejects):
            request = query("select 1") + msg(b"X")  # Terminate: Python's business
            await asyncio.get_running_loop().sock_sendall(apps[0], request)
            eject = await ejects.first()
            assert len(ejects) == 1
            assert (eject.client, eject.server, eject.reason) == ("client 0", None, "refused")
            assert eject.client_unread == request, "none of it was forwarded"
            assert dbs[0].seen == []
            assert lane.free_servers == 1

    run(main())


@settings(max_examples=15, deadline=None)
@given(
    servers=st.integers(min_value=1, max_value=3),
    work=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=6),
)
def test_many_clients_few_servers_each_gets_its_own_answers(servers: int, work: list[int]) -> None:
    async def main() -> None:
        async with pool(clients=len(work), servers=servers) as (lane, apps, dbs, ejects):

            async def client(i: int, app: socket.socket) -> list[bytes]:
                return [await ask(app, b"select %d, %d" % (i, n)) for n in range(work[i])]

            results = await asyncio.gather(*(client(i, app) for i, app in enumerate(apps)))
            for i, got in enumerate(results):
                assert got == [answer(b"select %d, %d" % (i, n)) for n in range(work[i])]
            assert lane.transactions == sum(work)
            assert sum(len(db.seen) for db in dbs) == sum(work)
            assert lane.free_servers == servers
            assert not ejects

    run(main())


_WORDS = [w.decode() for w in session.HINT_WORDS] + [
    p.decode() + "_x" for p in session.HINT_PREFIXES
]
_VOCABULARY = ["select", "1", "from", "t", "where", "x", "=", "'a'", ";", "insert", "into", *_WORDS]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(_VOCABULARY), min_size=1, max_size=8))
def test_session_check_refuses_what_the_session_tracker_would_look_at(words: list[str]) -> None:
    """The lane's check is the Python path's own first look (session.hint), in C: a
    query it flags is left to the Python path, which decides what it does."""
    sql = " ".join(words)
    flagged = session.hint(sql.encode() + b"\x00")

    async def main() -> None:
        async with rig(session_check=True) as r:
            request = query(sql)
            await r.send(r.app, request)
            if flagged:
                eject = await r.ejected()
                assert (eject.reason, eject.client_unread) == (_lane.REFUSED, request)
                assert drain(r.db) == b""
            else:
                assert await r.receive(r.db, len(request)) == request
                assert not r.ejects

    run(main())


def test_the_clocks_time_the_wait_the_query_and_the_transaction() -> None:
    """Lower bounds only: the database takes 20 ms per query, so the lane's clocks
    (time.monotonic()'s, for the sweep's timeouts and SHOW STATS) must see about that."""

    async def main() -> None:
        async with pool(clients=2, servers=1, delay=0.02) as (lane, apps, _, ejects):
            start = time.monotonic()
            first = asyncio.create_task(ask(apps[0], b"select 1"))
            await asyncio.sleep(0.005)
            assert await ask(apps[1], b"select 2") == answer(b"select 2")
            await first
            # two queries of 20 ms each (uvloop's timers have 1 ms granularity)
            assert lane.query_time >= 0.035
            assert lane.xact_time >= lane.query_time - 1e-3
            assert lane.wait_time >= 0.01, "the second client waited for the first"
            assert lane.xact_time <= time.monotonic() - start
            assert not ejects

    run(main())


def test_a_side_knows_when_it_was_last_read_and_a_server_when_it_got_busy() -> None:
    async def main() -> None:
        async with rig() as r:
            before = time.monotonic()
            await r.send(r.app, query("select 1"))
            await r.receive(r.db, len(query("select 1")))
            assert before <= r.client_side.last_active <= time.monotonic()
            assert before <= r.server_side.busy_since <= time.monotonic()
            assert r.server_side.linked_since <= before, "linked since it entered"
            await r.send(r.db, RESPONSE + READY)
            await r.receive(r.app, len(RESPONSE + READY))
            await asyncio.sleep(0.005)
            assert (r.server_side.busy_since, r.server_side.linked_since) == (0, 0)

    run(main())


def test_a_queued_client_that_floods_is_not_read_until_served() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sides: list[Any] = []
        async with pool(clients=2, servers=1, sides=sides) as (_, apps, dbs, _e):
            hold = dbs[0].hold = asyncio.Event()  # the first transaction lasts until set
            first = asyncio.create_task(ask(apps[0], b"select 0"))
            await until(lambda: dbs[0].seen == [b"select 0"], what="the first query served")
            sqls = [b"select %d" % n for n in range(1, 8001)]  # ~130 KB of requests
            flood = asyncio.create_task(
                loop.sock_sendall(apps[1], b"".join(msg(b"Q", q + b"\x00") for q in sqls))
            )
            queued = sides[1]
            await until(lambda: queued.muted, what="more than max_message sent while queued")
            await asyncio.sleep(0.02)  # and is not read any more
            assert queued.queued
            assert queued.muted
            assert queued.buffered <= 65536 + 65536, "read at most one more buffer"
            hold.set()
            await first
            expected = b"".join(answer(q) for q in sqls)
            got = b""
            async with asyncio.timeout(30):
                while len(got) < len(expected):
                    got += await loop.sock_recv(apps[1], 1 << 20)
            await flood
            assert got == expected, "all of it served, in order, once served"
            assert dbs[0].seen == [b"select 0", *sqls]
            assert not queued.muted

    run(main())
