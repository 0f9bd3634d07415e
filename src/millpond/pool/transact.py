"""Transactions on lent connections, and re-running them on retryable errors.

:class:`Transaction` wraps the driver's own transaction (so isolation, read-only and
deferrable work as the driver does them) and adds two guarantees:

- the ROLLBACK after a failed body is bounded by ``reset_timeout``; on a dead network
  the connection is dropped instead of hanging, and the body's error is what the
  caller sees, never the rollback's;
- a connection lost while COMMIT was under way raises
  :class:`~millpond.errors.CommitUnknown` (cause chained): the outcome is unknown, so
  it is never retried. A COMMIT the server *answered* with an error (a serialization
  failure, a deferred constraint) was not committed and passes through unchanged.

:func:`run_transaction` runs a whole transaction function through
:func:`~millpond.resilience.retry.retry_call`, counting retries and give-ups.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from millpond.errors import CommitUnknown
from millpond.resilience.retry import RetryPolicy, is_retryable, retry_call
from millpond.resilience.timeouts import hard_timeout

if TYPE_CHECKING:
    from millpond.pool.pool import Pool

log = logging.getLogger("millpond.pool")

T = TypeVar("T")


class Transaction:
    """BEGIN, then COMMIT or a bounded ROLLBACK, on one lent connection."""

    __slots__ = ("_cm", "_conn", "_pool")

    def __init__(
        self, pool: Pool, conn: Any, isolation: str | None, readonly: bool, deferrable: bool
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._cm = pool.driver.transaction(
            conn, isolation=isolation, readonly=readonly, deferrable=deferrable
        )

    async def begin(self) -> None:
        await self._cm.__aenter__()

    async def commit(self) -> None:
        try:
            await self._cm.__aexit__(None, None, None)
        except Exception as exc:
            # An error the server sent in answer (40001, a deferred constraint) means
            # "not committed"; a lost connection means nobody knows.
            if self._pool._lost(exc):
                raise CommitUnknown(
                    f"pool {self._pool.name!r}: connection lost during COMMIT; the "
                    f"transaction may or may not have been committed: {exc}"
                ) from exc
            raise

    async def rollback(self, error: BaseException) -> bool:
        """Roll back after ``error``; True if the driver swallows it (psycopg.Rollback).

        A failure of the rollback itself is logged, not raised: the connection is
        dropped and the caller sees ``error``.
        """
        try:
            async with hard_timeout(self._pool.config.reset_timeout):
                return bool(await self._cm.__aexit__(type(error), error, error.__traceback__))
        except Exception as exc:
            if exc is not error:
                log.info("pool %r: rollback failed, dropping connection: %r", self._pool.name, exc)
                self._pool.driver.terminate(self._conn)
            return False


async def run_transaction(
    pool: Pool,
    fn: Callable[[Any], Awaitable[T]],
    policy: RetryPolicy,
    isolation: str | None,
    readonly: bool,
    deferrable: bool,
) -> T:
    """``await fn(conn)`` in a transaction, re-run from the start on retryable errors."""
    counters = pool._core.counters

    async def attempt() -> T:
        async with pool.acquire() as conn:
            tx = Transaction(pool, conn, isolation, readonly, deferrable)
            await tx.begin()
            try:
                result = await fn(conn)
            except BaseException as exc:
                if await tx.rollback(exc):
                    return cast(T, None)  # the driver's "roll back quietly" (psycopg)
                raise
            await tx.commit()
            return result

    def retryable(exc: BaseException) -> bool:
        return is_retryable(exc, in_transaction=True, is_disconnect=pool._lost)

    def on_retry(exc: BaseException, failures: int, delay: float) -> None:
        counters.retries += 1
        log.info(
            "pool %r: transaction attempt %d failed, retrying in %.3fs: %r",
            pool.name,
            failures,
            delay,
            exc,
        )

    def on_give_up(exc: BaseException) -> None:
        counters.retry_giveups += 1

    return await retry_call(
        attempt, policy, retryable=retryable, on_retry=on_retry, on_give_up=on_give_up
    )
