"""PgBouncer's client-side timeouts, and auth_query, through a real proxy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory
from tests.helpers import run


def test_query_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(query_timeout="1")

    async def main() -> None:
        slow = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        fast = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        started = time.monotonic()
        with pytest.raises((asyncpg.PostgresError, asyncpg.ConnectionDoesNotExistError)):
            await slow.fetchval("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 3
        assert await fast.fetchval("SELECT 'unaffected'") == "unaffected"
        await fast.close()

    run(main())


def test_query_wait_timeout(proxy_factory: ProxyFactory) -> None:
    """A client that waits too long for a server gets PgBouncer's error; the others
    (and the proxy's other timeouts, checked by the same sweep) carry on."""
    proxy = proxy_factory(default_pool_size="1", query_wait_timeout="1")

    async def main() -> None:
        holder = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        waiter = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        await holder.execute("BEGIN")  # the only server connection stays with the holder
        started = time.monotonic()
        with pytest.raises((asyncpg.PostgresError, asyncpg.ConnectionDoesNotExistError)) as err:
            await waiter.fetchval("SELECT 1")
        assert 0.9 < time.monotonic() - started < 3
        assert "query_wait_timeout" in str(err.value) or waiter.is_closed()
        assert await holder.fetchval("SELECT 'holder unaffected'") == "holder unaffected"
        await holder.execute("COMMIT")
        again = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        assert await again.fetchval("SELECT 2") == 2  # the sweep is still alive
        for conn in (holder, again):
            await conn.close()

    run(main())


def test_client_login_timeout(proxy_factory: ProxyFactory) -> None:
    """A client that connects and never finishes its login is dropped; one that did
    log in is not, however long ago that was."""
    proxy = proxy_factory(client_login_timeout="1")

    async def main() -> None:
        logged_in = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) is not None  # EOF: closed on us
        assert 0.9 < time.monotonic() - started < 3
        writer.close()
        await asyncio.sleep(0.6)
        assert await logged_in.fetchval("SELECT 3") == 3
        await logged_in.close()

    run(main())


def test_client_idle_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(client_idle_timeout="1")

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        assert await conn.fetchval("SELECT 1") == 1
        await asyncio.sleep(2.2)
        assert conn.is_closed() or await _fails(conn.fetchval("SELECT 1"))

    run(main())


def test_idle_transaction_timeout_rolls_back(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(idle_transaction_timeout="1")

    async def main() -> None:
        setup = await asyncpg.connect(pg_cluster.dsn())
        await setup.execute("DROP TABLE IF EXISTS e2e_idle_tx; CREATE TABLE e2e_idle_tx (a int)")
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        await conn.execute("BEGIN; INSERT INTO e2e_idle_tx VALUES (1)")
        await asyncio.sleep(2.2)
        assert conn.is_closed() or await _fails(conn.fetchval("SELECT 1"))
        assert await setup.fetchval("SELECT count(*) FROM e2e_idle_tx") == 0
        await setup.close()

    run(main())


async def _fails(coro: object) -> bool:
    try:
        await coro  # type: ignore[misc]
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return True
    return False


def test_auth_query_finds_secrets_in_the_database(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    pg_cluster.psql("DROP ROLE IF EXISTS aq_user; CREATE ROLE aq_user LOGIN PASSWORD 'aq-pw'")
    users = tmp_path / "userlist.txt"
    users.write_text('"postgres" "unused"\n')  # only the auth_user is listed
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=str(users), auth_user="postgres")

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url(user="aq_user", password="aq-pw"))
        assert await conn.fetchval("SELECT current_user") == "aq_user"
        await conn.close()
        with pytest.raises(asyncpg.PostgresError, match="authentication failed"):
            await asyncpg.connect(proxy.url(user="aq_user", password="wrong"))
        with pytest.raises(asyncpg.PostgresError, match=r"no such user|authentication failed"):
            await asyncpg.connect(proxy.url(user="ghost", password="x"))

    run(main())


def test_application_name_add_host_and_logfile(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    logfile = tmp_path / "proxy.log"
    proxy = proxy_factory(
        application_name_add_host="1",
        logfile=str(logfile),
        default_pool_size="1",
        log_connections="1",
    )

    async def main() -> None:
        conn = await asyncpg.connect(
            proxy.url(), statement_cache_size=0, server_settings={"application_name": "app"}
        )
        try:
            name = await conn.fetchval("SHOW application_name")
            assert name.startswith("app - 127.0.0.1(")
        finally:
            await conn.close()

    run(main())
    time.sleep(0.2)
    assert "login: postgres@postgres" in logfile.read_text()
