"""Server restarts and outages, each on its own throwaway cluster, on both drivers.

Measured numbers (recovery after the server is up, breaker fail-fast latency) are
printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from typing import Any

import pytest

import millpond
from millpond import CircuitOpen, CommitUnknown, DatabaseUnavailable, RetryPolicy
from millpond.drivers import get_driver
from tests.helpers import ClusterFactory, run

DRIVERS = ["asyncpg", "psycopg"]


def sync_commit(driver: str) -> dict[str, Any]:
    """Connect arguments that make COMMIT wait for the WAL flush.

    The test clusters run with synchronous_commit=off, where a crash may lose commits
    that were already acknowledged; these tests count acknowledged commits.
    """
    if driver == "asyncpg":
        return {"server_settings": {"synchronous_commit": "on"}}
    return {"options": "-c synchronous_commit=on"}


async def insert(driver: str, conn: Any, i: int) -> None:
    if driver == "asyncpg":
        await conn.execute("INSERT INTO t VALUES ($1)", i)
    else:
        await conn.execute("INSERT INTO t VALUES (%s)", (i,))


def counting(driver: str, dsn: str) -> Any:
    """The named driver adapter, counting connection attempts per backoff window.

    Set ``.core`` to the pool's core: the window an attempt started after is the
    core's ``backoff_until`` at that moment (exact, whatever the scheduling delays).
    """
    base = type(get_driver(driver, dsn, {}))

    class Counting(base):  # type: ignore[valid-type, misc]
        core: Any = None

        async def connect(self, timeout: float) -> Any:
            if self.core is not None:
                self.per_window[self.core.backoff_until] += 1
            return await super().connect(timeout)

    drv = Counting(dsn, {})
    drv.per_window = Counter()
    return drv


async def until(predicate: Any, timeout: float) -> float:
    """Wait until ``predicate()``; return how long it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.002)
    return time.monotonic() - start


@pytest.mark.parametrize("driver", DRIVERS)
def test_immediate_restart_while_idle_costs_no_error(
    own_cluster: ClusterFactory, driver: str
) -> None:
    cluster = own_cluster()

    async def main() -> None:
        async with millpond.create_pool(
            cluster.dsn(), driver=driver, min_size=3, max_size=3
        ) as pool:
            pids = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(3)}
            await asyncio.to_thread(cluster.restart, "immediate")
            await asyncio.sleep(0.1)
            # Every caller is served by a fresh connection: no error reaches anyone.
            got = await asyncio.gather(
                *(pool.fetchval("SELECT pg_backend_pid()") for _ in range(6))
            )
            assert not pids & set(got)
            await until(pool.is_ready, 5)
            s = pool.stats()
            assert s.size == 3
            assert s.connections_closed["broken"] + s.connections_closed["stale"] == 3

    run(main(), timeout=30)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_restart_under_load_loses_no_commit(
    own_cluster: ClusterFactory, driver: str, mode: str
) -> None:
    """100 tasks insert rows while the server restarts.

    80 use run_transaction (retrying), 20 use plain pool.transaction(). Afterwards:
    every acknowledged COMMIT is in the table; a retried operation failed at most once
    (one error per in-flight operation); nothing started after the server was back
    failed; the first commit came within one backoff step of the server being up.
    """
    cluster = own_cluster()
    step = 0.5  # reconnect_delay_max: one backoff step at most

    async def main() -> None:
        async with millpond.create_pool(
            cluster.dsn(),
            driver=driver,
            min_size=10,
            max_size=20,
            reconnect_delay=0.05,
            reconnect_delay_max=step,
            # A restart is ridden out by waiting, not failed fast: keep the breaker's
            # trip time (>= 1.6 s here) above a restart on a busy machine. The breaker
            # has its own test below.
            breaker_threshold=10,
            connect_kwargs=sync_commit(driver),
        ) as pool:
            await pool.execute("CREATE TABLE t (id int PRIMARY KEY)")
            committed: set[int] = set()
            unknown: set[int] = set()
            tries: Counter[int] = Counter()
            plain_errors: list[tuple[float, BaseException]] = []
            ids = itertools.count()
            stop = asyncio.Event()
            policy = RetryPolicy(attempts=100, base=0.01, cap=step, deadline=30)

            async def retrying() -> None:
                while not stop.is_set():
                    i = next(ids)

                    async def fn(conn: Any, i: int = i) -> None:
                        tries[i] += 1
                        await insert(driver, conn, i)

                    try:
                        await pool.run_transaction(fn, retry=policy)
                        committed.add(i)
                    except CommitUnknown:
                        unknown.add(i)

            async def plain() -> None:
                while not stop.is_set():
                    i, started = next(ids), time.monotonic()
                    try:
                        async with pool.transaction() as conn:
                            await insert(driver, conn, i)
                        committed.add(i)
                    except CommitUnknown:
                        unknown.add(i)
                    except Exception as exc:
                        plain_errors.append((started, exc))
                        await asyncio.sleep(0.01)

            tasks = [asyncio.ensure_future(retrying()) for _ in range(80)]
            tasks += [asyncio.ensure_future(plain()) for _ in range(20)]
            await asyncio.sleep(0.5)
            before = len(committed)
            down_at = time.monotonic()
            await asyncio.to_thread(cluster.restart, mode)
            up_at = time.monotonic()
            n = len(committed)
            recovery = await until(lambda: len(committed) > n, timeout=10)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)

            rows = {r[0] for r in await pool.fetch("SELECT id FROM t")}
            assert before > 100  # it was under load
            assert committed <= rows, f"{len(committed - rows)} acknowledged commits lost"
            assert rows <= committed | unknown
            assert len(unknown) <= 100  # only commits in flight at the restart are unsure
            assert max(tries.values()) <= 2  # at most one error per in-flight operation
            late = [exc for started, exc in plain_errors if started > up_at]
            assert late == []
            for _, exc in plain_errors:
                assert isinstance(exc, DatabaseUnavailable) or pool.driver.is_disconnect(exc), exc
            assert recovery < step + 0.5  # one backoff step, plus connect time on a busy box
            s = pool.stats()
            print(
                f"\n[{driver} {mode} restart] server down+up {up_at - down_at:.3f}s, "
                f"first commit {recovery * 1000:.1f} ms after up; committed {len(committed)}, "
                f"unknown {len(unknown)} ({len(unknown & rows)} of them committed), "
                f"plain errors {len(plain_errors)}, retries {s.retries}, "
                f"breaker opened {s.breaker_opened}"
            )

    run(main(), timeout=60)


@pytest.mark.parametrize("driver", DRIVERS)
def test_database_down_for_a_while(own_cluster: ClusterFactory, driver: str) -> None:
    """1,000 callers against a stopped server, then the server returns.

    Connection attempts come in bursts of at most max_concurrent_connects per backoff
    window; once the breaker is open every caller fails fast (measured); the pool is
    back to min_size soon after the server is.
    """
    cluster = own_cluster()
    drv = counting(driver, cluster.dsn())

    async def main() -> None:
        async with millpond.create_pool(
            driver=drv,
            min_size=4,
            max_size=10,
            max_concurrent_connects=2,
            reconnect_delay=0.1,
            reconnect_delay_max=0.4,
            breaker_threshold=4,
            breaker_recovery=0.4,
            acquire_timeout=20,
        ) as pool:
            await asyncio.to_thread(cluster.stop)
            drv.core = pool._core  # count from here on

            async def caller() -> BaseException | None:
                try:
                    async with pool.acquire():
                        return None
                except DatabaseUnavailable as exc:
                    return exc

            results = await asyncio.gather(*(caller() for _ in range(1000)))
            assert all(isinstance(r, CircuitOpen) for r in results), Counter(map(type, results))
            assert all(r is not None and r.__cause__ is not None for r in results)
            assert pool.stats().breaker_state == "open"

            latencies = []
            for _ in range(1000):
                started = time.perf_counter()
                try:
                    async with pool.acquire():
                        pass
                except CircuitOpen:
                    latencies.append(time.perf_counter() - started)
            assert len(latencies) > 900
            median = statistics.median(latencies)
            p99 = sorted(latencies)[int(len(latencies) * 0.99)]
            assert median < 0.005

            async def hammer() -> None:  # callers keep coming while the server is down
                while True:
                    try:
                        async with pool.acquire():
                            return
                    except DatabaseUnavailable:
                        await asyncio.sleep(0.01)

            hammering = [asyncio.ensure_future(hammer()) for _ in range(100)]
            await asyncio.sleep(1.5)
            per_window = dict(drv.per_window)
            assert len(per_window) >= 3  # it kept trying...
            assert max(per_window.values()) <= 2, per_window  # ...2 at most per window
            down_attempts = sum(per_window.values())

            await asyncio.to_thread(cluster.start)
            recovery = await until(pool.is_ready, timeout=10)
            await asyncio.wait_for(asyncio.gather(*hammering), 10)
            s = pool.stats()
            assert s.breaker_state == "closed"
            assert s.size >= 4
            assert recovery < 0.4 + 1.0  # one (capped) backoff step, plus connect time
            print(
                f"\n[{driver} down] breaker fail-fast: median {median * 1e6:.1f} us, "
                f"p99 {p99 * 1e6:.1f} us; {down_attempts} connect attempts in "
                f"{len(per_window)} windows while down (max {max(per_window.values())} per "
                f"window); "
                f"back to min_size {recovery * 1000:.0f} ms after the server was up; "
                f"breaker opened {s.breaker_opened}x, rejected {s.breaker_rejected}"
            )

    run(main(), timeout=60)
