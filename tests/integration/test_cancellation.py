"""Random cancellations never lose a slot or leave a half-used connection behind.

Many tasks acquire, query, open transactions, leave session state, and get cancelled
or time out at random moments. Afterwards the pool must add up (size == idle + in use,
nobody waiting or connecting), the server must hold exactly the pool's connections,
and every answer that did come back must be right.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import millpond
from millpond import PoolTimeout
from tests.helpers import run

KINDS = ("query", "hold", "transaction", "dirty", "short_timeout", "sleep_query")

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.one_of(st.none(), st.floats(min_value=0, max_value=0.03)),  # cancel after
        st.integers(min_value=0, max_value=10_000),
    ),
    min_size=1,
    max_size=60,
)


async def one_op(pool: millpond.Pool, driver: str, kind: str, value: int) -> None:
    p = "$1" if driver in ("asyncpg", "memory") else "%s"
    if kind == "query":
        got = await pool.fetchval(f"SELECT {p}::int", value)
        assert got == value, (got, value)
    elif kind == "hold":
        async with pool.acquire():
            await asyncio.sleep(0.005)
    elif kind == "transaction":
        async with pool.transaction() as conn:
            if driver == "asyncpg":
                assert await conn.fetchval("SELECT $1::int", value) == value
            elif driver == "psycopg":
                cur = await conn.execute("SELECT %s::int", (value,))
                assert (await cur.fetchone())[0] == value
            await asyncio.sleep(0.002)
    elif kind == "dirty":
        await pool.execute(f"SET application_name = 'x{value}'")
    elif kind == "short_timeout":
        try:
            async with pool.acquire(timeout=0.001):
                await asyncio.sleep(0.001)
        except PoolTimeout:
            pass
    else:
        if driver == "memory":
            await asyncio.sleep(0.01)
        else:
            await pool.fetchval("SELECT pg_sleep(0.01)")


async def storm(pool: millpond.Pool, driver: str, ops: list[tuple[str, Any, int]]) -> None:
    async def guarded(kind: str, cancel_after: float | None, value: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        timer = None
        if cancel_after is not None:
            timer = asyncio.get_running_loop().call_later(cancel_after, task.cancel)
        try:
            await one_op(pool, driver, kind, value)
        except asyncio.CancelledError:
            pass
        finally:
            if timer is not None:
                timer.cancel()

    await asyncio.gather(*(guarded(*op) for op in ops))


async def settle(pool: millpond.Pool) -> millpond.PoolStats:
    for _ in range(500):
        s = pool.stats()
        if not (s.connecting or s.resetting or s.in_use or pool._janitor.busy):
            return s
        await asyncio.sleep(0.01)
    return pool.stats()


def check_invariants(s: millpond.PoolStats) -> None:
    assert s.in_use == 0, s
    assert s.waiting == 0, s
    assert s.connecting == 0, s
    assert s.resetting == 0, s
    assert s.size == s.idle + s.in_use, s
    assert s.min_size <= s.size <= s.max_size, s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_random_cancellations_memory(ops: list[tuple[str, Any, int]]) -> None:
    async def main() -> None:
        async with millpond.create_pool(driver="memory", min_size=1, max_size=3) as pool:
            await storm(pool, "memory", ops)
            s = await settle(pool)
            check_invariants(s)
            drv = pool.driver
            assert drv.open_connections == s.size  # type: ignore[attr-defined]
            assert await pool.fetchval("SELECT 1") == 1

    run(main())


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_random_cancellations_real_server(pg_dsn: str, driver: str) -> None:
    app = f"cancel-fuzz-{driver}"
    kwargs: dict[str, Any] = (
        {"server_settings": {"application_name": app}}
        if driver == "asyncpg"
        else {"application_name": app}
    )

    async def count_backends() -> int:
        conn = await asyncpg.connect(pg_dsn)
        try:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND (application_name = $1 OR "
                "application_name LIKE 'x%')",
                app,
            )
            return n
        finally:
            await conn.close()

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=ops_strategy, seed=st.integers(0, 2**32 - 1))
    def inner(ops: list[tuple[str, Any, int]], seed: int) -> None:
        random.seed(seed)

        async def main() -> None:
            async with millpond.create_pool(
                pg_dsn, driver=driver, min_size=1, max_size=4, connect_kwargs=kwargs
            ) as pool:
                await storm(pool, driver, ops)
                s = await settle(pool)
                check_invariants(s)
                assert await count_backends() == s.size
                # Every connection still answers correctly, with no leftover state.
                got = await asyncio.gather(
                    *(pool.fetchval("SELECT current_setting('application_name')") for _ in range(8))
                )
                assert set(got) == {app}
            await asyncio.sleep(0.05)
            assert await count_backends() == 0

        run(main())

    inner()
