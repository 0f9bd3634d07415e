"""The psycopg 3 adapter.

Connections are opened in autocommit mode (as asyncpg's are), so a one-off query
leaves no transaction open and release costs no round trip. Cursor subclasses watch
the SQL they send for statements that leave session state behind; client-side
settings a borrower changed (autocommit, isolation level, read only, deferrable) also
make the connection dirty, and a reset restores them.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg import pq

from millpond.drivers.base import Driver, describe, leaves_session_state_bytes
from millpond.errors import DatabaseUnavailable
from millpond.pool.core import Release
from millpond.resilience.timeouts import hard_timeout

_OK = pq.ConnStatus.OK
_IDLE = pq.TransactionStatus.IDLE
_IN_TX = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

#: Errors that end the session: admin_shutdown, crash_shutdown, cannot_connect_now.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})


def is_disconnect(exc: BaseException) -> bool:
    """Does ``exc`` (from psycopg) say the connection to the server is gone?

    Only psycopg's own errors count (it wraps socket errors): an ``OSError`` raised by
    other code in the borrower's block says nothing about the connection.
    """
    if isinstance(exc, psycopg.errors.CancellationTimeout):
        return False
    if isinstance(exc, psycopg.OperationalError):
        code = exc.sqlstate
        if code is not None:
            return code.startswith("08") or code in _SESSION_ENDED
        # Raised by the client itself: "server closed the connection unexpectedly",
        # "consuming input failed", "the connection is closed", ...
        pgconn = exc.pgconn
        return pgconn is None or pgconn.status != _OK
    return False


def never_sent(exc: BaseException) -> bool:
    """psycopg refused to send because the connection was already closed."""
    return (
        isinstance(exc, psycopg.OperationalError)
        and exc.sqlstate is None
        and str(exc) == "the connection is closed"
    )


class _Watch:
    """Mixin for cursors: flag the connection when a query leaves session state."""

    _conn: Any

    def _convert_query(self, query: Any, params: Any = None) -> Any:
        pgq = super()._convert_query(query, params)  # type: ignore[misc]
        conn = self._conn
        if not conn._millpond_dirty and leaves_session_state_bytes(bytes(pgq.query)):
            conn._millpond_dirty = True
        return pgq


class PooledCursor(_Watch, psycopg.AsyncCursor[Any]):
    pass


class PooledServerCursor(_Watch, psycopg.AsyncServerCursor[Any]):
    pass


class PooledConnection(psycopg.AsyncConnection[Any]):
    """A psycopg connection whose cursors report session-state statements."""

    _millpond_dirty = False
    # Client-side settings as they were when the connection was set up.
    _millpond_row_factory: Any = None
    _millpond_prepare_threshold: int | None = None

    def _millpond_remember(self) -> None:
        self._millpond_row_factory = self.row_factory
        self._millpond_prepare_threshold = self.prepare_threshold

    def _millpond_changed(self) -> bool:
        return (
            not self._autocommit
            or self._isolation_level is not None
            or self._read_only is not None
            or self._deferrable is not None
            or self.row_factory is not self._millpond_row_factory
            or self.prepare_threshold != self._millpond_prepare_threshold
        )


class PsycopgDriver(Driver):
    name = "psycopg"

    async def connect(self, timeout: float) -> Any:
        kwargs = dict(self.connect_kwargs)
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", max(2, int(timeout + 0.999)))
        try:
            async with asyncio.timeout(timeout):
                conn = await PooledConnection.connect(self.dsn or "", **kwargs)
        except (psycopg.OperationalError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"psycopg could not connect: {describe(exc)}") from exc
        conn.cursor_factory = PooledCursor
        conn.server_cursor_factory = PooledServerCursor
        conn._millpond_remember()
        return conn

    def verdict(self, conn: Any) -> Release:
        pgconn = conn.pgconn
        if pgconn.status != _OK:
            return Release.LOST
        status = pgconn.transaction_status
        if status == _IDLE:
            if conn._millpond_dirty or conn._millpond_changed():
                return Release.DIRTY
            return Release.CLEAN
        if status in _IN_TX:
            return Release.DIRTY
        return Release.BROKEN  # a query still active, or status unknown

    def is_alive(self, conn: Any) -> bool:
        pgconn = conn.pgconn
        if pgconn.status != _OK:
            return False
        # Nobody reads an idle psycopg socket. If it is readable, the server sent
        # something unasked: a notice, or its farewell (FATAL, then EOF). Let libpq
        # read it: the second read sees the EOF. No round trip either way.
        if not select.select((pgconn.socket,), (), (), 0)[0]:
            return True
        try:
            pgconn.consume_input()
            pgconn.consume_input()
        except psycopg.Error:
            return False
        return bool(pgconn.status == _OK)

    async def reset(self, conn: Any) -> None:
        if conn.pgconn.transaction_status != _IDLE:
            await conn.rollback()
        if not conn._autocommit:
            await conn.set_autocommit(True)
        await conn.set_isolation_level(None)
        await conn.set_read_only(None)
        await conn.set_deferrable(None)
        conn.row_factory = conn._millpond_row_factory
        conn.prepare_threshold = conn._millpond_prepare_threshold
        await conn.execute("DISCARD ALL", prepare=False)
        _forget_prepared(conn)
        conn._millpond_dirty = False

    async def ping(self, conn: Any) -> None:
        await conn.execute("SELECT 1")

    async def close(self, conn: Any) -> None:
        await conn.close()

    def terminate(self, conn: Any) -> None:
        conn.pgconn.finish()

    def mark_dirty(self, conn: Any) -> None:
        conn._millpond_dirty = True

    def mark_clean(self, conn: Any) -> None:
        conn._millpond_dirty = False
        conn._millpond_remember()

    def is_disconnect(self, exc: BaseException) -> bool:
        return is_disconnect(exc)

    def never_sent(self, exc: BaseException) -> bool:
        return never_sent(exc)

    # Query timeouts use hard_timeout: psycopg absorbs the first cancellation to cancel
    # the query politely (up to 10 s on a dead network); a second one drops the link.

    async def fetch(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> list[Any]:
        async with hard_timeout(timeout):
            cur = await conn.execute(query, args or None)
            rows: list[Any] = await cur.fetchall()
            return rows

    async def fetchrow(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> Any:
        async with hard_timeout(timeout):
            cur = await conn.execute(query, args or None)
            return await cur.fetchone()

    async def fetchval(
        self, conn: Any, query: str, args: Sequence[Any], column: int, timeout: float | None
    ) -> Any:
        async with hard_timeout(timeout):
            cur = await conn.execute(query, args or None)
            row = await cur.fetchone()
            return None if row is None else row[column]

    async def execute(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> str:
        async with hard_timeout(timeout):
            cur = await conn.execute(query, args or None)
            return str(cur.statusmessage or "")

    async def executemany(
        self, conn: Any, query: str, args: Iterable[Sequence[Any]], timeout: float | None
    ) -> None:
        async with hard_timeout(timeout), conn.cursor() as cur:
            await cur.executemany(query, args)

    def transaction(
        self, conn: Any, *, isolation: str | None, readonly: bool, deferrable: bool
    ) -> AbstractAsyncContextManager[Any]:
        if isolation is None and not readonly and not deferrable:
            tx: AbstractAsyncContextManager[Any] = conn.transaction()
            return tx
        return _begin(conn, _begin_sql(isolation, readonly, deferrable))


def _forget_prepared(conn: Any) -> None:
    """DISCARD ALL dropped the server's prepared statements: make psycopg forget them.

    psycopg clears its cache on DISCARD ALL only the first time a connection runs it
    (later runs are cache hits and skip the check), and would then execute statements
    the server no longer has: "prepared statement _pg3_0 does not exist".
    """
    prepared = conn._prepared
    prepared._counts.clear()
    prepared._names.clear()
    prepared._to_flush.clear()


def _begin_sql(isolation: str | None, readonly: bool, deferrable: bool) -> str:
    parts = ["BEGIN"]
    if isolation is not None:
        level = isolation.replace("_", " ").upper()
        if level not in ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED"):
            raise ValueError(f"unknown isolation level {isolation!r}")
        parts.append(f"ISOLATION LEVEL {level}")
    if readonly:
        parts.append("READ ONLY")
    if deferrable:
        parts.append("DEFERRABLE")
    return " ".join(parts)


@asynccontextmanager
async def _begin(conn: Any, begin: str) -> AsyncIterator[Any]:
    await conn.execute(begin)
    try:
        yield conn
    except BaseException:
        if not conn.closed:
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
