"""The compiled lane (millpond.proxy._lane): messages forwarded in C, every byte accounted.

Each test puts the proxy's ends of two socket pairs in a lane and plays the client and
the server on the other ends. Whatever happens, the bytes a side sent must come out
exactly once, in order: forwarded by the lane, or handed back at the eject (unread, to
feed to that side's protocol; owed, to write to the other side first), or still in the
socket for the transport to read once it resumes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import run

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
    client_unread: bytes
    client_owed: bytes
    server_unread: bytes
    server_owed: bytes
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

    def on_eject(
        client: object, c_unread: bytes, c_owed: bytes, server: object, s_unread: bytes,
        s_owed: bytes, reason: str,
    ) -> None:  # fmt: skip
        assert (client, server) == ("client", "server")
        ejects.append(Eject(c_unread, c_owed, s_unread, s_owed, reason))
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
    sqls=st.lists(st.text(min_size=1, max_size=200).map(lambda s: s.replace("\x00", "")),
                  min_size=1, max_size=6),
    client_chunks=chunkings,
    server_chunks=chunkings,
    tail=st.binary(max_size=30),
)  # fmt: skip
def test_a_query_cycle_is_forwarded_untouched_in_any_chunking(
    sqls: list[str], client_chunks: list[int], server_chunks: list[int], tail: bytes
) -> None:
    async def main() -> None:
        async with rig() as r:
            requests = b"".join(query(sql) for sql in sqls)
            await r.send(r.app, requests, client_chunks)
            assert await r.receive(r.db, len(requests)) == requests
            assert not r.ejects
            response = RESPONSE * len(sqls) + READY
            await r.send(r.db, response + tail, server_chunks)
            assert await r.receive(r.app, len(response)) == response
            eject = await r.ejected()
            assert eject.reason == _lane.END
            # what followed ReadyForQuery is the server's protocol's to read
            assert eject.server_unread + drain(r.proxy_server) == tail
            assert (eject.client_unread, eject.client_owed, eject.server_owed) == (b"", b"", b"")
            client, server = r.lane.enter(
                "client", r.proxy_client.fileno(), "server", r.db.fileno()
            )
            assert client.active, "an fd can enter again after an eject"
            assert server.active

    run(main())


@pytest.mark.parametrize(
    ("refused", "options"),
    [
        (msg(b"X"), {}),  # Terminate: not on the list
        (query("SET search_path TO x"), {"query_ok": lambda sql: not sql.startswith(b"SET")}),
        (msg(b"Q", bytes(100)), {"max_message": 64}),  # too long for the lane
        (b"Q\x00\x00\x00\x02", {}),  # a bad length: the Python path says so
    ],
    ids=["type", "query_ok", "max_message", "bad length"],
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
