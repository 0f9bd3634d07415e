"""The compiled lane inside the proxy (src/millpond/proxy/lane.py).

The end-to-end suite runs every behaviour with the lane on and off; these tests look
inside a proxy running in this process, to check that the lane really served what it
should and that every way out of it hands the Python path an exact state: a SET, a
transaction, a cancel, the admin console, a Python-path client of the same pool waiting
while the lane keeps every server busy, a client that dies mid-transaction, a server's
lifetime, clients with different parameters.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import AsyncClientCursor

from millpond.embedded import PostgresCluster
from millpond.proxy.pools import ServerPool
from millpond.proxy.server import Proxy
from tests.helpers import run
from tests.integration.test_proxy_admin import console, pool_row, running_proxy, show


async def simple(proxy: Proxy, **params: str) -> psycopg.AsyncConnection[Any]:
    """A client speaking the simple query protocol (psycopg's client-side binding)."""
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1",
        port=proxy.port,
        dbname="postgres",
        user="postgres",
        autocommit=True,
        cursor_factory=AsyncClientCursor,
        **params,
    )


async def value(conn: psycopg.AsyncConnection[Any], sql: str, *args: Any) -> Any:
    cur = await conn.execute(sql, args or None)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def the_pool(proxy: Proxy) -> ServerPool:
    return proxy.pools[("postgres", "postgres")]


def lane_transactions(pool: ServerPool) -> int:
    assert pool.lane is not None
    return pool.lane.lane.transactions if pool.lane.lane is not None else 0


def test_simple_queries_run_in_the_lane_and_are_counted(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="3") as proxy:
            clients = [await simple(proxy) for _ in range(8)]

            async def work(i: int, conn: psycopg.AsyncConnection[Any]) -> None:
                for n in range(40):
                    assert await value(conn, "SELECT %s::int * 1000 + %s", i, n) == i * 1000 + n

            await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
            pool = the_pool(proxy)
            assert lane_transactions(pool) >= 8 * 40 - 8  # a first one each may be Python's
            assert all(c.pgconn.status == 0 for c in clients)
            proxy.release_kept()  # folds the lane's counters
            assert pool.counters.xact_count >= 8 * 40
            assert pool.counters.query_count >= 8 * 40
            admin = await console(proxy)
            stats = {r["database"]: r for r in await show(admin, "STATS")}
            assert stats["postgres"]["total_xact_count"] >= 8 * 40
            # the admin console took everything out of the lane: exact state, no servers lent
            assert pool.lane is not None
            assert not pool.lane.lent
            assert pool_row(await show(admin, "POOLS"))["sv_active"] == 0
            for c in clients:
                await c.close()
            await admin.close()

    run(main())


def test_a_set_leaves_the_lane_and_stays_with_its_client(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            a, b = await simple(proxy), await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            assert await value(b, "SELECT 1") == 1
            await a.execute("SET statement_timeout = '1234ms'")  # refused by the lane
            for _ in range(20):
                assert await value(a, "SHOW statement_timeout") == "1234ms"
                assert await value(b, "SHOW statement_timeout") == "0"  # never leaked
            assert the_pool(proxy).lane is not None
            await a.close()
            await b.close()

    run(main())


def test_a_transaction_across_queries_keeps_its_server(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            a, b = await simple(proxy), await simple(proxy)
            await a.execute("DROP TABLE IF EXISTS lane_tx")
            await a.execute("CREATE TABLE lane_tx (x int)")
            await a.execute("BEGIN")
            pid = await value(a, "SELECT pg_backend_pid()")
            await a.execute("INSERT INTO lane_tx VALUES (1)")
            assert await value(b, "SELECT count(*) FROM lane_tx") == 0  # not committed
            assert await value(a, "SELECT pg_backend_pid()") == pid
            assert await value(a, "SELECT count(*) FROM lane_tx") == 1
            assert any(c.lane_side is not None and c.lane_side.linked for c in proxy.clients)
            await a.execute("COMMIT")
            assert await value(b, "SELECT count(*) FROM lane_tx") == 1
            await a.execute("DROP TABLE lane_tx")
            assert lane_transactions(the_pool(proxy)) > 0
            await a.close()
            await b.close()

    run(main())


def test_a_cancel_reaches_a_query_running_in_the_lane(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            a = await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            assert await value(a, "SELECT 2") == 2  # in the lane by now
            task = asyncio.ensure_future(a.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.3)
            assert any(c.lane_side is not None and c.lane_side.linked for c in proxy.clients)
            await a.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(task, 10)
            assert await value(a, "SELECT 3") == 3  # the connection goes on
            await a.close()

    run(main())


def test_a_python_path_client_is_served_while_the_lane_is_busy(
    pg_cluster: PostgresCluster,
) -> None:
    """Lane clients keep both servers busy; an extended-protocol client of the same pool
    (the Python path) still gets one at the lane's next release, not at a timeout."""

    async def main() -> None:
        async with running_proxy(
            pg_cluster, default_pool_size="2", query_wait_timeout="3"
        ) as proxy:
            busy = [await simple(proxy) for _ in range(6)]
            stop = asyncio.Event()

            async def hammer(conn: psycopg.AsyncConnection[Any]) -> int:
                count = 0
                while not stop.is_set():
                    assert await value(conn, "SELECT 1") == 1
                    count += 1
                return count

            tasks = [asyncio.ensure_future(hammer(c)) for c in busy]
            other = await asyncpg.connect(
                f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", statement_cache_size=0
            )
            for n in range(30):
                assert await other.fetchval("SELECT $1::int", n) == n
            stop.set()
            assert all(n > 0 for n in await asyncio.gather(*tasks))
            assert lane_transactions(the_pool(proxy)) > 0
            await other.close()
            for c in busy:
                await c.close()

    run(main())


def test_a_client_dying_mid_transaction_leaves_no_trace(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="1") as proxy:
            a = await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            await a.execute("BEGIN")
            await a.execute("CREATE TABLE lane_dead (x int)")
            pid = await value(a, "SELECT pg_backend_pid()")
            assert [c.lane_side.linked for c in proxy.clients if c.lane_side] == [True]
            a.pgconn.finish()  # the socket closes under the lane, mid-transaction
            await a.close()
            b = await simple(proxy)
            for _ in range(3):  # the one server is a new one, outside any transaction
                assert await value(b, "SELECT pg_backend_pid()") != pid
                assert await value(b, "SELECT to_regclass('lane_dead')") is None  # rolled back
            gone = False
            for _ in range(50):  # the old server process ends (closed, not pooled)
                sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                if await value(b, sql, pid) == 0:
                    gone = True
                    break
                await asyncio.sleep(0.1)
            assert gone
            await b.close()

    run(main())


def test_server_lifetime_applies_to_servers_in_the_lane(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="1", server_lifetime="1") as proxy:
            clients = [await simple(proxy) for _ in range(3)]
            pids = set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3.5

            async def work(conn: psycopg.AsyncConnection[Any]) -> None:
                while loop.time() < deadline:  # 3 clients, 1 server: it is never free
                    pids.add(await value(conn, "SELECT pg_backend_pid()"))

            await asyncio.gather(*(work(c) for c in clients))
            assert len(pids) >= 2
            assert lane_transactions(the_pool(proxy)) > 0
            for c in clients:
                await c.close()

    run(main())


def test_clients_with_other_parameters_get_their_own_settings(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            x = [await simple(proxy, application_name="lane-x") for _ in range(3)]
            y = [await simple(proxy, application_name="lane-y") for _ in range(3)]

            async def check(conn: psycopg.AsyncConnection[Any], name: str) -> None:
                for _ in range(30):
                    assert await value(conn, "SHOW application_name") == name

            await asyncio.gather(*(check(c, "lane-x") for c in x), *(check(c, "lane-y") for c in y))
            pool = the_pool(proxy)
            assert pool.lane is not None
            assert pool.lane.params["application_name"] == "lane-x"
            assert lane_transactions(pool) > 0
            for c in x + y:
                await c.close()

    run(main())


def test_pause_and_resume_with_clients_in_the_lane(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            a = await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            assert await value(a, "SELECT 2") == 2
            admin = await console(proxy)
            await admin.execute("PAUSE")
            assert all(c.lane_side is None for c in proxy.clients)
            task = asyncio.ensure_future(value(a, "SELECT 3"))
            await asyncio.sleep(0.3)
            assert not task.done()  # paused: it waits
            await admin.execute("RESUME")
            assert await asyncio.wait_for(task, 5) == 3
            assert await value(a, "SELECT 4") == 4
            await admin.close()
            await a.close()

    run(main())


def test_the_lane_is_off_when_asked(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, fast_lane="0") as proxy:
            a = await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            assert the_pool(proxy).lane is None
            await a.close()
        async with running_proxy(pg_cluster, pool_mode="session") as proxy:
            a = await simple(proxy)
            assert await value(a, "SELECT 1") == 1
            assert the_pool(proxy).lane is None  # transaction mode only
            await a.close()

    run(main())
