"""Session state in transaction mode: never leaked to another client, never lost by its owner.

Settings (SET, RESET) are remembered per client and re-applied on whichever server
connection serves it; features that cannot move (temp tables, advisory locks, LISTEN,
WITH HOLD cursors, SQL PREPARE, SET ROLE) pin the client to its server connection, which
is reset before anyone else gets it.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory, ProxyProcess, pg_tool, run_tool
from tests.helpers import run


async def connect(proxy: ProxyProcess) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.url(), statement_cache_size=0)


SETTINGS = [
    ("SET search_path = nowhere, public", "SHOW search_path", "nowhere, public"),
    ("SET statement_timeout = '42s'", "SHOW statement_timeout", "42s"),
    # A custom setting, once defined on a server, reads as '' after RESET (not NULL):
    # PostgreSQL keeps the placeholder. Its value never leaks.
    (
        "SET myapp.tenant = 'acme'",
        "SELECT coalesce(current_setting('myapp.tenant', true), '')",
        "acme",
    ),
    ("SET SESSION work_mem = '7MB'", "SHOW work_mem", "7MB"),
    ("/* hi */ SET TIME ZONE 'Asia/Tokyo'", "SHOW timezone", "Asia/Tokyo"),
]


@pytest.mark.parametrize(("statement", "probe", "value"), SETTINGS)
def test_settings_follow_their_client_and_nobody_else(
    proxy_factory: ProxyFactory, statement: str, probe: str, value: str
) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        a, b = await connect(proxy), await connect(proxy)
        try:
            default = await b.fetchval(probe)
            assert default != value
            await a.execute(statement)
            for _ in range(3):  # they take turns on the one server connection
                assert await a.fetchval(probe) == value
                assert await b.fetchval(probe) == default
            assert await a.fetchval("SELECT pg_backend_pid()") == await b.fetchval(
                "SELECT pg_backend_pid()"
            )
            await a.execute("RESET ALL")
            assert await a.fetchval(probe) == default
        finally:
            await a.close()
            await b.close()

    run(main())


def test_set_inside_a_committed_transaction_sticks_and_local_does_not(
    proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        a, b = await connect(proxy), await connect(proxy)
        try:
            async with a.transaction():
                await a.execute("SET search_path = inside")
                await a.execute("SET LOCAL work_mem = '9MB'")
            assert await b.fetchval("SHOW search_path") == '"$user", public'
            assert await a.fetchval("SHOW search_path") == "inside"
            assert await a.fetchval("SHOW work_mem") != "9MB"
        finally:
            await a.close()
            await b.close()

    run(main())


PINNING = [
    ("CREATE TEMP TABLE mine (a int)", "SELECT to_regclass('pg_temp.mine') IS NOT NULL"),
    ("SELECT pg_advisory_lock(4242)",
     "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"),
    ("LISTEN chan", "SELECT count(*) > 0 FROM pg_listening_channels()"),
    ("PREPARE p1 AS SELECT 1", "SELECT count(*) > 0 FROM pg_prepared_statements WHERE name = 'p1'"),
    ("DECLARE c1 CURSOR WITH HOLD FOR SELECT 1",
     "SELECT count(*) > 0 FROM pg_cursors WHERE name = 'c1'"),
    ("SET ROLE pinned_role", "SELECT current_user = 'pinned_role'"),
    ("SELECT set_config('x.y', 'z', false)", "SELECT current_setting('x.y', true) = 'z'"),
]  # fmt: skip


@pytest.mark.parametrize(("statement", "probe"), PINNING)
def test_unmovable_state_pins_and_is_reset_after(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory, statement: str, probe: str
) -> None:
    pg_cluster.psql(
        "DO $$ BEGIN CREATE ROLE pinned_role; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        a = await connect(proxy)
        await a.execute(statement)
        pid = await a.fetchval("SELECT pg_backend_pid()")
        b_task = asyncio.create_task(connect_and_probe(proxy, probe))
        for _ in range(3):  # A keeps its server and its state across transactions
            assert await a.fetchval(probe) is True
            assert await a.fetchval("SELECT pg_backend_pid()") == pid
        await asyncio.sleep(0.2)
        assert not b_task.done()  # B waits: the only server connection is A's
        await a.close()
        b_pid, b_sees = await asyncio.wait_for(b_task, 10)
        assert b_pid == pid  # the same server connection, reset before B got it
        assert b_sees is False

    run(main())


async def connect_and_probe(proxy: ProxyProcess, probe: str) -> tuple[int, bool]:
    b = await connect(proxy)
    try:
        return await b.fetchval("SELECT pg_backend_pid()"), await b.fetchval(probe)
    finally:
        await b.close()


def test_listen_works_while_pinned(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="2")

    async def main() -> None:
        listener, talker = await connect(proxy), await connect(proxy)
        got: asyncio.Queue[str] = asyncio.Queue()
        try:
            await listener.add_listener("news", lambda *args: got.put_nowait(args[3]))
            await talker.execute("NOTIFY news, 'hello'")
            assert await asyncio.wait_for(got.get(), 5) == "hello"
        finally:
            await listener.close()
            await talker.close()

    run(main())


def test_reject_policy_refuses_clearly(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(default_pool_size="1", session_pinning="reject")

    async def main() -> None:
        a = await connect(proxy)
        try:
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="session_pinning = reject"):
                await a.execute("CREATE TEMP TABLE nope (a int)")
            assert await a.fetchval("SELECT 'still fine'") == "still fine"
            b = await connect(proxy)  # the server connection was not kept by A
            assert await b.fetchval("SELECT to_regclass('pg_temp.nope')") is None
            await b.close()
        finally:
            await a.close()

    run(main())


def test_pinned_clients_show_in_show_pools(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(default_pool_size="2")

    async def main() -> None:
        a = await connect(proxy)
        await a.execute("CREATE TEMP TABLE pinned_here (a int)")
        out = await asyncio.to_thread(
            run_tool,
            [pg_tool(pg_cluster, "psql"), proxy.url(db="pgbouncer"), "-X", "-A", "-F", ",",
             "-c", "SHOW POOLS"],
        )  # fmt: skip
        lines = out.stdout.splitlines()
        header = lines[0].split(",")
        row = next(dict(zip(header, line.split(","), strict=True)) for line in lines[1:]
                   if line.startswith("postgres,postgres,"))  # fmt: skip
        assert row["cl_pinned"] == "1"
        await a.close()

    run(main())
