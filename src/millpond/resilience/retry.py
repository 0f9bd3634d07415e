"""Retry policy: which errors may be retried, and how long to wait between tries.

Retrying is only safe when the failed attempt cannot have changed anything. The
classification (:func:`is_retryable`) says yes to:

- connect failures (:class:`~millpond.errors.DatabaseUnavailable`, including
  :class:`~millpond.errors.CircuitOpen`): nothing was sent;
- serialization failures (SQLSTATE 40001) and deadlocks (40P01): the server rolled
  the transaction back;
- a lost connection *inside a transaction, before COMMIT was sent*: the server rolls
  back a transaction whose connection is gone. Outside a transaction only a loss the
  driver reports *before* sending the statement counts.

and no to everything else: syntax errors, constraint violations, timeouts, pool
timeouts and overload, and anything after a possible commit: a connection lost while
COMMIT was under way is :class:`~millpond.errors.CommitUnknown`, never retried.

Retries happen only where asked for: ``pool.run_transaction(fn, retry=...)`` re-runs
the whole transaction function; :func:`retry_call` is the same loop for any coroutine
function you know to be safe to repeat.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import monotonic
from typing import TypeVar

from millpond.errors import CommitUnknown, ConfigError, DatabaseUnavailable, MillpondError
from millpond.resilience.backoff import Backoff

T = TypeVar("T")

#: serialization_failure, deadlock_detected: the transaction was rolled back; try again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

RetryHook = Callable[[BaseException, int, float], object]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry.

    ``attempts`` counts every try, the first included; ``deadline`` bounds the whole
    operation: no retry is scheduled that would start after it. Delays grow from
    ``base`` by doubling up to ``cap``, with equal jitter (see :mod:`.backoff`).
    """

    attempts: int = 5
    base: float = 0.05
    cap: float = 2.0
    deadline: float | None = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError("attempts", f"expected a whole number, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError("attempts", f"must be at least 1, got {self.attempts}")
        Backoff(self.base, self.cap)  # validates base and cap
        deadline = self.deadline
        if deadline is not None and (isinstance(deadline, bool) or not deadline > 0):
            raise ConfigError("deadline", f"must be seconds above zero or None, got {deadline!r}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.base, self.cap)

    def gives_up(self, failures: int, elapsed: float, delay: float) -> str | None:
        """Why no further attempt may follow ``failures`` failed ones, or None."""
        if failures >= self.attempts:
            return f"{failures} of {self.attempts} attempts failed"
        if self.deadline is not None and elapsed + delay > self.deadline:
            return f"the next attempt would start after the {self.deadline:g}s deadline"
        return None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE an asyncpg or psycopg error carries, if any."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


def _default_is_disconnect(exc: BaseException) -> bool:
    from millpond.drivers import is_disconnect

    return is_disconnect(exc)


def _default_never_sent(exc: BaseException) -> bool:
    from millpond.drivers import never_sent

    return never_sent(exc)


def is_retryable(
    exc: BaseException,
    *,
    in_transaction: bool = True,
    is_disconnect: Callable[[BaseException], bool] = _default_is_disconnect,
    never_sent: Callable[[BaseException], bool] = _default_never_sent,
) -> bool:
    """May the operation that raised ``exc`` be run again from the start?

    ``in_transaction``: ``exc`` came from inside a transaction before its COMMIT was
    sent (what :meth:`Pool.run_transaction` sees), so a lost connection rolled it back.
    """
    if isinstance(exc, CommitUnknown):
        return False
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, MillpondError) or not isinstance(exc, Exception):
        return False
    if sqlstate(exc) in RETRYABLE_SQLSTATES:
        return True
    if is_disconnect(exc):
        return in_transaction or never_sent(exc)
    return False


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retryable: Callable[[BaseException], bool] = is_retryable,
    on_retry: RetryHook | None = None,
    on_give_up: Callable[[BaseException], object] | None = None,
    rng: Callable[[], float] = random.random,
    clock: Callable[[], float] = monotonic,
) -> T:
    """``await fn()``, again after each retryable failure, as ``policy`` allows.

    ``on_retry(exc, failures, delay)`` runs before each wait; ``on_give_up(exc)`` when
    a retryable error is raised because attempts or time ran out (a note on the error
    says which). Errors that are not retryable are raised at once, unchanged.
    """
    start = clock()
    backoff = policy.backoff
    failures = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not retryable(exc):
                raise
            delay = backoff.delay(failures, rng)
            failures += 1
            reason = policy.gives_up(failures, clock() - start, delay)
            if reason is not None:
                exc.add_note(f"millpond: not retried again: {reason}")
                if on_give_up is not None:
                    on_give_up(exc)
                raise
            if on_retry is not None:
                on_retry(exc, failures, delay)
        await asyncio.sleep(delay)
