"""Server affinity: in transaction mode an idle client keeps its last server connection
until another client needs it.

The shortcut must be invisible: another client gets a kept server at once (no wait, no
new connection), a kept server that dies or speaks up on its own is the pool's business
and not the idle client's, a cancel request for an idle client reaches no server, and
the admin console, PAUSE and the sweep's timeouts see the pool as PgBouncer would.
Each test runs a proxy in this process, so it can look at the pool it drives, with the
compiled lane off (affinity is the Python path's shortcut; the lane replaces it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from millpond.pool.state import CloseReason
from millpond.proxy.config import load_config
from millpond.proxy.pools import ServerPool
from millpond.proxy.server import Proxy
from tests.helpers import run, until
from tests.integration.test_proxy_admin import client, console, pool_row, show
from tests.integration.test_proxy_admin import running_proxy as lane_proxy


def running_proxy(pg_cluster: PostgresCluster, **overrides: Any) -> Any:
    return lane_proxy(pg_cluster, **{"fast_lane": "0", **overrides})


def the_pool(proxy: Proxy) -> ServerPool:
    return proxy.pools["postgres", "postgres"]


def idle_servers(pool: ServerPool) -> int:
    return len(pool._core.idle)


def test_an_idle_client_keeps_its_server_and_counts_each_lend(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="2") as proxy:
            a = await client(proxy)
            first = await a.fetchval("SELECT pg_backend_pid()")
            pool = the_pool(proxy)
            lends = pool.lends.acquires
            for _ in range(5):
                assert await a.fetchval("SELECT pg_backend_pid()") == first
            assert [c.keeps for c in pool.kept] == [True]  # a, idle, still holds it
            assert idle_servers(pool) == 0
            assert pool.lends.acquires == lends + 5  # each transaction still counts a lend
            await a.close()
            await until(lambda: not pool.kept and idle_servers(pool) == 1)

    run(main())


def test_without_affinity_every_transaction_releases(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, server_affinity="0") as proxy:
            a = await client(proxy)
            await a.fetchval("SELECT 1")
            pool = the_pool(proxy)
            assert not pool.affinity
            assert not pool.kept
            assert idle_servers(pool) == 1
            await a.close()

    run(main())


def test_another_client_gets_a_kept_server_at_once(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="1") as proxy:
            a, b = await client(proxy), await client(proxy)
            pid = await a.fetchval("SELECT pg_backend_pid()")
            pool = the_pool(proxy)
            waits, opened = pool._core.counters.waits, pool._core.counters.opened
            assert await b.fetchval("SELECT pg_backend_pid()") == pid  # taken from a
            assert await a.fetchval("SELECT pg_backend_pid()") == pid  # and back
            assert await b.fetchval("SELECT 2") == 2
            # nobody queued and no second connection was opened for it
            assert pool._core.counters.waits == waits
            assert pool._core.counters.opened == opened
            async with a.transaction():  # a's transaction holds it: b must wait for it
                await a.execute("SELECT 1")
                b_query = asyncio.ensure_future(b.fetchval("SELECT 3"))
                await asyncio.sleep(0.2)
                assert not b_query.done()
            assert await asyncio.wait_for(b_query, 10) == 3
            for conn in (a, b):
                await conn.close()

    run(main())


def test_a_kept_server_dying_spares_its_idle_client(pg_cluster: PostgresCluster) -> None:
    """The server's FATAL message (sent on its own, while idle) reaches no client: the
    kept server goes back to the pool, which drops it, and the client carries on."""

    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            a = await client(proxy)
            pid = await a.fetchval("SELECT pg_backend_pid()")
            pool = the_pool(proxy)
            assert pool.kept
            direct = await asyncpg.connect(pg_cluster.dsn())
            try:
                assert await direct.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await direct.close()
            await until(lambda: not pool.kept)
            assert not a.is_closed()
            new_pid = await a.fetchval("SELECT pg_backend_pid()")
            assert new_pid != pid
            assert await a.fetchval("SELECT 41 + 1") == 42
            await a.close()

    run(main())


def test_a_cancel_for_an_idle_client_reaches_no_server(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            sent: list[Any] = []
            forward = proxy._send_cancel

            def recorded(server: Any) -> Any:
                sent.append(server)
                return forward(server)

            proxy._send_cancel = recorded  # type: ignore[method-assign]
            conn = await psycopg.AsyncConnection.connect(
                host="127.0.0.1", port=proxy.port, dbname="postgres", user="postgres",
                autocommit=True,
            )  # fmt: skip
            await conn.execute("SELECT 1")
            assert the_pool(proxy).kept
            await conn.cancel_safe()  # nothing runs: like PostgreSQL, the proxy does nothing
            assert sent == []
            cur = await conn.execute("SELECT pg_sleep(0.3), 7")
            assert (await cur.fetchone()) == ("", 7)
            # the control: a cancel while a query runs does reach its server
            running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(10)"))
            await asyncio.sleep(0.3)
            await conn.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(running, 5)
            assert len(sent) == 1
            await conn.close()

    run(main())


def test_no_affinity_while_a_cancel_is_in_flight(pg_cluster: PostgresCluster) -> None:
    """A cancel still on its way when the transaction ends could hit the client's next
    query: the server is held back until it is done, then goes to the pool."""

    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            a = await client(proxy)
            await a.fetchval("SELECT 1")
            pool = the_pool(proxy)
            (kept,) = pool.kept
            server = kept.server  # type: ignore[attr-defined]
            server.cancels += 1  # as Proxy.cancel does before sending one
            await a.fetchval("SELECT 2")
            assert not pool.kept  # not kept ...
            assert idle_servers(pool) == 0  # ... nor pooled: held back
            proxy._cancel_done(server)
            assert idle_servers(pool) == 1
            assert await a.fetchval("SELECT 3") == 3
            assert pool.kept
            await a.close()

    run(main())


def test_a_server_due_to_retire_is_not_kept(pg_cluster: PostgresCluster) -> None:
    """server_lifetime (and RECONNECT) act on release: a server past its lifetime goes
    through one at the end of its client's transaction instead of being kept again."""

    async def main() -> None:
        async with running_proxy(pg_cluster, server_lifetime="3600") as proxy:
            a = await client(proxy)
            first = await a.fetchval("SELECT pg_backend_pid()")
            pool = the_pool(proxy)
            (kept,) = pool.kept
            kept.slot.expires_at = 0.0  # type: ignore[attr-defined]  # its lifetime is over
            assert await a.fetchval("SELECT pg_backend_pid()") == first  # still its own
            assert not pool.kept  # ... but not kept: released, and retired
            await until(lambda: pool._core.counters.closed[CloseReason.LIFETIME] >= 1)
            assert await a.fetchval("SELECT pg_backend_pid()") != first
            await a.close()

    run(main())


def test_admin_pause_and_sweep_see_kept_servers_as_idle(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, default_pool_size="3") as proxy:
            a = await client(proxy)
            await a.fetchval("SELECT 1")
            pool = the_pool(proxy)
            assert pool.kept
            admin = await console(proxy)
            row = pool_row(await show(admin, "POOLS"))
            assert (row["sv_active"], row["sv_idle"], row["cl_active"]) == (0, 1, 1)
            assert not pool.kept  # the console's view is PgBouncer's: released

            await a.fetchval("SELECT 1")
            assert pool.kept
            await until(lambda: not pool.kept, timeout=3)  # the sweep, twice a second
            assert idle_servers(pool) == 1

            await a.fetchval("SELECT 1")
            assert pool.kept
            await asyncio.wait_for(admin.execute("PAUSE"), 2)  # nothing to wait for
            query = asyncio.ensure_future(a.fetchval("SELECT 5"))
            await asyncio.sleep(0.2)
            assert not query.done()  # paused: a's kept server did not slip past PAUSE
            await admin.execute("RESUME")
            assert await asyncio.wait_for(query, 10) == 5
            await admin.close()
            await a.close()

    run(main())


def test_reload_applies_affinity_and_pinning_to_running_pools(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    ini = tmp_path / "pgbouncer.ini"

    def write(extra: str) -> None:
        ini.write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={pg_cluster.port} dbname=postgres user=postgres\n"
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 0\nunix_socket_dir =\n"
            f"auth_type = trust\npool_mode = transaction\nfast_lane = 0\n{extra}"
        )

    async def main() -> None:
        write("")
        proxy = Proxy(load_config(ini))
        await proxy.start()
        try:
            a = await client(proxy)
            await a.fetchval("SELECT 1")
            pool = the_pool(proxy)
            assert pool.kept
            assert pool.session_pinning == "pin"
            write("server_affinity = 0\nsession_pinning = reject\n")
            assert proxy.reload()
            assert not pool.affinity
            assert pool.session_pinning == "reject"  # the running pool, not only new ones
            assert not pool.kept
            await a.fetchval("SELECT 1")
            assert not pool.kept
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="session_pinning"):
                await a.execute("CREATE TEMP TABLE t (x int)")
            await a.close()
        finally:
            await proxy.shutdown(timeout=1)

    run(main())
