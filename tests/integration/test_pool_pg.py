"""The library pool against a real PostgreSQL, on both drivers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest

import millpond
from millpond import DatabaseUnavailable
from millpond.embedded import PostgresCluster
from tests.helpers import ClusterFactory, run

DRIVERS = ["asyncpg", "psycopg"]


def ph(driver: str, n: int = 1) -> str:
    """The driver's own placeholder for parameter ``n``."""
    return f"${n}" if driver == "asyncpg" else "%s"


async def backends(dsn: str, app: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
        )
        return n
    finally:
        await conn.close()


async def terminate_backends(dsn: str, app: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            app,
        )
        return n
    finally:
        await conn.close()


def app_kwargs(driver: str, app: str) -> dict[str, Any]:
    if driver == "asyncpg":
        return {"server_settings": {"application_name": app}}
    return {"application_name": app}


@pytest.mark.parametrize("driver", DRIVERS)
def test_everyday_api(pg_dsn: str, driver: str) -> None:
    table = f"api_{driver}"
    p = ph(driver)

    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver=driver, min_size=2, max_size=4) as pool:
            await pool.execute(f"DROP TABLE IF EXISTS {table}")
            await pool.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
            await pool.executemany(
                f"INSERT INTO {table} VALUES ({ph(driver, 1)}, {ph(driver, 2)})",
                [(1, "a"), (2, "b"), (3, "c")],
            )
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 3
            rows = await pool.fetch(f"SELECT id, name FROM {table} WHERE id > {p} ORDER BY id", 1)
            assert [tuple(r) for r in rows] == [(2, "b"), (3, "c")]
            row = await pool.fetchrow(f"SELECT name, id FROM {table} WHERE id = {p}", 2)
            assert tuple(row) == ("b", 2)
            assert (
                await pool.fetchval(f"SELECT id, name FROM {table} WHERE id = 3", column=1) == "c"
            )
            assert await pool.fetchrow(f"SELECT * FROM {table} WHERE id = 99") is None
            status = await pool.execute(f"UPDATE {table} SET name = 'z' WHERE id < {p}", 3)
            assert status == "UPDATE 2"

            async with pool.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (4, 'd')")

            async def failing_transaction() -> None:
                async with pool.transaction() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (5, 'e')")
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError, match="boom"):
                await failing_transaction()
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 4

            async with pool.transaction(isolation="serializable", readonly=True) as conn:
                level = await (
                    conn.fetchval("SHOW transaction_isolation")
                    if driver == "asyncpg"
                    else (await conn.execute("SHOW transaction_isolation")).fetchone()
                )
                assert "serializable" in str(level)

            async with pool.acquire() as conn:
                kind = asyncpg.Connection if driver == "asyncpg" else psycopg.AsyncConnection
                assert isinstance(conn, kind)
            await pool.execute(f"DROP TABLE {table}")
            s = pool.stats()
            assert s.in_use == 0
            assert s.acquires >= 10

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_sql_errors_pass_through_and_pool_keeps_working(pg_dsn: str, driver: str) -> None:
    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver=driver, min_size=1, max_size=1) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            expected = (
                asyncpg.PostgresSyntaxError if driver == "asyncpg" else psycopg.errors.SyntaxError
            )
            with pytest.raises(expected):
                await pool.fetchval("SELEC 1")

            async def divide_by_zero() -> None:
                async with pool.transaction() as conn:
                    await conn.execute("SELECT 1/0")

            division = (
                asyncpg.DivisionByZeroError
                if driver == "asyncpg"
                else psycopg.errors.DivisionByZero
            )
            with pytest.raises(division):
                await divide_by_zero()
            assert await pool.fetchval("SELECT pg_backend_pid()") == pid  # kept, not replaced
            assert await pool.fetchval("SELECT 41 + 1") == 42

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_unreachable_database_is_a_clear_error(pg_cluster: PostgresCluster, driver: str) -> None:
    bad_port = pg_cluster.dsn().replace(f":{pg_cluster.port}/", ":1/")

    async def main() -> None:
        with pytest.raises(DatabaseUnavailable) as info:
            await millpond.create_pool(bad_port, driver=driver, connect_timeout=2)
        assert isinstance(info.value.__cause__, OSError | psycopg.OperationalError)
        with pytest.raises(DatabaseUnavailable) as info:
            await millpond.create_pool(pg_cluster.dsn(dbname="no_such_db"), driver=driver)
        assert "no_such_db" in str(info.value)

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_wrong_password(own_cluster: ClusterFactory, driver: str) -> None:
    cluster = own_cluster(hba_lines=["host all alice 127.0.0.1/32 scram-sha-256"])
    cluster.create_user("alice", password="right")

    async def main() -> None:
        with pytest.raises(DatabaseUnavailable, match="alice") as info:
            await millpond.create_pool(cluster.dsn(user="alice", password="wrong"), driver=driver)
        cause = info.value.__cause__
        if driver == "asyncpg":
            assert isinstance(cause, asyncpg.InvalidPasswordError)
        else:
            assert isinstance(cause, psycopg.OperationalError)
        dsn = cluster.dsn(user="alice", password="right")
        async with millpond.create_pool(dsn, driver=driver) as pool:
            assert await pool.fetchval("SELECT current_user") == "alice"

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_clean_release_makes_no_round_trip(pg_dsn: str, driver: str) -> None:
    """The server sees nothing between two leases of a clean connection."""
    app = f"noroundtrip-{driver}"

    async def main() -> None:
        kwargs = app_kwargs(driver, app)
        async with millpond.create_pool(
            pg_dsn, driver=driver, min_size=1, max_size=1, connect_kwargs=kwargs
        ) as pool:
            await pool.fetchval("SELECT 'marker-1'")
            for _ in range(20):
                async with pool.acquire():
                    pass
            probe = await asyncpg.connect(pg_dsn)
            try:
                last = await probe.fetchval(
                    "SELECT query FROM pg_stat_activity WHERE application_name = $1", app
                )
            finally:
                await probe.close()
            assert last == "SELECT 'marker-1'"
            assert pool.stats().resets == 0

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_terminated_idle_backends_are_never_lent(pg_dsn: str, driver: str) -> None:
    app = f"terminated-{driver}"

    async def main() -> None:
        async with millpond.create_pool(
            pg_dsn, driver=driver, min_size=4, max_size=4, connect_kwargs=app_kwargs(driver, app)
        ) as pool:
            assert await terminate_backends(pg_dsn, app) == 4
            await asyncio.sleep(0.1)
            # Every caller gets a working connection: no error reaches them.
            results = await asyncio.gather(*(pool.fetchval("SELECT 7") for _ in range(20)))
            assert results == [7] * 20
            assert pool.stats().connections_closed["broken"] == 4

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_restart_while_idle_costs_no_error(own_cluster: ClusterFactory, driver: str) -> None:
    cluster = own_cluster()

    async def main() -> None:
        async with millpond.create_pool(
            cluster.dsn(), driver=driver, min_size=3, max_size=3
        ) as pool:
            assert await pool.fetchval("SELECT 1") == 1
            await asyncio.to_thread(cluster.restart, "fast")
            await asyncio.sleep(0.1)
            assert await pool.fetchval("SELECT 2") == 2
            await asyncio.sleep(0.2)
            assert pool.stats().size == 3

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_query_cancelled_by_timeout_leaves_no_debris(pg_dsn: str, driver: str) -> None:
    """A borrower cancelled mid-query: the next borrower of that connection gets right answers."""

    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver=driver, min_size=1, max_size=1) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await pool.fetchval("SELECT pg_sleep(2)")
                assert await pool.fetchval(f"SELECT {ph(driver)}::int", 5) == 5
            assert await pool.fetchval("SELECT pg_backend_pid()") in (pid, pid)
            s = pool.stats()
            assert s.in_use == 0
            assert s.size == 1

    run(main())


@pytest.mark.parametrize("driver", DRIVERS)
def test_many_tasks_few_connections(pg_dsn: str, driver: str) -> None:
    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver=driver, min_size=5, max_size=5) as pool:
            out = await asyncio.gather(
                *(pool.fetchval(f"SELECT {ph(driver)}::int * 2", i) for i in range(500))
            )
            assert out == [i * 2 for i in range(500)]
            s = pool.stats()
            assert s.size == 5
            assert s.waits > 0
            assert s.wait_time.count == 500

    run(main())


def test_psycopg_client_side_settings_do_not_leak(pg_dsn: str) -> None:
    from psycopg.rows import dict_row

    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver="psycopg", min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                conn.row_factory = dict_row
                conn.prepare_threshold = 0
            async with pool.acquire() as conn:
                cur = await conn.execute("SELECT 1 AS one")
                assert await cur.fetchone() == (1,)
                assert conn.prepare_threshold == 5
            assert pool.stats().resets == 1

    run(main())


def test_psycopg_prepared_statements_survive_repeated_resets(pg_dsn: str) -> None:
    """psycopg forgets its prepared statements on DISCARD ALL only the first time it
    sees one; every later reset must still leave no stale statement names behind."""

    async def main() -> None:
        async with millpond.create_pool(pg_dsn, driver="psycopg", min_size=1, max_size=1) as pool:
            for i in range(12):
                async with pool.acquire() as conn:
                    await conn.execute("SET application_name = 'resets'")  # reset on release
                    cur = await conn.execute("SELECT %s::int", (i,))  # prepared after 5 runs
                    assert (await cur.fetchone())[0] == i
            s = pool.stats()
            assert s.resets == 12
            assert s.connections_closed_total == 0

    run(main())
