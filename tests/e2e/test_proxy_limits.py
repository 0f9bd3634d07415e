"""Limits across pools: max_db_connections, max_user_connections, and the reserve pool."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory, ProxyProcess
from tests.helpers import run


async def peak_backends(dsn: str, users: tuple[str, ...], stop: asyncio.Event) -> int:
    """The most server backends of ``users`` seen at once while the test runs."""
    conn = await asyncpg.connect(dsn)
    peak = 0
    try:
        while not stop.is_set():
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1::text[]) "
                "AND pid <> pg_backend_pid()",
                list(users),
            )
            peak = max(peak, n)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return peak


async def hold(proxy: ProxyProcess, user: str, seconds: float) -> None:
    conn = await asyncpg.connect(proxy.url(user=user), statement_cache_size=0)
    try:
        async with conn.transaction():
            await conn.execute(f"SELECT pg_sleep({seconds})")
    finally:
        await conn.close()


def make_users(cluster: PostgresCluster, *names: str) -> None:
    for name in names:
        cluster.psql(
            f"DO $$ BEGIN CREATE ROLE {name} LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )


def test_max_db_connections_caps_all_pools_of_a_database(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    make_users(pg_cluster, "lim_a", "lim_b")
    proxy = proxy_factory(default_pool_size="5", max_db_connections="2")

    async def main() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_backends(pg_cluster.dsn(), ("lim_a", "lim_b"), stop))
        started = time.monotonic()
        await asyncio.gather(*(hold(proxy, user, 0.4) for user in ("lim_a", "lim_b") * 3))
        elapsed = time.monotonic() - started
        stop.set()
        assert await watcher <= 2
        assert elapsed >= 0.4 * 3 * 0.9  # six 0.4 s transactions, two at a time

    run(main())


def test_max_user_connections(pg_cluster: PostgresCluster, proxy_factory: ProxyFactory) -> None:
    make_users(pg_cluster, "lim_c")
    proxy = proxy_factory(default_pool_size="5", max_user_connections="1")

    async def main() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_backends(pg_cluster.dsn(), ("lim_c",), stop))
        await asyncio.gather(*(hold(proxy, "lim_c", 0.3) for _ in range(3)))
        stop.set()
        assert await watcher == 1

    run(main())


def test_reserve_pool_helps_a_client_that_waited_too_long(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    make_users(pg_cluster, "lim_r")
    proxy = proxy_factory(default_pool_size="1", reserve_pool_size="1", reserve_pool_timeout="0.3")

    async def main() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(peak_backends(pg_cluster.dsn(), ("lim_r",), stop))
        started = time.monotonic()
        await asyncio.gather(hold(proxy, "lim_r", 1.5), hold(proxy, "lim_r", 1.5))
        elapsed = time.monotonic() - started
        stop.set()
        assert await watcher == 2  # the reserve connection was opened
        assert elapsed < 2.8  # the second client did not wait for the first to finish

    run(main())
