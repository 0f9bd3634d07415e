"""The whole millpond exception hierarchy, grouped by cause.

Every error millpond raises derives from :class:`MillpondError`. Driver errors that
are not about the pool (a syntax error, a constraint violation) pass through
unchanged; driver errors that *are* about reaching the database are translated at
the driver boundary into :class:`DatabaseUnavailable` with the original chained as
``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from millpond.pool.stats import PoolStats


class MillpondError(Exception):
    """Root of every error millpond raises itself."""


class ConfigError(MillpondError, ValueError):
    """A setting is missing, unknown or out of range.

    ``setting`` names it; ``source`` says where it came from (a file and line for
    config files, the keyword for code).
    """

    def __init__(self, setting: str, message: str, *, source: str | None = None) -> None:
        self.setting = setting
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{setting}: {message}")


class PoolError(MillpondError):
    """Something went wrong while lending a connection."""


class PoolTimeout(PoolError, TimeoutError):
    """No connection became available within ``acquire_timeout``.

    ``stats`` is the pool's snapshot at the moment of the timeout (in use, waiting,
    the age of the oldest lease), so the message tells *why* the pool was empty.
    """

    def __init__(self, message: str, stats: PoolStats | None = None) -> None:
        self.stats = stats
        super().__init__(message)


class PoolOverloaded(PoolError):
    """The wait queue is full (``max_waiting``); the request was rejected at once."""


class PoolClosed(PoolError):
    """The pool is closed (or closing) and lends nothing more."""


class DatabaseUnavailable(PoolError):
    """The database could not be reached; the driver's error is chained as ``__cause__``."""


class CircuitOpen(DatabaseUnavailable):
    """The circuit breaker is open: the database failed recently, so fail fast."""


class CommitUnknown(MillpondError):
    """The connection was lost while COMMIT was under way: the transaction may or may not
    have been committed. Never retried; the driver's error is chained as ``__cause__``.
    Check the data (or make the transaction idempotent) before running it again.
    """


class ProtocolError(MillpondError):
    """A peer sent bytes that break the PostgreSQL wire protocol."""
