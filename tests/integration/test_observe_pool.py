"""A library pool on real PostgreSQL, observed over HTTP: /metrics under a known load."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import millpond
from millpond.observe import serve
from tests.helpers import run


async def http_get(url: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
    """GET over a plain asyncio connection (the event loop keeps serving meanwhile)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    headers = f"Accept: {accept}\r\n" if accept else ""
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\n{headers}\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, body


def metric_values(text: str, name: str, **labels: str) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def scrape(url: str) -> str:
    status, fields, body = await http_get(url + "/metrics")
    assert status == 200
    assert fields["Content-Type"].startswith("text/plain")
    return body.decode()


def one(text: str, name: str, **labels: str) -> float:
    (value,) = metric_values(text, name, **labels)
    return value


async def hold_all(pool: millpond.Pool, n: int) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    """``n`` tasks each holding a connection until the returned event is set."""
    release, all_in = asyncio.Event(), asyncio.Event()
    held: list[int] = []

    async def hold() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            held.append(1)
            if len(held) == n:
                all_in.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(n)]
    await all_in.wait()
    return release, tasks


def test_metrics_under_a_known_load(pg_dsn: str) -> None:
    async def main() -> None:
        pool = millpond.create_pool(pg_dsn, name="app", min_size=2, max_size=4)
        async with pool:
            server = await serve(pool, port=0)
            try:
                release, holders = await hold_all(pool, 4)
                waiters = [asyncio.create_task(pool.fetchval("SELECT 2")) for _ in range(3)]
                await asyncio.sleep(0.05)
                text = await scrape(server.url)
                assert one(text, "db_client_connection_count", state="used") == 4
                assert one(text, "db_client_connection_count", state="idle") == 0
                assert one(text, "db_client_connection_pending_requests") == 3
                assert one(text, "millpond_pool_size", pool_name="app") == 4
                assert one(text, "millpond_pool_oldest_lease_seconds") > 0.04
                release.set()
                await asyncio.gather(*holders)
                assert await asyncio.gather(*waiters) == [2, 2, 2]
                for _ in range(50):
                    await pool.fetchval("SELECT 1")
                text = await scrape(server.url)
                stats = pool.stats()
                acquires = one(text, "millpond_pool_acquires_total")
                assert acquires == stats.acquires == 4 + 3 + 50
                assert one(text, "db_client_connection_wait_time_seconds_count") == acquires
                assert one(text, "db_client_connection_use_time_seconds_count") == acquires
                assert one(text, "db_client_connection_pending_requests") == 0
                assert one(text, "millpond_pool_waits_total") == stats.waits >= 3
                # the three waiters waited at least the 50 ms the holders kept everything
                assert one(text, "db_client_connection_wait_time_seconds_sum") >= 3 * 0.05
                assert one(text, "db_client_connection_timeouts_total") == 0
                assert one(text, "millpond_pool_connect_errors_total") == 0
                status, _, body = await http_get(server.url + "/api/snapshot")
                (snap,) = json.loads(body)["pools"]
                assert (snap["acquires"], snap["in_use"], snap["size"]) == (57, 0, 4)
                assert snap["labels"]["database"] == "postgres"
                status, _, body = await http_get(server.url + "/readyz")
                assert (status, body.split(b"\n")[0]) == (200, b"ready")
            finally:
                await server.close()

    run(main())


def test_readiness_follows_the_pool(pg_dsn: str) -> None:
    async def main() -> tuple[Any, ...]:
        pool = await millpond.create_pool(pg_dsn, name="ready", min_size=2, max_size=3)
        server = await serve(pool, port=0)
        try:
            ready = await http_get(server.url + "/readyz")
            await pool.close()
            closed = await http_get(server.url + "/readyz?format=json")
            alive = await http_get(server.url + "/healthz")
            return ready, closed, alive
        finally:
            await server.close()

    ready, closed, alive = run(main())
    assert ready[0] == 200
    assert closed[0] == 503
    assert json.loads(closed[2])["reasons"] == ["pool ready: 0 of min_size 2 connections open"]
    assert alive[0] == 200  # the process still works


def test_unreachable_database_is_not_ready(pg_cluster: Any) -> None:
    async def main() -> tuple[int, str]:
        dsn = f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/no_such_database"
        pool = millpond.create_pool(
            dsn, name="nodb", min_size=1, breaker_threshold=2, reconnect_delay=0.01
        )
        await pool.open(wait=False)
        server = await serve(pool, port=0)
        try:
            for _ in range(300):
                if pool.stats().breaker_state == "open":
                    break
                await asyncio.sleep(0.01)
            status, _, body = await http_get(server.url + "/readyz")
            text = await scrape(server.url)
            assert one(text, "millpond_pool_breaker_state", state="open") == 1
            assert one(text, "millpond_pool_connect_errors_total") >= 2
            return status, body.decode()
        finally:
            await server.close()
            await pool.close()

    status, body = run(main())
    assert status == 503
    assert "pool nodb: database unreachable (circuit breaker open" in body


async def raw(url: str, request: bytes) -> bytes:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    data = await reader.read()
    writer.close()
    return data


def test_http_edge_cases() -> None:
    async def main() -> None:
        async with millpond.create_pool(driver="memory", name="edge") as pool:
            async with await serve(pool, port=0) as server:
                head = await raw(server.url, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert length > 1000
                assert head.endswith(b"\r\n\r\n")  # no body
                post = await raw(server.url, b"POST /metrics HTTP/1.1\r\n\r\n")
                assert post.startswith(b"HTTP/1.1 405 ")
                assert b"Allow: GET, HEAD" in post
                bad = await raw(server.url, b"hello\r\n\r\n")
                assert bad.startswith(b"HTTP/1.1 400 ")
                huge = await raw(server.url, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
                assert huge == b""  # request head over 16 kB: dropped
                status, fields, body = await http_get(
                    server.url + "/metrics", "application/openmetrics-text; version=1.0.0"
                )
                assert status == 200
                assert fields["Content-Type"].startswith("application/openmetrics-text")
                assert body.endswith(b"# EOF\n")
                assert (await http_get(server.url + "/nope"))[0] == 404
            assert not server.listening

    run(main())
