"""An in-memory driver: no database, no I/O. For unit tests and overhead benchmarks.

Its connections answer queries from a tiny script of their own (``SELECT 1`` style
queries return 1) and expose switches that tests flip: fail the next connects, make a
connection dead, leave it in a transaction or with session state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from millpond.drivers.base import Driver, leaves_session_state
from millpond.errors import DatabaseUnavailable
from millpond.pool.core import Release


class MemoryConnection:
    """A fake connection with the state the pool cares about."""

    __slots__ = ("alive", "closed", "dirty", "ident", "in_transaction", "pings", "resets")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.alive = True
        self.closed = False
        self.dirty = False
        self.in_transaction = False
        self.resets = 0
        self.pings = 0

    async def fetchval(self, query: str, *args: Any) -> Any:
        return self.run(query, args)

    def run(self, query: str, args: Sequence[Any]) -> Any:
        if not self.alive or self.closed:
            raise ConnectionError("memory connection is dead")
        if leaves_session_state(query):
            self.dirty = True
        word = query.split(None, 1)[0].upper() if query.strip() else ""
        if word == "BEGIN":
            self.in_transaction = True
        elif word in ("COMMIT", "ROLLBACK"):
            self.in_transaction = False
        return args[0] if args else 1

    def __repr__(self) -> str:
        return f"<MemoryConnection {self.ident} alive={self.alive}>"


class MemoryDriver(Driver):
    """Connections that live in this process; knobs for failure injection."""

    name = "memory"

    def __init__(self, dsn: str | None, connect_kwargs: dict[str, Any]) -> None:
        super().__init__(dsn, connect_kwargs)
        self.connect_delay: float = float(connect_kwargs.get("connect_delay", 0.0))
        self.fail_connects = 0  # fail this many upcoming connects
        self.down = False  # fail every connect while set
        self.opened: list[MemoryConnection] = []
        self.connect_attempts = 0

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self.opened if not c.closed)

    async def connect(self, timeout: float) -> MemoryConnection:
        self.connect_attempts += 1
        if self.connect_delay:
            await asyncio.sleep(self.connect_delay)
        if self.down or self.fail_connects > 0:
            self.fail_connects = max(0, self.fail_connects - 1)
            cause = ConnectionRefusedError("memory database is down")
            raise DatabaseUnavailable(f"memory driver could not connect: {cause}") from cause
        conn = MemoryConnection(len(self.opened) + 1)
        self.opened.append(conn)
        return conn

    def verdict(self, conn: MemoryConnection) -> Release:
        if not conn.alive or conn.closed:
            return Release.LOST
        if conn.dirty or conn.in_transaction:
            return Release.DIRTY
        return Release.CLEAN

    def is_alive(self, conn: MemoryConnection) -> bool:
        return conn.alive and not conn.closed

    async def reset(self, conn: MemoryConnection) -> None:
        await asyncio.sleep(0)
        if not conn.alive:
            raise ConnectionError("memory connection is dead")
        conn.dirty = conn.in_transaction = False
        conn.resets += 1

    async def ping(self, conn: MemoryConnection) -> None:
        await asyncio.sleep(0)
        conn.pings += 1
        if not conn.alive:
            raise ConnectionError("memory connection is dead")

    async def close(self, conn: MemoryConnection) -> None:
        conn.closed = True

    def terminate(self, conn: MemoryConnection) -> None:
        conn.closed = True

    def mark_dirty(self, conn: MemoryConnection) -> None:
        conn.dirty = True

    def mark_clean(self, conn: MemoryConnection) -> None:
        conn.dirty = False

    async def fetch(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> list[Any]:
        return [(conn.run(query, args),)]

    async def fetchrow(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> Any:
        return (conn.run(query, args),)

    def fetchval(
        self,
        conn: MemoryConnection,
        query: str,
        args: Sequence[Any],
        column: int,
        timeout: float | None,
    ) -> Any:
        return conn.fetchval(query, *args)

    async def execute(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> str:
        conn.run(query, args)
        return "OK"

    async def executemany(
        self,
        conn: MemoryConnection,
        query: str,
        args: Iterable[Sequence[Any]],
        timeout: float | None,
    ) -> None:
        for one in args:
            conn.run(query, one)

    def transaction(
        self, conn: MemoryConnection, *, isolation: str | None, readonly: bool, deferrable: bool
    ) -> AbstractAsyncContextManager[Any]:
        return _transaction(conn)


@asynccontextmanager
async def _transaction(conn: MemoryConnection) -> AsyncIterator[MemoryConnection]:
    conn.run("BEGIN", ())
    try:
        yield conn
    except BaseException:
        conn.run("ROLLBACK", ())
        raise
    conn.run("COMMIT", ())
