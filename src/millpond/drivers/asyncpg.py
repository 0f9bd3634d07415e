"""The asyncpg adapter.

Connections are a subclass of :class:`asyncpg.Connection` that watches the SQL going
through it for statements that leave session state behind, so a clean release costs
nothing and a dirty one is reset before the next borrower sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from millpond.drivers.base import Driver, describe, leaves_session_state
from millpond.errors import DatabaseUnavailable
from millpond.pool.core import Release

_RESET_SQL = "DISCARD ALL"

# Errors that mean "the database could not be reached or let us in".
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


#: Errors that end the session: admin_shutdown, crash_shutdown, cannot_connect_now.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
#: asyncpg's complaint when its protocol is stuck in "error consume" (state 2).
_ERROR_CONSUME = "another operation (2) is in progress"


def is_disconnect(exc: BaseException) -> bool:
    """Does ``exc`` (from asyncpg) say the connection to the server is gone?

    Only asyncpg's own errors count (it wraps socket errors during queries): an
    ``OSError`` raised by other code in the borrower's block says nothing about us.
    """
    if isinstance(exc, asyncpg.PostgresConnectionError):  # class 08
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "sqlstate", None) in _SESSION_ENDED
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return never_sent(exc)
    return False


def never_sent(exc: BaseException) -> bool:
    """asyncpg refused to send: the connection was closed, or was told it is ending.

    The second case is a race the pool cannot see: a server ending a session sends
    FATAL, then closes the socket. If the event loop reads the FATAL in one iteration
    and the close in the next, asyncpg parks the idle connection in its internal
    "error consume" state (2) in between, where it still looks connected, and the
    next statement fails with InternalClientError before anything is written.
    """
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection is closed" in str(exc)
    return isinstance(exc, asyncpg.InternalClientError) and _ERROR_CONSUME in str(exc)


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that notices statements leaving session state."""

    __slots__ = ("_millpond_dirty",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._millpond_dirty = False

    def _get_statement(self, query: str, timeout: Any, **kwargs: Any) -> Any:
        # Every extended-protocol query (fetch*, execute with args, prepare, cursors)
        # passes here. Not async on purpose: no extra coroutine frame per query.
        if not self._millpond_dirty and leaves_session_state(query):
            self._millpond_dirty = True
        return super()._get_statement(query, timeout, **kwargs)

    def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        if not self._millpond_dirty and leaves_session_state(query):
            self._millpond_dirty = True
        return super().execute(query, *args, timeout=timeout)

    def get_reset_query(self) -> str:
        return _RESET_SQL


class AsyncpgDriver(Driver):
    name = "asyncpg"

    async def connect(self, timeout: float) -> Any:
        kwargs = dict(self.connect_kwargs)
        kwargs.setdefault("connection_class", PooledConnection)
        try:
            return await asyncpg.connect(self.dsn, timeout=timeout, **kwargs)
        except CONNECT_ERRORS as exc:
            raise DatabaseUnavailable(f"asyncpg could not connect: {describe(exc)}") from exc

    def verdict(self, conn: Any) -> Release:
        proto = conn._protocol
        if conn._aborted or proto is None or not proto.is_connected():
            return Release.LOST
        if (
            conn._millpond_dirty
            or proto.is_in_transaction()
            or conn._top_xact is not None
            or proto._is_cancelling()
        ):
            return Release.DIRTY
        return Release.CLEAN

    def is_alive(self, conn: Any) -> bool:
        # The transport's connection_lost flips this as soon as the event loop saw
        # the socket close (server restart, pg_terminate_backend): no round trip.
        return not conn.is_closed()

    async def reset(self, conn: Any) -> None:
        # Waits for a cancelled query to finish, rolls back, then DISCARD ALL.
        await conn.reset()
        # DISCARD ALL dropped the server side of asyncpg's cached statements.
        conn._drop_local_statement_cache()
        conn._millpond_dirty = False

    async def ping(self, conn: Any) -> None:
        await conn.execute("SELECT 1")

    async def close(self, conn: Any) -> None:
        await conn.close()

    def terminate(self, conn: Any) -> None:
        conn.terminate()

    def mark_dirty(self, conn: Any) -> None:
        conn._millpond_dirty = True

    def mark_clean(self, conn: Any) -> None:
        conn._millpond_dirty = False

    def is_disconnect(self, exc: BaseException) -> bool:
        return is_disconnect(exc)

    def never_sent(self, exc: BaseException) -> bool:
        return never_sent(exc)

    def fetch(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return conn.fetch(query, *args, timeout=timeout)

    def fetchrow(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return conn.fetchrow(query, *args, timeout=timeout)

    def fetchval(
        self, conn: Any, query: str, args: Sequence[Any], column: int, timeout: float | None
    ) -> Any:
        return conn.fetchval(query, *args, column=column, timeout=timeout)

    def execute(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return conn.execute(query, *args, timeout=timeout)

    def executemany(
        self, conn: Any, query: str, args: Iterable[Sequence[Any]], timeout: float | None
    ) -> Any:
        return conn.executemany(query, args, timeout=timeout)

    def transaction(
        self, conn: Any, *, isolation: str | None, readonly: bool, deferrable: bool
    ) -> AbstractAsyncContextManager[Any]:
        tx: AbstractAsyncContextManager[Any] = conn.transaction(
            isolation=isolation, readonly=readonly, deferrable=deferrable
        )
        return tx
