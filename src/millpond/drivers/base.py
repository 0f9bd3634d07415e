"""What the pool needs from a database driver, and session-state detection.

A driver adapter answers, without I/O, whether a connection coming back from a
borrower is clean, dirty (needs a reset) or broken, and performs the few I/O steps
the pool needs (connect, reset, ping, close). Errors about *reaching* the database
are translated here into :class:`~millpond.errors.DatabaseUnavailable` with the
driver's error chained; every other driver error passes through unchanged.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from millpond.pool.core import Release

# Statements that leave state in the *session* (not just the transaction). A match
# marks the connection dirty, so it is reset before anyone else borrows it. The
# pattern errs towards false positives (a needless reset) over false negatives.
_SESSION_WORDS = (
    r"set_config|pg_settings|pg_temp|pg_(?:try_)?advisory_lock(?:_shared)?|listen|unlisten|"
    r"prepare|deallocate|discard|temp|temporary|hold|role|session|authorization"
)
_LEADING = r"(?:\s+|--[^\n\r]*|/\*.*?\*/)*"
_SESSION_STATEMENTS = r"set|reset|do|load"
_PATTERN = (
    rf"\b(?:{_SESSION_WORDS})\b"
    rf"|(?:^|;){_LEADING}(?:{_SESSION_STATEMENTS})\b"
)
_SESSION_RE = re.compile(_PATTERN, re.IGNORECASE | re.DOTALL)
_SESSION_RE_BYTES = re.compile(_PATTERN.encode(), re.IGNORECASE | re.DOTALL)

_CACHE_MAX = 4096
_str_cache: dict[str, bool] = {}
_bytes_cache: dict[bytes, bool] = {}


def leaves_session_state(query: str) -> bool:
    """True if ``query`` may change session state (SET, LISTEN, temp tables, ...)."""
    hit = _str_cache.get(query)
    if hit is None:
        hit = _SESSION_RE.search(query) is not None
        if len(_str_cache) >= _CACHE_MAX:
            _str_cache.clear()
        _str_cache[query] = hit
    return hit


def leaves_session_state_bytes(query: bytes) -> bool:
    """:func:`leaves_session_state` for a query already encoded by the driver."""
    hit = _bytes_cache.get(query)
    if hit is None:
        hit = _SESSION_RE_BYTES.search(query) is not None
        if len(_bytes_cache) >= _CACHE_MAX:
            _bytes_cache.clear()
        _bytes_cache[query] = hit
    return hit


def describe(exc: BaseException) -> str:
    """An error's message, or its type when it has none (a bare TimeoutError)."""
    return str(exc).strip() or type(exc).__name__


def lost_connection(exc: BaseException) -> bool:
    """Driver-independent: a socket-level error (not a timeout) means the link is gone."""
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


class Driver(abc.ABC):
    """One adapter per driver. Stateless apart from its connect arguments."""

    name: str = "abstract"

    def __init__(self, dsn: str | None, connect_kwargs: dict[str, Any]) -> None:
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs

    # -- the pool's needs --------------------------------------------------------

    @abc.abstractmethod
    async def connect(self, timeout: float) -> Any:
        """Open one connection; raise DatabaseUnavailable (cause chained) on failure."""

    @abc.abstractmethod
    def verdict(self, conn: Any) -> Release:
        """Clean, dirty or broken? Must not do I/O: it runs on every release."""

    @abc.abstractmethod
    def is_alive(self, conn: Any) -> bool:
        """A cheap liveness signal (no round trip) checked before lending."""

    @abc.abstractmethod
    async def reset(self, conn: Any) -> None:
        """Roll back, and discard every piece of session state."""

    @abc.abstractmethod
    async def ping(self, conn: Any) -> None:
        """One round trip proving the connection works."""

    @abc.abstractmethod
    async def close(self, conn: Any) -> None:
        """Close politely (Terminate message)."""

    @abc.abstractmethod
    def terminate(self, conn: Any) -> None:
        """Drop the connection at once, without I/O waits."""

    @abc.abstractmethod
    def mark_dirty(self, conn: Any) -> None:
        """Force a reset on release (state the detector cannot see)."""

    @abc.abstractmethod
    def mark_clean(self, conn: Any) -> None:
        """The connection's present state is its baseline (after ``on_connect``)."""

    # -- error classification (no I/O) -------------------------------------------

    def is_disconnect(self, exc: BaseException) -> bool:
        """Does ``exc`` say the connection to the server is gone (not a timeout)?"""
        return lost_connection(exc)

    def never_sent(self, exc: BaseException) -> bool:
        """Was ``exc`` raised before the statement left the client (safe to resend)?"""
        return False

    # -- the everyday API, in the driver's own placeholder style ------------------

    @abc.abstractmethod
    def fetch(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> Awaitable[list[Any]]: ...

    @abc.abstractmethod
    def fetchrow(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> Awaitable[Any]: ...

    @abc.abstractmethod
    def fetchval(
        self, conn: Any, query: str, args: Sequence[Any], column: int, timeout: float | None
    ) -> Awaitable[Any]: ...

    @abc.abstractmethod
    def execute(
        self, conn: Any, query: str, args: Sequence[Any], timeout: float | None
    ) -> Awaitable[str]: ...

    @abc.abstractmethod
    def executemany(
        self, conn: Any, query: str, args: Iterable[Sequence[Any]], timeout: float | None
    ) -> Awaitable[None]: ...

    @abc.abstractmethod
    def transaction(
        self, conn: Any, *, isolation: str | None, readonly: bool, deferrable: bool
    ) -> AbstractAsyncContextManager[Any]: ...
