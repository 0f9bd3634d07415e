"""Resilience inside the pool, driven through the in-memory driver (no network)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import pytest

import millpond
from millpond import CircuitOpen, CommitUnknown, DatabaseUnavailable, PoolOverloaded, PoolTimeout
from millpond.drivers.memory import MemoryConnection, MemoryDriver
from millpond.resilience import BreakerState, RetryPolicy
from tests.helpers import run


class CountingDriver(MemoryDriver):
    """A memory driver that records when each connection attempt started.

    With ``core`` set, it also counts attempts per backoff window: the window an
    attempt started after is the core's ``backoff_until`` at that moment.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(None, kwargs)
        self.attempt_times: list[float] = []
        self.core: Any = None
        self.per_window: Counter[float] = Counter()

    async def connect(self, timeout: float) -> MemoryConnection:
        self.attempt_times.append(time.monotonic())
        if self.core is not None:
            self.per_window[self.core.backoff_until] += 1
        return await super().connect(timeout)


def pool_on(driver: MemoryDriver, **settings: Any) -> millpond.Pool:
    settings.setdefault("reconnect_delay", 0.01)
    settings.setdefault("reconnect_delay_max", 0.05)
    return millpond.create_pool(driver=driver, **settings)


async def until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


# -- circuit breaker ------------------------------------------------------------------


def test_breaker_opens_after_threshold_rounds_then_fails_fast_and_recovers() -> None:
    async def main() -> None:
        drv = CountingDriver()
        changes: list[tuple[BreakerState, BreakerState]] = []
        pool = pool_on(
            drv,
            min_size=0,
            max_size=4,
            acquire_timeout=10,
            breaker_threshold=3,
            breaker_recovery=0.2,
            on_breaker_change=lambda old, new: changes.append((old, new)),
        )
        async with pool:
            drv.down = True
            waiter = asyncio.ensure_future(pool.fetchval("SELECT 1"))
            await until(lambda: pool.stats().connect_errors >= 1)
            assert not waiter.done()  # below the threshold, callers wait for the database
            with pytest.raises(CircuitOpen) as info:
                await waiter
            assert isinstance(info.value, DatabaseUnavailable)
            assert isinstance(info.value.__cause__, ConnectionRefusedError)
            assert "circuit breaker open" in str(info.value)
            s = pool.stats()
            assert (s.breaker_state, s.breaker_opened, s.waiting) == ("open", 1, 0)
            assert len(drv.attempt_times) == 3  # one per round with one caller
            assert "breaker=open" in s.describe()

            fail_times = []
            for _ in range(200):
                started = time.perf_counter()
                with pytest.raises(CircuitOpen):
                    await pool.fetchval("SELECT 1")
                fail_times.append(time.perf_counter() - started)
            assert statistics.median(fail_times) < 0.005
            assert len(drv.attempt_times) == 3  # failing fast costs the database nothing
            assert pool.stats().breaker_rejected == 201

            drv.down = False
            await asyncio.sleep(0.25)  # past breaker_recovery and the backoff
            assert await pool.fetchval("SELECT $1", 2) == 2
            assert pool.stats().breaker_state == "closed"
        await asyncio.sleep(0)  # the hook runs soon after each change
        assert changes == [
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        ]

    run(main())


def test_open_breaker_still_serves_from_connections_that_are_up() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=2, max_size=3, breaker_threshold=1) as pool:
            held = [await pool.acquire() for _ in range(2)]
            drv.down = True
            waiter = asyncio.ensure_future(pool.fetchval("SELECT $1", 3))
            await until(lambda: pool.stats().breaker_state == "open")
            await asyncio.sleep(0.01)
            assert not waiter.done()  # two connections are lent: one will come back
            await pool.release(held.pop())
            assert await waiter == 3
            async with pool.acquire() as conn:  # an idle connection is lent while open
                assert conn.alive
            await pool.release(held.pop())

    run(main())


def test_async_breaker_hook_runs_in_the_background() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def hook(old: BreakerState, new: BreakerState) -> None:
            await asyncio.sleep(0)
            seen.append(new.value)

        drv = CountingDriver()
        async with pool_on(drv, min_size=1, breaker_threshold=1, on_breaker_change=hook) as pool:
            drv.down = True
            for conn in drv.opened:
                conn.alive = False
            with pytest.raises(CircuitOpen):
                await pool.fetchval("SELECT 1")
            await until(lambda: seen == ["open"])

    run(main())


def test_without_breaker_callers_wait_and_the_pool_never_gives_up() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(
            drv, min_size=2, max_size=2, breaker_threshold=0, acquire_timeout=0.2
        ) as pool:
            drv.down = True
            for conn in drv.opened:
                conn.alive = False
            with pytest.raises(PoolTimeout):
                await pool.fetchval("SELECT 1")
            assert pool.stats().breaker_state == "disabled"
            await asyncio.sleep(0.3)
            before = len(drv.attempt_times)
            await asyncio.sleep(0.2)
            assert len(drv.attempt_times) > before  # still trying, at the capped backoff
            drv.down = False
            up = time.monotonic()
            await until(pool.is_ready)
            assert time.monotonic() - up <= 0.05 + 0.25  # one (capped) backoff step, + slack
            assert pool.stats().size == 2

    run(main())


def test_connect_attempts_per_backoff_window_with_1000_waiters() -> None:
    async def main() -> None:
        drv = CountingDriver(connect_delay=0.001)  # all of a round start before one fails
        async with pool_on(
            drv,
            min_size=0,
            max_size=8,
            max_concurrent_connects=3,
            breaker_threshold=0,
            reconnect_delay=0.02,
            reconnect_delay_max=0.08,
            acquire_timeout=5,
        ) as pool:
            drv.down = True
            drv.core = pool._core
            order: list[int] = []
            peak = 0

            async def caller(i: int) -> None:
                nonlocal peak
                async with pool.acquire():
                    order.append(i)
                    peak = max(peak, pool.stats().connecting)
                    await asyncio.sleep(0.001)

            tasks = [asyncio.ensure_future(caller(i)) for i in range(1000)]
            await asyncio.sleep(0.6)
            per_window = dict(drv.per_window)
            assert len(per_window) >= 5  # several failed rounds while down...
            assert max(per_window.values()) <= 3, per_window  # ...each of at most 3 attempts
            drv.down = False
            await asyncio.gather(*tasks)
            assert order == list(range(1000))  # first come, first served, through it all
            assert peak <= 3
            s = pool.stats()
            assert s.size <= 8
            assert s.connections_opened <= 8

    run(main())


# -- stale connections ------------------------------------------------------------------


def test_disconnect_retires_older_idle_connections_at_once() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=4, max_size=4, validate_idle_after=None) as pool:
            c4 = await pool.acquire()  # LIFO: the newest idle connections come out first
            c3 = await pool.acquire()
            older = [c for c in drv.opened if c not in (c3, c4)]
            assert len(older) == 2
            c3.alive = False
            with pytest.raises(ConnectionError):
                await c3.fetchval("SELECT 1")  # the borrower learns the hard way
            await pool.release(c3)
            s = pool.stats()
            assert s.connections_closed["broken"] == 1
            assert s.connections_closed["stale"] == 2
            assert all(c.closed for c in older)
            await until(pool.is_ready)
            assert await pool.fetchval("SELECT 1") == 1
            assert c4.alive  # newer than the lost one: kept
            await pool.release(c4)

    run(main())


class Gone(Exception):
    """A driver's own "the server hung up" error."""


class GoneDriver(CountingDriver):
    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, Gone) or super().is_disconnect(exc)


def test_disconnect_error_in_block_overrides_a_clean_verdict() -> None:
    async def main() -> None:
        async with pool_on(GoneDriver(), min_size=3, max_size=3, validate_idle_after=None) as pool:

            async def server_hangs_up() -> None:
                async with pool.acquire():
                    raise Gone  # the connection still looks fine: the error knows better

            with pytest.raises(Gone):
                await server_hangs_up()
            s = pool.stats()
            assert (s.connections_closed["broken"], s.connections_closed["stale"]) == (1, 2)

    run(main())


def test_socket_error_from_other_code_is_not_a_disconnect() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=3, max_size=3, validate_idle_after=None) as pool:

            async def http_call_fails() -> None:
                async with pool.acquire():
                    raise ConnectionRefusedError("some web service is down")

            with pytest.raises(ConnectionRefusedError):
                await http_call_fails()
            assert pool.stats().connections_closed_total == 0
            assert all(not c.closed for c in drv.opened)

    run(main())


def test_client_side_timeout_does_not_sweep() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=3, max_size=3, validate_idle_after=None) as pool:

            async def gives_up() -> None:
                async with pool.acquire() as conn:
                    conn.alive = False  # as psycopg drops a query that would not cancel
                    raise TimeoutError

            with pytest.raises(TimeoutError):
                await gives_up()
            s = pool.stats()
            assert (s.connections_closed["broken"], s.connections_closed["stale"]) == (1, 0)

    run(main())


def test_one_shot_query_on_a_dying_connection_sweeps() -> None:
    async def main() -> None:
        async def dies(conn: MemoryConnection) -> None:
            conn.alive = False

        drv = CountingDriver()
        async with pool_on(drv, min_size=3, max_size=3, on_acquire=dies) as pool:
            with pytest.raises(ConnectionError):
                await pool.fetchval("SELECT 1")
            assert pool.stats().connections_closed["stale"] == 2

    run(main())


# -- run_transaction ---------------------------------------------------------------------


class SqlError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


FAST = RetryPolicy(attempts=4, base=0.001, cap=0.002)


def test_run_transaction_reruns_the_whole_function_on_serialization_failure() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1, max_size=2) as pool:
            seen: list[tuple[int, bool]] = []

            async def fn(conn: MemoryConnection) -> str:
                seen.append((conn.ident, conn.in_transaction))
                if len(seen) < 3:
                    raise SqlError("40001" if len(seen) == 1 else "40P01")
                return "ok"

            assert await pool.run_transaction(fn, retry=FAST) == "ok"
            assert len(seen) == 3
            assert all(in_tx for _, in_tx in seen)  # each try in a fresh transaction
            s = pool.stats()
            assert (s.retries, s.retry_giveups, s.in_use) == (2, 0, 0)
            assert not any(c.in_transaction for c in pool.driver.opened)  # type: ignore[attr-defined]

    run(main())


def test_run_transaction_gives_up_and_counts_it() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1) as pool:
            calls = 0

            async def fn(conn: MemoryConnection) -> None:
                nonlocal calls
                calls += 1
                raise SqlError("40001")

            with pytest.raises(SqlError) as info:
                await pool.run_transaction(fn, retry=FAST)
            assert calls == 4
            assert "4 of 4 attempts failed" in " ".join(info.value.__notes__)
            s = pool.stats()
            assert (s.retries, s.retry_giveups) == (3, 1)

    run(main())


def test_run_transaction_does_not_retry_application_errors() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1) as pool:
            calls = 0

            async def fn(conn: MemoryConnection) -> None:
                nonlocal calls
                calls += 1
                raise SqlError("23505")  # unique violation: retrying cannot help

            with pytest.raises(SqlError):
                await pool.run_transaction(fn, retry=FAST)
            assert calls == 1
            assert pool.stats().retries == 0

    run(main())


def test_run_transaction_retries_a_connection_lost_before_commit() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=1, max_size=1) as pool:
            idents: list[int] = []

            async def fn(conn: MemoryConnection) -> int:
                idents.append(conn.ident)
                if len(idents) == 1:
                    conn.alive = False
                return await conn.fetchval("SELECT $1", len(idents))  # type: ignore[no-any-return]

            assert await pool.run_transaction(fn, retry=FAST) == 2
            assert idents[0] != idents[1]  # the retry ran on a new connection
            assert pool.stats().connections_closed["broken"] == 1

    run(main())


def test_connection_lost_during_commit_is_commit_unknown_and_not_retried() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1, max_size=1) as pool:
            calls = 0

            async def fn(conn: MemoryConnection) -> None:
                nonlocal calls
                calls += 1
                conn.alive = False  # the body ran; the link dies before COMMIT's answer

            with pytest.raises(CommitUnknown) as info:
                await pool.run_transaction(fn, retry=FAST)
            assert calls == 1
            assert isinstance(info.value.__cause__, ConnectionError)
            with pytest.raises(CommitUnknown):
                async with pool.transaction() as conn:
                    conn.alive = False
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


def test_run_transaction_retries_connect_failures() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=0, max_size=1, breaker_threshold=1) as pool:
            drv.down = True

            async def fn(conn: MemoryConnection) -> int:
                return 5

            policy = RetryPolicy(attempts=50, base=0.01, cap=0.05, deadline=5)
            task = asyncio.ensure_future(pool.run_transaction(fn, retry=policy))
            await until(lambda: pool.stats().retries >= 2)
            drv.down = False
            assert await task == 5

    run(main())


def test_run_transaction_cancellation_is_never_retried() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1, max_size=1) as pool:
            started = asyncio.Event()

            async def fn(conn: MemoryConnection) -> None:
                started.set()
                await asyncio.sleep(10)

            task = asyncio.ensure_future(pool.run_transaction(fn, retry=FAST))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            s = pool.stats()
            assert (s.retries, s.in_use) == (0, 0)
            (conn,) = pool.driver.opened  # type: ignore[attr-defined]
            assert not conn.in_transaction  # rolled back

    run(main())


def test_failed_rollback_does_not_hide_the_error() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1, max_size=1) as pool:

            async def fn(conn: MemoryConnection) -> None:
                conn.alive = False  # ROLLBACK will fail too
                raise SqlError("23505")

            with pytest.raises(SqlError):
                await pool.run_transaction(fn, retry=FAST)
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


# -- overload ---------------------------------------------------------------------------


def test_overload_serves_in_order_and_rejects_the_excess_at_once() -> None:
    async def main() -> None:
        drv = CountingDriver()
        async with pool_on(drv, min_size=4, max_size=4, max_waiting=300) as pool:
            served: list[int] = []
            rejected: list[int] = []

            async def caller(i: int) -> None:
                try:
                    async with pool.acquire():
                        served.append(i)
                        await asyncio.sleep(0)
                except PoolOverloaded:
                    rejected.append(i)

            await asyncio.gather(*(caller(i) for i in range(1000)))
            assert served == list(range(304))
            assert rejected == list(range(304, 1000))
            s = pool.stats()
            assert (s.rejected, s.waits, s.size, s.connections_opened) == (696, 300, 4, 4)

    run(main())


def test_a_release_wakes_exactly_one_waiter() -> None:
    async def main() -> None:
        async with pool_on(CountingDriver(), min_size=1, max_size=1) as pool:
            held = await pool.acquire()
            tasks = [asyncio.ensure_future(pool.fetchval("SELECT 1")) for _ in range(100)]
            await asyncio.sleep(0)
            waiters = pool._core.waiters
            assert len(waiters) == 100
            await pool.release(held)
            # Direct hand-off: one waiter got the connection, nobody else was woken.
            assert len(waiters) == 99
            assert sum(w.future.done() for w in waiters) == 0
            await asyncio.gather(*tasks)

    run(main())


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"breaker_threshold": -1}, "breaker_threshold"),
        ({"breaker_threshold": 1.5}, "breaker_threshold"),
        ({"breaker_recovery": -1}, "breaker_recovery"),
        ({"breaker_recovery": None}, "breaker_recovery"),
        ({"breaker_probes": 0}, "breaker_probes"),
    ],
)
def test_breaker_settings_are_validated(settings: dict[str, Any], setting: str) -> None:
    with pytest.raises(millpond.ConfigError) as info:
        millpond.PoolConfig(**settings)
    assert info.value.setting == setting


def test_breaker_defaults() -> None:
    cfg = millpond.PoolConfig()
    assert (cfg.breaker_threshold, cfg.breaker_recovery, cfg.breaker_probes) == (5, 1.0, 1)
    assert millpond.PoolConfig(breaker_threshold=0).breaker_threshold == 0  # disabled
