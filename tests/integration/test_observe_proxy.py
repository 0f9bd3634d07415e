"""The proxy's stats server: /metrics, /readyz and /api/snapshot under a known load."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from millpond.observe import StatsServer, start_stats_server
from millpond.observe.logs import start_stats_logger
from millpond.proxy.config import config_from_args
from millpond.proxy.server import Proxy
from tests.helpers import run
from tests.integration.test_observe_pool import http_get, one, scrape

KEY = {"database": "postgres", "user": "postgres"}


@asynccontextmanager
async def observed_proxy(
    pg_cluster: PostgresCluster, **overrides: Any
) -> AsyncIterator[tuple[Proxy, StatsServer]]:
    settings: dict[str, Any] = {
        "auth_type": "trust",
        "unix_socket_dir": "",
        "pool_mode": "transaction",
        "stats_listen_addr": "127.0.0.1",
        "stats_listen_port": 0,
        "admin_users": "postgres",
    }
    settings.update(overrides)
    cfg = config_from_args("127.0.0.1:0", pg_cluster.dsn(), **settings)
    proxy = Proxy(cfg)
    await proxy.start()
    # Proxy.start() starts it once wired in (proxy.stats_server); until then, start it here
    wired = getattr(proxy, "stats_server", None)
    stats = wired if isinstance(wired, StatsServer) else await start_stats_server(proxy)
    try:
        yield proxy, stats
    finally:
        if proxy.shutting_down is None:
            await proxy.shutdown(timeout=1)
        await stats.close()


async def client(proxy: Proxy) -> asyncpg.Connection:
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    return await asyncpg.connect(url, statement_cache_size=0)


async def in_transaction(conns: list[asyncpg.Connection]) -> None:
    for conn in conns:
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT 1")


def test_proxy_metrics_under_a_known_load(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with observed_proxy(pg_cluster, default_pool_size=3) as (proxy, stats):
            assert stats.listening
            busy = [await client(proxy) for _ in range(3)]
            await in_transaction(busy)  # 3 server connections held, the whole pool
            idle = await client(proxy)  # logged in, no transaction
            blocked = [await client(proxy) for _ in range(2)]
            queries = [asyncio.create_task(c.fetchval("SELECT 7")) for c in blocked]
            await asyncio.sleep(0.2)
            text = await scrape(stats.url)
            assert one(text, "millpond_proxy_clients", state="active", **KEY) == 3
            assert one(text, "millpond_proxy_clients", state="waiting", **KEY) == 2
            assert one(text, "millpond_proxy_clients", state="idle", **KEY) == 1
            assert one(text, "db_client_connection_count", state="used", **KEY) == 3
            assert one(text, "db_client_connection_pending_requests", **KEY) == 2
            assert one(text, "db_client_connection_max", **KEY) == 3
            assert one(text, "millpond_proxy_servers", state="active", **KEY) == 3
            assert one(text, "millpond_proxy_client_connections", state="waiting") == 2
            assert one(text, "millpond_proxy_max_wait_seconds", **KEY) >= 0.15
            assert one(text, "millpond_proxy_pinned_clients") == 0
            assert one(text, "millpond_proxy_shutting_down") == 0
            assert one(text, "millpond_info", kind="proxy") == 1
            for conn in busy:
                await conn.execute("COMMIT")
            assert await asyncio.gather(*queries) == [7, 7]
            before = await scrape(stats.url)
            xacts = one(before, "millpond_proxy_transactions_total", **KEY)
            queries_before = one(before, "millpond_proxy_queries_total", **KEY)
            sent = one(before, "millpond_proxy_sent_bytes_total", **KEY)
            for i in range(20):
                assert await idle.fetchval(f"SELECT {i}") == i
            after = await scrape(stats.url)
            assert one(after, "millpond_proxy_transactions_total", **KEY) == xacts + 20
            assert one(after, "millpond_proxy_queries_total", **KEY) == queries_before + 20
            assert one(after, "millpond_proxy_sent_bytes_total", **KEY) > sent
            assert one(after, "millpond_proxy_received_bytes_total", **KEY) > 0
            acquires = one(after, "millpond_pool_acquires_total", **KEY)
            assert one(after, "db_client_connection_wait_time_seconds_count", **KEY) == acquires
            assert one(after, "db_client_connection_count", state="used", **KEY) == 0
            assert one(after, "millpond_proxy_logins_total") == 6
            await idle.execute("CREATE TEMP TABLE scratch (x int)")  # pins it to its server
            pinned = await scrape(stats.url)
            assert one(pinned, "millpond_proxy_pinned_clients", **KEY) == 1
            assert one(pinned, "db_client_connection_count", state="used", **KEY) == 1
            _, _, body = await http_get(stats.url + "/api/snapshot")
            assert json.loads(body)["proxy"]["pinned"] == 1
            for conn in [*busy, idle, *blocked]:
                await conn.close()

    run(main())


def test_snapshot_and_console_clients(pg_cluster: PostgresCluster) -> None:
    async def main() -> dict[str, Any]:
        async with observed_proxy(pg_cluster, default_pool_size=2, min_pool_size=1) as (
            proxy,
            stats,
        ):
            conn = await client(proxy)
            await conn.fetchval("SELECT 1")
            console = await psycopg.AsyncConnection.connect(
                host="127.0.0.1", port=proxy.port, dbname="pgbouncer", user="postgres",
                autocommit=True,
            )  # fmt: skip
            status, _, body = await http_get(stats.url + "/api/snapshot?history=0")
            assert status == 200
            await console.close()
            await conn.close()
            return dict(json.loads(body))

    data = run(main())
    assert data["kind"] == "proxy"
    (pool,) = data["pools"]
    assert pool["name"] == "postgres/postgres"
    assert pool["labels"]["host"].endswith(f":{pg_cluster.port}")
    assert pool["proxy"]["mode"] == "transaction"
    assert pool["settings"]["max_size"] == 2
    assert pool["settings"]["pool_mode"] == "transaction"
    assert data["proxy"]["clients"]["admin"] == 1
    assert data["proxy"]["clients"]["idle"] == 1
    assert data["proxy"]["settings"]["default_pool_size"] == 2
    assert data["health"]["ready"] is True
    assert data["history"]["points"]


def test_readable_during_graceful_shutdown(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with observed_proxy(pg_cluster) as (proxy, stats):
            conn = await client(proxy)
            await in_transaction([conn])
            stopping = asyncio.create_task(proxy.shutdown("safe"))
            await asyncio.sleep(0.2)
            assert not stopping.done()  # "safe" waits for the open transaction
            status, _, body = await http_get(stats.url + "/healthz")
            assert status == 200
            assert body.startswith(b"ok (shutting down: safe)")
            status, _, body = await http_get(stats.url + "/readyz")
            assert status == 503
            assert b"- proxy is shutting down (safe)" in body
            text = await scrape(stats.url)
            assert one(text, "millpond_proxy_shutting_down") == 1
            assert one(text, "millpond_proxy_clients", state="active", **KEY) == 1
            await conn.execute("COMMIT")
            await stopping

    run(main())


def test_log_stats_line_per_pool(
    pg_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with observed_proxy(pg_cluster) as (proxy, _):
            conn = await client(proxy)
            await conn.fetchval("SELECT 1")  # the pool exists before the first sample
            stats = start_stats_logger(proxy)
            assert stats is not None
            assert stats.period == 60  # stats_period
            try:
                for i in range(30):
                    await conn.fetchval(f"SELECT {i}")
                await conn.close()
                with caplog.at_level(logging.INFO, logger="millpond.stats"):
                    stats.tick()
            finally:
                await stats.stop()
        async with observed_proxy(pg_cluster, log_stats=False) as (proxy, _):
            assert start_stats_logger(proxy) is None

    run(main())
    (line,) = [r for r in caplog.records if r.name == "millpond.stats"]
    assert line.getMessage().startswith("stats: postgres/postgres ")
    assert " xacts/s, " in line.getMessage()
    assert line.xact_rate > 0  # type: ignore[attr-defined]


def test_no_stats_port_means_no_listener(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        cfg = config_from_args("127.0.0.1:0", pg_cluster.dsn(), auth_type="trust",
                               unix_socket_dir="")  # fmt: skip
        proxy = Proxy(cfg)
        await proxy.start()
        stats = await start_stats_server(proxy)
        assert not stats.listening
        assert not getattr(proxy, "stats_server", stats).listening
        await stats.close()
        await proxy.shutdown(timeout=1)

    run(main())
