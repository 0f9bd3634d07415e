"""Named prepared statements through transaction pooling (issue 5's first part).

Drivers that prepare server-side (asyncpg's statement cache, psycopg's prepare
threshold, pgbench -M prepared) must work when each transaction may land on a
different server connection.
"""

from __future__ import annotations

import asyncio
import re

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory, pg_tool, run_tool
from tests.helpers import run


def test_asyncpg_statement_cache_in_transaction_mode(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="2")

    async def main() -> None:
        async def client(i: int) -> None:
            conn = await asyncpg.connect(proxy.url())  # default statement cache on
            try:
                for j in range(30):
                    got = await conn.fetchval("SELECT $1::int * 100 + $2::int", i, j)
                    assert got == i * 100 + j
                    row = await conn.fetchrow("SELECT $1::text AS t, $2::int AS n", f"c{i}", j)
                    assert (row["t"], row["n"]) == (f"c{i}", j)
                async with conn.transaction():
                    assert await conn.fetchval("SELECT $1::int", -i) == -i
                stmt = await conn.prepare("SELECT $1::int + 1")
                assert await stmt.fetchval(i) == i + 1
            finally:
                await conn.close()

        await asyncio.gather(*(client(i) for i in range(25)))

    run(main())


def test_psycopg_prepare_threshold_zero(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="2")

    async def main() -> None:
        async def client(i: int) -> None:
            async with await psycopg.AsyncConnection.connect(
                proxy.url(), autocommit=True, prepare_threshold=0
            ) as conn:
                for j in range(20):
                    cur = await conn.execute("SELECT %s::int * 100 + %s::int", (i, j))
                    assert await cur.fetchone() == (i * 100 + j,)

        await asyncio.gather(*(client(i) for i in range(12)))

    run(main())


def test_pipeline_with_an_error_in_the_middle(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(
            proxy.url(), autocommit=True, prepare_threshold=0
        ) as conn:

            async def failing_pipeline() -> None:
                async with conn.pipeline():
                    await conn.execute("SELECT %s::int", (1,))
                    await conn.execute("SELECT 1 / %s::int", (0,))
                    await conn.execute("SELECT %s::int", (3,))

            for _ in range(3):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    await failing_pipeline()
                cur = await conn.execute("SELECT %s::int + 1", (41,))
                assert await cur.fetchone() == (42,)

    run(main())


def test_deallocate_all_and_a_tiny_lru(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="1", max_prepared_statements="3")

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url())
        try:
            for round_ in range(3):
                for k in range(8):  # more distinct statements than the server keeps
                    assert await conn.fetchval(f"SELECT $1::int + {k}", round_) == round_ + k
            await conn.execute("DEALLOCATE ALL")
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()
        setup = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        try:
            held = await setup.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'mp_%'"
            )
            assert held <= 3
        finally:
            await setup.close()

    run(main())


def test_discard_all_by_one_client_spares_the_others(proxy_factory: ProxyFactory) -> None:
    """DISCARD ALL (a simple Query) drops every statement on the shared server
    connection: the proxy must forget them there, so another client's statement is
    prepared again instead of failing with 'prepared statement does not exist'."""
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        a = await asyncpg.connect(proxy.url())
        b = await asyncpg.connect(proxy.url())
        try:
            sql = "SELECT $1::int + 7"
            assert await a.fetchval(sql, 1) == 8
            assert await b.fetchval(sql, 2) == 9  # the same server-side statement
            await a.execute("DISCARD ALL")
            assert await b.fetchval(sql, 3) == 10
            # a's own statement is gone, as PostgreSQL itself would say
            with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                await a.fetchval(sql, 4)
        finally:
            await a.close()
            await b.close()

    run(main())


def test_pgbench_prepared(pg_cluster: PostgresCluster, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="3")
    pgbench = pg_tool(pg_cluster, "pgbench")
    run_tool([pgbench, "-i", "-s", "1", "-q", pg_cluster.dsn()], timeout=120)
    # One thread per client: pgbench 15 prepares with the blocking PQprepare, so a
    # thread serving several clients would wait on one while another holds a server.
    result = run_tool([pgbench, "-M", "prepared", "-c", "8", "-j", "8", "-t", "200", proxy.url()])
    assert "number of failed transactions: 0" in result.stdout, result.stdout
    assert re.search(r"actually processed: 1600/1600", result.stdout)
    result = run_tool(
        [pgbench, "-M", "prepared", "-S", "-c", "8", "-j", "8", "-t", "200", proxy.url()]
    )
    assert re.search(r"actually processed: 1600/1600", result.stdout)
