"""Clients waiting for a server connection (more clients than the pool holds).

Waiting clients get the server connection first come, first served. A waiting client is
still read: what it sends meanwhile is kept, in order, behind what it sent first (up to
256 KB, then reading stops until a server is linked), and a client that leaves while it
waits is noticed at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import psycopg
from psycopg.rows import dict_row

from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.codec import MessageReader
from millpond.proxy.protocol.parsers import decode_data_row
from tests.e2e.conftest import ProxyFactory, ProxyProcess
from tests.helpers import run


class RawClient:
    """A bare protocol client: what it sends and when is up to the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.messages = MessageReader()

    @classmethod
    async def connect(cls, proxy: ProxyProcess) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        client = cls(reader, writer)
        writer.write(m.startup_message({"user": "postgres", "database": "postgres"}))
        await client.until_ready()
        return client

    async def until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the next ReadyForQuery."""
        seen = []
        while True:
            msg = self.messages.next_message()
            if msg is None:
                chunk = await asyncio.wait_for(self.reader.read(65536), 10)
                assert chunk, f"the proxy closed the connection after {seen}"
                self.messages.feed(chunk)
                continue
            seen.append((msg.type, bytes(msg.payload)))
            if msg.type == m.READY_FOR_QUERY:
                return seen

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


def _values(answer: list[tuple[bytes, bytes]]) -> list[bytes | None]:
    return [decode_data_row(payload).values[0] for kind, payload in answer if kind == b"D"]


async def _hold_the_only_server(proxy: ProxyProcess) -> asyncpg.Connection:
    holder = await asyncpg.connect(proxy.url())
    await holder.execute("BEGIN")  # transaction mode: the server stays with the holder
    return holder


def test_what_a_waiting_client_sends_arrives_in_order(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        holder = await _hold_the_only_server(proxy)
        waiter = await RawClient.connect(proxy)
        try:
            waiter.send(m.query("SELECT 'first'"))
            await asyncio.sleep(0.2)  # it waits now; then it sends more, separately
            waiter.send(m.query("SELECT 'second'"))
            waiter.send(m.query("SELECT 'third'") + m.query("SELECT 'fourth'"))
            await asyncio.sleep(0.2)
            await holder.execute("COMMIT")
            got = []
            for _ in range(4):
                got += _values(await waiter.until_ready())
            assert got == [b"first", b"second", b"third", b"fourth"]
        finally:
            waiter.close()
            await holder.close()

    run(main())


def test_a_waiting_client_sending_a_lot_is_paused_not_lost(proxy_factory: ProxyFactory) -> None:
    """Past 256 KB the proxy stops reading the waiting client; nothing is dropped."""
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        holder = await _hold_the_only_server(proxy)
        waiter = await RawClient.connect(proxy)
        try:
            big = "x" * 100_000
            for i in range(8):  # 800 KB of queries while no server is free
                waiter.send(m.query(f"SELECT length('{big}') + {i}"))
            await asyncio.sleep(0.3)
            await holder.execute("COMMIT")
            got = []
            for _ in range(8):
                got += _values(await waiter.until_ready())
            assert got == [str(100_000 + i).encode() for i in range(8)]
        finally:
            waiter.close()
            await holder.close()

    run(main())


def test_a_client_leaving_while_it_waits_is_noticed_at_once(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def waiting_clients(admin: psycopg.AsyncConnection[dict[str, Any]]) -> int:
        cur = await admin.execute("SHOW POOLS")  # the console speaks the simple protocol
        return sum(r["cl_waiting"] for r in await cur.fetchall() if r["database"] == "postgres")

    async def main() -> None:
        holder = await _hold_the_only_server(proxy)
        admin = await psycopg.AsyncConnection.connect(
            proxy.url(db="pgbouncer"), autocommit=True, row_factory=dict_row
        )
        waiter = await RawClient.connect(proxy)
        try:
            waiter.send(m.query("SELECT 1"))
            deadline = time.monotonic() + 5
            while await waiting_clients(admin) != 1:
                assert time.monotonic() < deadline, "the client never showed as waiting"
                await asyncio.sleep(0.05)
            waiter.close()
            deadline = time.monotonic() + 2  # the holder keeps the server all along
            while await waiting_clients(admin) != 0:
                assert time.monotonic() < deadline, "a gone client still counts as waiting"
                await asyncio.sleep(0.05)
            assert await holder.fetchval("SELECT 42") == 42
        finally:
            await admin.close()
            await holder.close()

    run(main())


def test_waiting_clients_are_served_first_come_first_served(proxy_factory: ProxyFactory) -> None:
    """One server connection, five clients queued one after another: each is handed the
    server in the order it asked (a sequence numbers the order the server saw)."""
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        setup = await asyncpg.connect(proxy.url())
        await setup.execute("DROP SEQUENCE IF EXISTS served; CREATE SEQUENCE served")
        await setup.close()
        holder = await _hold_the_only_server(proxy)
        clients = [await RawClient.connect(proxy) for _ in range(5)]
        try:
            for client in clients:
                client.send(m.query("SELECT nextval('served')"))
                await asyncio.sleep(0.05)  # queued one after the other
            await holder.execute("COMMIT")
            served = [int(_values(await c.until_ready())[0] or b"0") for c in clients]
            assert served == sorted(served), f"served out of order: {served}"
            assert served == list(range(served[0], served[0] + 5))
        finally:
            for client in clients:
                client.close()
            await holder.close()

    run(main())
