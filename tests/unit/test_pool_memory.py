"""The pool's behaviour, driven through the in-memory driver (no network)."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from typing import Any

import pytest

import millpond
from millpond import DatabaseUnavailable, PoolClosed, PoolOverloaded, PoolTimeout
from millpond.drivers.memory import MemoryConnection, MemoryDriver
from millpond.pool.state import SlotState
from tests.helpers import run


def mem_pool(**settings: Any) -> millpond.Pool:
    settings.setdefault("min_size", 1)
    settings.setdefault("max_size", 2)
    return millpond.create_pool(driver="memory", **settings)


def driver_of(pool: millpond.Pool) -> MemoryDriver:
    assert isinstance(pool.driver, MemoryDriver)
    return pool.driver


async def settle(pool: millpond.Pool, rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)
        if not pool._janitor.busy:
            return


def test_open_prewarms_min_size() -> None:
    async def main() -> None:
        async with mem_pool(min_size=3, max_size=5) as pool:
            s = pool.stats()
            assert (s.size, s.idle, s.in_use) == (3, 3, 0)
            assert pool.is_ready()
            assert driver_of(pool).open_connections == 3

    run(main())


def test_fast_path_never_suspends() -> None:
    """Acquiring an idle connection and releasing a clean one completes synchronously."""

    async def main() -> None:
        async with mem_pool() as pool:
            ctx = pool.acquire()
            enter = ctx.__aenter__()
            with pytest.raises(StopIteration) as got:
                enter.send(None)  # would yield a future if it had to wait
            assert isinstance(got.value.value, MemoryConnection)
            leave = ctx.__aexit__(None, None, None)
            with pytest.raises(StopIteration):
                leave.send(None)
            assert pool.stats().idle == 1

    run(main())


def test_waiters_served_fifo_by_direct_handoff() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            order: list[int] = []
            first = await pool.acquire()

            async def waiter(i: int) -> None:
                async with pool.acquire():
                    order.append(i)
                    await asyncio.sleep(0)

            tasks = [asyncio.create_task(waiter(i)) for i in range(10)]
            await asyncio.sleep(0.01)
            assert pool.stats().waiting == 10
            await pool.release(first)
            await asyncio.gather(*tasks)
            assert order == list(range(10))
            s = pool.stats()
            assert s.waits == 10
            assert s.waiting == 0
            assert s.wait_time.count == 11  # the first acquire waited 0 s: counted too
            assert sum(s.wait_time.buckets) == 11
            assert s.wait_time.buckets[0] >= 1

    run(main())


def test_acquire_timeout_carries_snapshot() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1, acquire_timeout=0.05) as pool:
            held = await pool.acquire()
            await asyncio.sleep(0.02)
            with pytest.raises(PoolTimeout) as info:
                await pool.fetchval("SELECT 1")
            assert info.value.stats is not None
            assert info.value.stats.in_use == 1
            assert info.value.stats.oldest_lease_age >= 0.02
            assert "in_use=1" in str(info.value)
            assert pool.stats().timeouts == 1
            await pool.release(held)
            assert await pool.fetchval("SELECT 1") == 1  # the pool still works

    run(main())


def test_max_waiting_rejects_excess() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1, max_waiting=2) as pool:
            held = await pool.acquire()
            waiting = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(PoolOverloaded, match="max_waiting=2"):
                await pool.fetchval("SELECT 1")
            await pool.release(held)
            assert await asyncio.gather(*waiting) == [1, 1]
            assert pool.stats().rejected == 1

    run(main())


def test_closed_pool_refuses_and_fails_waiters() -> None:
    async def main() -> None:
        pool = await mem_pool(min_size=1, max_size=1)
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
        await asyncio.sleep(0)
        closing = asyncio.create_task(pool.close())
        await asyncio.sleep(0)
        with pytest.raises(PoolClosed):
            await waiter
        with pytest.raises(PoolClosed):
            await pool.fetchval("SELECT 1")
        await pool.release(held)  # lent connections come back during close
        await closing
        assert driver_of(pool).open_connections == 0
        assert pool.stats().size == 0

    run(main())


def test_connect_failure_at_open_is_clear() -> None:
    async def main() -> None:
        pool = mem_pool(min_size=2)
        driver_of(pool).down = True
        with pytest.raises(DatabaseUnavailable) as info:
            await pool.open()
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        with pytest.raises(PoolClosed):
            await pool.fetchval("SELECT 1")

    run(main())


def test_waiters_fail_fast_when_database_is_down() -> None:
    # Waiters are failed by the circuit breaker (test_resilience_pool.py covers its
    # defaults); with a threshold of one round it opens on the first failed connect.
    async def main() -> None:
        async with mem_pool(
            min_size=0, max_size=2, acquire_timeout=5, breaker_threshold=1, breaker_recovery=0.1
        ) as pool:
            driver_of(pool).down = True
            started = asyncio.get_running_loop().time()
            with pytest.raises(DatabaseUnavailable) as info:
                await pool.fetchval("SELECT 1")
            assert asyncio.get_running_loop().time() - started < 1
            assert isinstance(info.value.__cause__, ConnectionRefusedError)
            driver_of(pool).down = False
            await asyncio.sleep(0.3)  # past the backoff
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


def test_max_concurrent_connects_bounds_storm() -> None:
    async def main() -> None:
        pool = mem_pool(
            min_size=0,
            max_size=50,
            max_concurrent_connects=3,
            connect_kwargs={"connect_delay": 0.01},
        )
        async with pool:
            drv = driver_of(pool)
            peak = 0

            async def one() -> None:
                nonlocal peak
                peak = max(peak, pool.stats().connecting)
                async with pool.acquire():
                    peak = max(peak, pool.stats().connecting)
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(one() for _ in range(1000)))
            assert peak <= 3
            assert drv.connect_attempts <= 50
            assert pool.stats().size <= 50

    run(main())


def test_max_uses_recycles() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1, max_uses=3) as pool:
            seen = set()
            for _ in range(7):
                async with pool.acquire() as conn:
                    seen.add(conn.ident)
                await settle(pool)
            assert len(seen) == 3
            assert pool.stats().connections_closed["uses"] == 2

    run(main())


def test_max_idle_shrinks_to_min_size() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=4, max_idle=0.05) as pool:
            held = [await pool.acquire() for _ in range(4)]
            for conn in held:
                await pool.release(conn)
            assert pool.stats().size == 4
            await asyncio.sleep(0.3)
            s = pool.stats()
            assert s.size == 1
            assert s.connections_closed["idle"] == 3

    run(main())


def test_max_lifetime_replaces_before_closing() -> None:
    async def main() -> None:
        async with mem_pool(min_size=2, max_size=2, max_lifetime=0.1, lifetime_jitter=0) as pool:
            first = {c.ident for c in driver_of(pool).opened}
            await asyncio.sleep(0.4)
            s = pool.stats()
            assert s.connections_closed["lifetime"] >= 2
            assert s.size == 2
            assert s.idle == 2
            now_open = {c.ident for c in driver_of(pool).opened if not c.closed}
            assert not (first & now_open)
            # Never below min_size during the recycle: the pool could lend all along.
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


def test_lifetime_jitter_spreads_expiry() -> None:
    async def main() -> None:
        async with mem_pool(
            min_size=10, max_size=10, max_lifetime=100, lifetime_jitter=0.2
        ) as pool:
            expiries = {slot.expires_at - slot.created_at for slot in pool._core.slots.values()}
            assert len(expiries) == 10
            assert all(80 <= e <= 100 for e in expiries)

    run(main())


def test_dead_idle_connection_is_never_lent() -> None:
    async def main() -> None:
        async with mem_pool(min_size=2, max_size=2) as pool:
            for conn in driver_of(pool).opened:
                conn.alive = False
            assert await pool.fetchval("SELECT 1") == 1
            assert pool.stats().connections_closed["broken"] == 2

    run(main())


def test_validation_after_idle_pings_first() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1, validate_idle_after=0.02) as pool:
            conn0 = driver_of(pool).opened[0]
            assert await pool.fetchval("SELECT 1") == 1
            assert conn0.pings == 0
            await asyncio.sleep(0.05)
            assert await pool.fetchval("SELECT 1") == 1
            assert conn0.pings == 1

    run(main())


def test_health_check_drops_dead_idle_connections() -> None:
    async def main() -> None:
        async with mem_pool(min_size=2, max_size=2, health_check_interval=0.05) as pool:
            victim = driver_of(pool).opened[0]
            victim.alive = False
            victim_is_alive = pool.driver.is_alive
            pool._core._is_alive = lambda c: True  # hide the cheap signal: only pings find it
            await asyncio.sleep(0.3)
            pool._core._is_alive = victim_is_alive
            s = pool.stats()
            assert s.connections_closed["health_check"] == 1
            assert s.size == 2  # refilled to min_size

    run(main())


def test_dirty_release_is_reset_clean_release_is_not() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            await pool.fetchval("SELECT 1")
            assert pool.stats().resets == 0
            await pool.execute("SET search_path = evil")
            async with pool.acquire() as conn:  # waits for the reset, then gets it
                assert not conn.dirty
                assert conn.resets == 1
            assert pool.stats().resets == 1

    run(main())


def test_reset_always_policy() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1, reset="always") as pool:
            for _ in range(3):
                await pool.fetchval("SELECT 1")
            await settle(pool)
            assert pool.stats().resets == 3

    run(main())


def test_failed_reset_discards_connection() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                await conn.fetchval("BEGIN")
                conn.alive = False  # reset will fail
            await settle(pool)
            assert await pool.fetchval("SELECT 1") == 1
            closed = pool.stats().connections_closed
            assert closed["broken"] + closed["reset_failed"] == 1

    run(main())


def test_transaction_commits_and_rolls_back() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            async with pool.transaction() as conn:
                assert conn.in_transaction
            assert not conn.in_transaction
            with pytest.raises(ZeroDivisionError):
                async with pool.transaction() as conn:
                    1 / 0  # noqa: B018
            assert not conn.in_transaction
            assert pool.stats().in_use == 0

    run(main())


def test_hooks_run_in_order() -> None:
    async def main() -> None:
        calls: list[str] = []

        async def hook(name: str, conn: Any) -> None:
            calls.append(name)

        pool = mem_pool(
            min_size=1,
            max_size=1,
            max_uses=1,
            on_connect=lambda c: hook("connect", c),
            on_acquire=lambda c: hook("acquire", c),
            on_release=lambda c: hook("release", c),
            on_close=lambda c: hook("close", c),
        )
        async with pool:
            assert await pool.fetchval("SELECT 1") == 1
            await settle(pool)
        assert calls[:4] == ["connect", "acquire", "release", "close"]

    run(main())


def test_leak_reported_once_with_site(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=2, leak_threshold=0.05) as pool:
            conn = await pool.acquire()  # the leaky line
            await asyncio.sleep(0.3)
            assert pool.stats().leaks == 1
            await pool.release(conn)

    with caplog.at_level(logging.WARNING, logger="millpond.pool"):
        run(main())
    leaks = [r for r in caplog.records if "not yet returned" in r.getMessage()]
    assert len(leaks) == 1
    assert "the leaky line" in leaks[0].getMessage()


def test_garbage_collected_lease_is_reclaimed() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            ctx = pool.acquire()
            await ctx.__aenter__()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del ctx
                gc.collect()
            assert any(issubclass(w.category, ResourceWarning) for w in caught)
            assert await pool.fetchval("SELECT 1") == 1
            assert pool.stats().leaks == 1

    run(main())


def test_release_of_foreign_connection_is_refused() -> None:
    async def main() -> None:
        async with mem_pool() as pool:
            with pytest.raises(ValueError, match="not lent"):
                await pool.release(MemoryConnection(99))

    run(main())


def test_slot_states_are_explicit() -> None:
    async def main() -> None:
        async with mem_pool(min_size=1, max_size=1) as pool:
            async with pool.acquire():
                (slot,) = pool._core.slots.values()
                assert slot.state is SlotState.IN_USE
                assert "in_use" in repr(slot)
            assert slot.state is SlotState.IDLE
            with pytest.raises(RuntimeError, match="not legal"):
                slot.move(SlotState.CONNECTING)

    run(main())
