"""The library pool: the async layer over :class:`~millpond.pool.core.PoolCore`.

The core decides; this layer performs the I/O the core asks for (through the driver
adapter, in janitor-owned tasks) and offers the everyday API. Acquiring an idle
connection and releasing a clean one never yields to the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from time import monotonic
from typing import Any, TypeVar

from millpond.config import PoolConfig
from millpond.drivers import Driver, get_driver
from millpond.drivers.base import lost_connection
from millpond.errors import (
    CommitUnknown,
    ConfigError,
    DatabaseUnavailable,
    PoolClosed,
    PoolTimeout,
)
from millpond.pool import transact
from millpond.pool.core import Act, PoolCore, Release
from millpond.pool.janitor import Janitor
from millpond.pool.lease import AcquireContext, capture_site, format_site
from millpond.pool.state import CloseReason, Slot
from millpond.pool.stats import PoolStats
from millpond.resilience.breaker import BreakerState
from millpond.resilience.retry import RetryPolicy
from millpond.resilience.timeouts import hard_timeout

log = logging.getLogger("millpond.pool")

T = TypeVar("T")

Hook = Callable[[Any], Awaitable[Any]]
#: ``on_breaker_change(old, new)``: a plain function or a coroutine function.
BreakerHook = Callable[[BreakerState, BreakerState], Any]

# Reasons for which a connection is dropped at once rather than closed politely.
_ABRUPT = frozenset(
    {
        CloseReason.BROKEN,
        CloseReason.RESET_FAILED,
        CloseReason.HEALTH_CHECK,
        CloseReason.LEAKED,
        CloseReason.STALE,
    }
)


def _janitor_interval(cfg: PoolConfig) -> float:
    times = [cfg.max_idle, cfg.max_lifetime, cfg.health_check_interval, cfg.leak_threshold]
    shortest = min((t for t in times if t is not None), default=1.0)
    return max(0.01, min(1.0, shortest / 4))


class Pool:
    """A pool of database connections for one asyncio event loop.

    Create it with :func:`millpond.create_pool`, then ``async with`` it, or ``await``
    it and ``await pool.close()`` when done.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        driver: str | Driver = "asyncpg",
        name: str | None = None,
        connect_kwargs: dict[str, Any] | None = None,
        on_connect: Hook | None = None,
        on_acquire: Hook | None = None,
        on_release: Hook | None = None,
        on_close: Hook | None = None,
        on_breaker_change: BreakerHook | None = None,
        **settings: Any,
    ) -> None:
        unknown = set(settings) - PoolConfig.setting_names()
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(
                bad, f"unknown setting; known: {', '.join(sorted(PoolConfig.setting_names()))}"
            )
        self.config = PoolConfig(**settings)
        self.name = name or "pool"
        if isinstance(driver, Driver):
            self.driver = driver
        else:
            self.driver = get_driver(driver, dsn, dict(connect_kwargs or {}))
        self._on_connect = on_connect
        self._on_acquire = on_acquire
        self._on_release = on_release
        self._on_close = on_close
        self._on_breaker_change = on_breaker_change
        self._core = PoolCore(
            self.config,
            name=self.name,
            is_alive=self.driver.is_alive,
            on_breaker_change=self._breaker_changed,
        )
        self._janitor = Janitor(self.name, self._housekeep, _janitor_interval(self.config))
        self._by_conn: dict[int, Slot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = False
        self._closing = False
        self._progress = asyncio.Event()
        self._deadlines: deque[tuple[float, asyncio.Future[Slot]]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._track_sites = self.config.leak_threshold is not None
        self._plain = on_acquire is None and on_release is None

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open" if self._opened else "new"
        return f"<millpond.Pool {self.name!r} {self.driver.name} {state} {self._core.describe()}>"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Start the pool; with ``wait``, return once ``min_size`` connections are up.

        A failed connection attempt during the wait raises DatabaseUnavailable (the
        driver's error chained) and closes the pool.
        """
        if self._closing:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if not self._opened:
            self._opened = True
            self._loop = asyncio.get_running_loop()
            self._janitor.start()
            self._housekeep()
        if wait:
            try:
                await asyncio.wait_for(self._wait_warm(), timeout or self.config.acquire_timeout)
            except BaseException:
                await self.close(timeout=0)
                raise

    async def _wait_warm(self) -> None:
        core = self._core
        errors_before = core.counters.connect_errors
        while core.ready_count < self.config.min_size:
            if core.counters.connect_errors > errors_before and core.last_connect_error:
                error = core.last_connect_error
                raise DatabaseUnavailable(
                    f"pool {self.name!r}: cannot open {self.config.min_size} connections: {error}"
                ) from (error.__cause__ or error)
            self._progress.clear()
            await self._progress.wait()

    def is_ready(self) -> bool:
        """True when the pool is open and holds at least ``min_size`` connections."""
        core = self._core
        return self._opened and not self._closing and core.ready_count >= self.config.min_size

    async def close(self, *, timeout: float | None = 10.0) -> None:
        """Stop lending, wait up to ``timeout`` for lent connections, then close all."""
        if self._closing and not self._core.slots:
            return
        self._closing = True
        self._core.close()
        self._flush()
        deadline = None if timeout is None else monotonic() + timeout
        while self._core.slots and (deadline is None or monotonic() < deadline):
            self._progress.clear()
            remaining = None if deadline is None else max(0.0, deadline - monotonic())
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                break
        self.terminate()
        await self._janitor.stop()

    def terminate(self) -> None:
        """Close every connection at once, lent or not, without waiting."""
        self._closing = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._core.close()
        self._core.todo.clear()
        for slot in list(self._core.slots.values()):
            if slot.conn is not None:
                self.driver.terminate(slot.conn)
            self._core.forget(slot)
        self._by_conn.clear()

    async def __aenter__(self) -> Pool:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __await__(self) -> Generator[Any, None, Pool]:
        return self._open_and_return().__await__()

    async def _open_and_return(self) -> Pool:
        await self.open()
        return self

    # -- leasing ---------------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None) -> AcquireContext:
        """Borrow a connection: ``async with pool.acquire() as conn`` (or ``await``)."""
        return AcquireContext(self, timeout)

    async def release(self, conn: Any) -> None:
        """Give back a connection obtained with ``conn = await pool.acquire()``."""
        slot = self._by_conn.get(id(conn))
        if slot is None or slot.conn is not conn:
            raise ValueError(f"{conn!r} was not lent by pool {self.name!r}")
        await self._return(slot)

    async def _acquire_detached(self, timeout: float | None) -> Any:
        return (await self._lease(timeout)).conn

    def _take_nowait(self, now: float = 0.0) -> Slot | None:
        """An idle connection now, or None; ``now`` if the caller just read the clock."""
        if self._closing or not self._opened:
            raise PoolClosed(f"pool {self.name!r} is {'closed' if self._closing else 'not open'}")
        core = self._core
        slot = core.acquire_nowait(now or monotonic())
        if core.todo:
            self._flush()
        if slot is not None and self._track_sites:
            slot.lease_site = capture_site()
        return slot

    async def _lease(self, timeout: float | None) -> Slot:
        slot = self._take_nowait()
        if slot is None:
            slot = await self._wait_for_slot(timeout)
        if self._on_acquire is not None:
            try:
                await self._on_acquire(slot.conn)
            except BaseException:
                self.driver.mark_dirty(slot.conn)
                self._give_back(slot)
                raise
        return slot

    async def _wait_for_slot(self, timeout: float | None) -> Slot:
        loop = self._loop or asyncio.get_running_loop()  # cached: 3.11 asks getpid() each time
        core = self._core
        future: asyncio.Future[Slot] = loop.create_future()
        waiter = core.wait(future, monotonic())
        if core.todo:
            self._flush()
        if future.done():  # refused at once: the circuit breaker is open
            return future.result()
        timer = None
        if timeout is None:
            self._watch_deadline(loop, future)  # one shared timer, not one per waiter
        else:
            timer = loop.call_later(timeout, self._expire_waiter, future, timeout)
        try:
            slot = await future
        except BaseException:
            core.forget_waiter(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                self._give_back(future.result())  # handed over just as we gave up
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if self._track_sites:
            slot.lease_site = capture_site()
        return slot

    def _watch_deadline(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Slot]
    ) -> None:
        """Waiters with the default acquire_timeout are served in order, so their
        deadlines come in order too: one timer, armed for the oldest, covers them all."""
        queue = self._deadlines
        while queue and queue[0][1].done():  # served from the front, first in first out
            queue.popleft()
        queue.append((loop.time() + self.config.acquire_timeout, future))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(queue[0][0], self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._deadline_timer = None
        loop, queue = self._loop, self._deadlines
        if loop is None:
            return
        now, limit = loop.time(), self.config.acquire_timeout
        while queue and (queue[0][1].done() or queue[0][0] <= now):
            _, future = queue.popleft()
            self._expire_waiter(future, limit)
        if queue:
            self._deadline_timer = loop.call_at(queue[0][0], self._check_deadlines)

    def _expire_waiter(self, future: asyncio.Future[Slot], limit: float) -> None:
        if future.done():
            return
        self._core.counters.timeouts += 1
        stats = self.stats()
        future.set_exception(
            PoolTimeout(
                f"pool {self.name!r}: no connection available within {limit:g}s "
                f"({stats.describe()})",
                stats,
            )
        )

    async def _return(self, slot: Slot, error: BaseException | None = None) -> None:
        if self._on_release is not None:
            try:
                await self._on_release(slot.conn)
            except Exception:
                log.exception("pool %r: on_release hook failed; resetting connection", self.name)
                self.driver.mark_dirty(slot.conn)
            finally:
                self._give_back(slot, error)
        else:
            self._give_back(slot, error)

    def _give_back(self, slot: Slot, error: BaseException | None = None, now: float = 0.0) -> None:
        """Return ``slot``; ``error`` is what the borrower's block raised, if anything;
        ``now`` if the caller just read the clock."""
        core = self._core
        verdict = self.driver.verdict(slot.conn)
        if error is not None:
            verdict = self._verdict_after(slot, error, verdict)
        core.release(slot, verdict, now or monotonic())
        if core.todo:
            self._flush()

    def _verdict_after(self, slot: Slot, error: BaseException, verdict: Release) -> Release:
        """Refine the driver's verdict with what the borrower's block raised."""
        if isinstance(error, TimeoutError | asyncio.CancelledError):
            # Closed by the client giving up (psycopg drops a connection whose query
            # would not cancel), not lost by the server: no reason to doubt the others.
            return Release.BROKEN if verdict is Release.LOST else verdict
        if verdict is Release.LOST or not self._lost(error):
            return verdict
        # A bare socket error may come from other code in the block: believe it only
        # if the connection agrees.
        if lost_connection(error) and self.driver.is_alive(slot.conn):
            return verdict
        return Release.LOST

    def _lost(self, error: BaseException) -> bool:
        """Does ``error`` say the server connection is gone (CommitUnknown: its cause)?"""
        if isinstance(error, CommitUnknown) and error.__cause__ is not None:
            error = error.__cause__
        return self.driver.is_disconnect(error)

    def _reclaim(self, slot: Slot) -> None:
        """A lease was garbage collected unreleased: take the connection back."""
        self._core.counters.leaks += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self.driver.mark_dirty(slot.conn)
        loop.call_soon(self._give_back, slot)

    # -- the everyday API --------------------------------------------------------------

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        if self._plain:  # no hooks: no extra coroutine, and one look at the idle stack
            slot = self._take_nowait() or await self._wait_for_slot(None)
        else:
            slot = await self._lease(None)
        try:
            rows: list[Any] = await self.driver.fetch(slot.conn, query, args, timeout)
        except BaseException as exc:
            await self._return(slot, exc)
            raise
        await self._return(slot) if not self._plain else self._give_back(slot)
        return rows

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        if self._plain:  # no hooks: no extra coroutine, and one look at the idle stack
            slot = self._take_nowait() or await self._wait_for_slot(None)
        else:
            slot = await self._lease(None)
        try:
            row = await self.driver.fetchrow(slot.conn, query, args, timeout)
        except BaseException as exc:
            await self._return(slot, exc)
            raise
        await self._return(slot) if not self._plain else self._give_back(slot)
        return row

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        if self._plain:  # no hooks: no extra coroutine, and one look at the idle stack
            slot = self._take_nowait() or await self._wait_for_slot(None)
        else:
            slot = await self._lease(None)
        try:
            value = await self.driver.fetchval(slot.conn, query, args, column, timeout)
        except BaseException as exc:
            await self._return(slot, exc)
            raise
        await self._return(slot) if not self._plain else self._give_back(slot)
        return value

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if self._plain:  # no hooks: no extra coroutine, and one look at the idle stack
            slot = self._take_nowait() or await self._wait_for_slot(None)
        else:
            slot = await self._lease(None)
        try:
            status: str = await self.driver.execute(slot.conn, query, args, timeout)
        except BaseException as exc:
            await self._return(slot, exc)
            raise
        await self._return(slot) if not self._plain else self._give_back(slot)
        return status

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        async with self.acquire() as conn:
            await self.driver.executemany(conn, query, args, timeout)

    @asynccontextmanager
    async def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> AsyncIterator[Any]:
        """``async with pool.transaction() as conn``: BEGIN, then COMMIT or ROLLBACK.

        Never retried. A connection lost during COMMIT raises CommitUnknown.
        """
        async with self.acquire() as conn:
            tx = transact.Transaction(self, conn, isolation, readonly, deferrable)
            await tx.begin()
            try:
                yield conn
            except BaseException as exc:
                if not await tx.rollback(exc):
                    raise
                return  # the driver swallowed it (psycopg.Rollback)
            await tx.commit()

    async def run_transaction(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        retry: RetryPolicy | None = None,
        isolation: str | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> T:
        """Run ``await fn(conn)`` in a transaction; re-run all of it on a retryable error.

        Retryable: connect failures, serialization failures (40001), deadlocks (40P01),
        and a connection lost before COMMIT was sent. Anything else, and a connection
        lost during COMMIT (CommitUnknown), is raised at once. ``fn`` may run several
        times, so it must not have effects outside the transaction that can't repeat.
        """
        return await transact.run_transaction(
            self, fn, retry or RetryPolicy(), isolation, readonly, deferrable
        )

    def mark_dirty(self, conn: Any) -> None:
        """Ask for a full reset when ``conn`` comes back (state the detector can't see)."""
        self.driver.mark_dirty(conn)

    def stats(self) -> PoolStats:
        """An immutable snapshot of sizes, counters and timings."""
        return self._core.stats(monotonic())

    # -- performing what the core decided -----------------------------------------------

    def _flush(self) -> None:
        todo = self._core.todo
        while todo:
            act, slot, reason = todo.pop(0)
            if act is Act.CONNECT:
                self._janitor.spawn(self._connect(slot), f"connect-{slot.id}")
            elif act is Act.RESET:
                self._janitor.spawn(self._reset(slot), f"reset-{slot.id}")
            elif act is Act.CHECK:
                self._janitor.spawn(self._check(slot), f"check-{slot.id}")
            elif reason in _ABRUPT or slot.conn is None:
                self._drop(slot)
            else:
                self._janitor.spawn(self._close(slot), f"close-{slot.id}")
        self._progress.set()

    async def _connect(self, slot: Slot) -> None:
        core = self._core
        conn = None
        try:
            conn = await self.driver.connect(self.config.connect_timeout)
            if self._on_connect is not None:
                await self._on_connect(conn)
                self.driver.mark_clean(conn)  # what on_connect set is the baseline
        except Exception as exc:
            if conn is not None:
                self.driver.terminate(conn)
            delay = core.connect_failed(slot, exc, monotonic())
            self._flush()
            log.warning("pool %r: connect failed (retry in %.2fs): %s", self.name, delay, exc)
            await self._retry_connects_after(delay)
            return
        except BaseException:
            if conn is not None:
                self.driver.terminate(conn)
            core.connect_cancelled(slot)
            raise
        if not core.connected(slot, conn, monotonic()):
            self.driver.terminate(conn)
            return
        self._by_conn[id(conn)] = slot
        self._flush()

    async def _retry_connects_after(self, delay: float) -> None:
        """Sleep out the backoff window (and an open breaker), then let connects start."""
        core = self._core
        while delay > 0:
            # The loop's timers may fire up to a clock tick early (uvloop: 1 ms, on a
            # cached clock), and later failures may move the window: check again.
            await asyncio.sleep(delay)
            delay = core.next_attempt_at() - monotonic()
        core.retry_connects(monotonic())
        self._flush()

    async def _reset(self, slot: Slot) -> None:
        ok = lost = False
        try:
            async with hard_timeout(self.config.reset_timeout):
                await self.driver.reset(slot.conn)
                if self._on_connect is not None:
                    await self._on_connect(slot.conn)  # DISCARD ALL undid its settings
                    self.driver.mark_clean(slot.conn)
            ok = True
        except Exception as exc:
            lost = self._lost(exc)
            log.warning("pool %r: reset failed, dropping connection: %r", self.name, exc)
        finally:
            self._core.reset_done(slot, ok, monotonic(), lost=lost)
            self._flush()

    async def _check(self, slot: Slot) -> None:
        ok = lost = False
        try:
            async with hard_timeout(self.config.reset_timeout):
                await self.driver.ping(slot.conn)
            ok = True
        except Exception as exc:
            lost = self._lost(exc)
            log.info("pool %r: health check failed, dropping connection: %r", self.name, exc)
        finally:
            self._core.check_done(slot, ok, monotonic(), lost=lost)
            self._flush()

    async def _close(self, slot: Slot) -> None:
        conn = slot.conn
        try:
            async with hard_timeout(self.config.reset_timeout):
                if self._on_close is not None:
                    await self._on_close(conn)
                await self.driver.close(conn)
        except BaseException:
            self.driver.terminate(conn)
            raise
        finally:
            self._forget(slot)

    def _drop(self, slot: Slot) -> None:
        if slot.conn is not None:
            self.driver.terminate(slot.conn)
        self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        if slot.conn is not None:
            self._by_conn.pop(id(slot.conn), None)
        self._core.close_done(slot)
        self._progress.set()

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        """Called by the core inside a decision: log now, run the user's hook soon after."""
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "pool %r: circuit breaker %s -> %s", self.name, old.value, new.value)
        if self._on_breaker_change is not None and self._loop is not None:
            self._loop.call_soon(self._run_breaker_hook, old, new)

    def _run_breaker_hook(self, old: BreakerState, new: BreakerState) -> None:
        hook = self._on_breaker_change
        if hook is None:
            return
        try:
            result = hook(old, new)
        except Exception:
            log.exception("pool %r: on_breaker_change hook failed", self.name)
            return
        if not inspect.isawaitable(result):
            return
        if self._closing:
            if inspect.iscoroutine(result):
                result.close()
            return
        self._janitor.spawn(_await_hook(result, self.name), "breaker-hook")

    def _housekeep(self) -> None:
        leaked = self._core.housekeep(monotonic())
        self._flush()
        for slot in leaked:
            log.warning(
                "pool %r: connection lent %.1fs ago (leak_threshold=%gs) not yet returned; "
                "acquired at:\n%s",
                self.name,
                monotonic() - slot.acquired_at,
                self.config.leak_threshold,
                format_site(slot.lease_site),
            )


async def _await_hook(result: Awaitable[Any], name: str) -> None:
    try:
        await result
    except Exception:
        log.exception("pool %r: on_breaker_change hook failed", name)


def create_pool(dsn: str | None = None, *, driver: str | Driver = "asyncpg", **kwargs: Any) -> Pool:
    """A new pool: ``async with create_pool(...) as pool`` or ``pool = await create_pool(...)``."""
    return Pool(dsn, driver=driver, **kwargs)
