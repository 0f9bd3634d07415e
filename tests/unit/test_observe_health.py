"""Readiness of library pools, and the stats server's responses (memory driver, no sockets)."""

from __future__ import annotations

import asyncio
import json
import re

import millpond
from millpond.observe import StatsServer, health
from millpond.observe.snapshot import pools_source
from tests.helpers import run


def test_ready_pool_and_text() -> None:
    async def main() -> None:
        async with millpond.create_pool(driver="memory", name="main", min_size=2) as pool:
            report = health(pool)
            assert report.ready
            assert bool(report)
            assert report.status_code == 200
            assert report.reasons == ()
            assert report.text().startswith("ready\n")
            assert "pool main: ok, 2 connections (min 2, max 10), breaker closed" in report.text()
            assert report.to_dict()["pools"][0]["size"] == 2

    run(main())


def test_closed_and_warming_pools_are_not_ready() -> None:
    async def main() -> None:
        pool = await millpond.create_pool(driver="memory", name="gone", min_size=1)
        await pool.close()
        report = health(pool)
        assert not report.ready
        assert report.status_code == 503
        assert report.reasons == ("pool gone: 0 of min_size 1 connections open",)

        slow = millpond.create_pool(
            driver="memory", name="slow", min_size=3, connect_kwargs={"connect_delay": 0.2}
        )
        await slow.open(wait=False)
        try:
            report = health({"primary": slow})
            assert not report.ready
            assert report.reasons == ("pool slow: 0 of min_size 3 connections open",)
            await slow.open()
            assert health(slow).ready
        finally:
            await slow.close()

    run(main())


def test_unreachable_database_opens_the_breaker_and_says_so() -> None:
    async def main() -> None:
        pool = millpond.create_pool(
            driver="memory",
            name="down",
            min_size=1,
            breaker_threshold=2,
            reconnect_delay=0.01,
            reconnect_delay_max=0.02,
        )
        pool.driver.down = True  # type: ignore[attr-defined]
        await pool.open(wait=False)
        try:
            for _ in range(200):
                if pool.stats().breaker_state == "open":
                    break
                await asyncio.sleep(0.01)
            report = health([pool])
            assert not report.ready
            assert re.match(
                r"pool down: database unreachable \(circuit breaker open; \d+ failed",
                report.reasons[0],
            )
        finally:
            await pool.close()

    run(main())


def test_responses_without_a_socket() -> None:
    async def main() -> None:
        async with millpond.create_pool(driver="memory", name="web", min_size=1) as pool:
            server = StatsServer(pools_source(pool))
            server._sample()
            r = server.respond("/healthz")
            assert (r.status, r.body.split(b"\n")[0]) == (200, b"ok")
            r = server.respond("/readyz")
            assert (r.status, r.body) == (200, health(pool).text().encode())
            r = server.respond("/readyz?format=json")
            assert json.loads(r.body)["ready"] is True
            r = server.respond("/metrics")
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b'millpond_pool_size{database="",host="",pool_name="web"' in r.body
            r = server.respond("/metrics", "application/openmetrics-text; version=1.0.0")
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.body.endswith(b"# EOF\n")
            r = server.respond("/api/snapshot?history=0")
            data = json.loads(r.body)
            assert data["kind"] == "app"
            assert data["pools"][0]["name"] == "web"
            assert data["health"]["ready"] is True
            assert data["history"]["seq"] == 1
            assert len(data["history"]["points"]) == 1
            assert "history" not in json.loads(server.respond("/api/snapshot").body)
            assert server.respond("/api/snapshot?history=x").status == 400
            for path, kind in (("/", b"<!doctype html>"), ("/app.js", b'"use strict"')):
                r = server.respond(path)
                assert r.status == 200
                assert kind in r.body[:200]
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert server.respond("/nope").status == 404
        await pool.close()
        r = server.respond("/readyz")
        assert r.status == 503
        assert r.body.startswith(b"not ready\n- pool web: 0 of min_size 1")

    run(main())
