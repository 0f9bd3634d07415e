"""The live dashboard in headless Chromium: it loads, shows a known load's numbers, updates.

A proxy runs in this process with its stats server; asyncpg clients put a known load on
it (connections held in open transactions, clients queued behind them). Chromium loads
the page with a virtual-time budget (the page polls ``/api/snapshot`` every second), and
the test reads the numbers from the DOM it dumps. Chromium is installed if missing
(apt-get, as root) or the test fails saying how to get it; it never skips.

Run as a script to take the screenshot reproduced in docs/observability.md::

    .venv/bin/python -m tests.e2e.test_dashboard --screenshot docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import millpond
from millpond.embedded import PostgresCluster
from millpond.observe import StatsServer, serve, start_stats_server
from millpond.proxy.config import config_from_args
from millpond.proxy.server import Proxy
from tests.helpers import run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
POOL = "postgres/postgres"


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary, installed with apt-get when missing and running as root."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(
            "the dashboard test needs headless Chromium: run `apt-get install -y chromium` "
            "as root (or put chromium on PATH); .ci/run installs it"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900, check=False)
    result = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
        env=env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    found = find_chromium()
    if not found:
        pytest.fail(f"could not install chromium with apt-get:\n{result.stderr[-3000:]}")
    return found


async def browse(chromium: str, url: str, *args: str, budget_ms: int = 5000) -> str:
    """Run headless Chromium on ``url`` (``--dump-dom`` or ``--screenshot``); its stdout."""
    with tempfile.TemporaryDirectory(prefix="millpond-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            *args, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(120):
            out, err = await process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"chromium exited {process.returncode}: {err.decode()[-2000:]}")
    return out.decode()


class Page(HTMLParser):
    """What the dashboard shows: table cells by pool and field, ids, legends, settings."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self.legend: dict[str, str] = {}
        self.settings: dict[str, str] = {}
        self.canvases: list[str] = []
        self._stack: list[tuple[str, dict[str, str | None]]] = []
        self._row: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-pool"):
            self._row = a["data-pool"]
            self.cells[self._row or ""] = {}
        if tag == "canvas":
            self.canvases.append(a.get("id") or "")
        self._stack.append((tag, a))

    def handle_data(self, data: str) -> None:
        for _, a in self._stack:
            a["_text"] = (a.get("_text") or "") + data

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            name, a = self._stack.pop()
            text = (a.get("_text") or "").strip()
            if a.get("id"):
                self.ids[a["id"] or ""] = text
            if self._row is not None and a.get("data-field"):
                self.cells[self._row][a["data-field"] or ""] = text
            if a.get("data-series"):
                self.legend[a["data-series"] or ""] = text
            if a.get("data-setting"):
                self.settings[a["data-setting"] or ""] = text
            if name == "tr":
                self._row = None
            if name == tag:
                break


def number(text: str) -> float:
    return float(text.replace(",", ""))


@asynccontextmanager
async def proxy_with_stats(
    pg_cluster: PostgresCluster, **overrides: Any
) -> AsyncIterator[tuple[Proxy, StatsServer]]:
    settings: dict[str, Any] = {
        "auth_type": "trust", "unix_socket_dir": "", "pool_mode": "transaction",
        "stats_listen_addr": "127.0.0.1", "stats_listen_port": 0,
    }  # fmt: skip
    settings.update(overrides)
    proxy = Proxy(config_from_args("127.0.0.1:0", pg_cluster.dsn(), **settings))
    await proxy.start()
    wired = getattr(proxy, "stats_server", None)  # once Proxy.start() starts it
    stats = wired if isinstance(wired, StatsServer) else await start_stats_server(proxy)
    try:
        yield proxy, stats
    finally:
        await proxy.shutdown(timeout=1)
        await stats.close()


async def client(proxy: Proxy, db: str = "postgres") -> asyncpg.Connection:
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{db}"
    return await asyncpg.connect(url, statement_cache_size=0)


def test_dashboard_shows_a_known_load_and_updates(
    pg_cluster: PostgresCluster, chromium: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with proxy_with_stats(pg_cluster, default_pool_size=4) as (proxy, stats):
            busy = [await client(proxy) for _ in range(4)]
            for conn in busy:  # the whole pool held in open transactions
                await conn.execute("BEGIN")
                await conn.fetchval("SELECT 1")
            queued = [await client(proxy) for _ in range(2)]
            waits = [asyncio.create_task(c.fetchval("SELECT 1")) for c in queued]
            await asyncio.sleep(0.2)
            pool = proxy.pools[("postgres", "postgres")]
            acquires = pool.stats().acquires
            # The charts draw the sampler's history (one point a second): take this
            # load's point now rather than race the sampler's next tick.
            stats._sample()

            first = Page(await browse(chromium, stats.url + "/", "--dump-dom"))
            row = first.cells[POOL]
            assert row["in_use"] == "4"
            assert row["waiting"] == "2"
            assert row["size"] == "4 / 4"
            assert row["clients"] == "4 / 0 / 2"  # active / idle / waiting
            assert row["mode"] == "transaction"
            assert number(row["acquires"]) == acquires
            assert first.ids["kind"] == "proxy"
            assert first.ids["card-in_use"] == "4"
            assert first.ids["card-waiting"] == "2"
            assert first.ids["ready"] == "ready"
            assert first.ids["clients-total"] == "6"
            assert first.legend["in_use"].endswith("4")  # the chart's latest point
            assert first.legend["waiting"].endswith("2")
            assert first.canvases == [
                "chart-connections", "chart-waiting", "chart-throughput", "chart-wait",
            ]  # fmt: skip
            assert first.settings["pool_mode"] == "transaction"  # one pool: its settings

            for conn in busy:
                await conn.execute("COMMIT")
            await asyncio.gather(*waits)
            for i in range(25):
                await busy[i % 4].fetchval("SELECT 1")
            second = Page(await browse(chromium, stats.url + "/", "--dump-dom"))
            row2 = second.cells[POOL]
            assert number(row2["acquires"]) >= number(row["acquires"]) + 25 + 2
            assert row2["in_use"] == "0"
            assert row2["waiting"] == "0"
            assert second.ids["card-acquires"] != first.ids["card-acquires"]

            shot = tmp_path / "dashboard.png"
            await browse(chromium, stats.url + "/", f"--screenshot={shot}",
                         "--window-size=1280,900")  # fmt: skip
            width, height = png_size(shot)
            assert (width, height) == (1280, 900)
            assert shot.stat().st_size > 20_000  # drawn, not blank
            for conn in [*busy, *queued]:
                await conn.close()

    run(main(), timeout=300)


def test_dashboard_for_an_application_pool(chromium: str) -> None:
    async def main() -> None:
        async with millpond.create_pool(driver="memory", name="orders", max_size=3) as pool:
            server = await serve({"primary": pool}, port=0)
            try:
                held = [await pool.acquire() for _ in range(2)]
                page = Page(await browse(chromium, server.url + "/", "--dump-dom"))
                row = page.cells["orders"]
                assert (row["in_use"], row["size"], row["where"]) == ("2", "2 / 3", "primary")
                assert "clients" not in page.ids.get("kind", "")
                assert page.ids["kind"] == "application"
                assert page.settings["max_size"] == "3"
                for conn in held:
                    await pool.release(conn)
            finally:
                await server.close()

    run(main(), timeout=180)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --------------------------------------------------------------------------- screenshot


async def demo_load(proxy: Proxy, seconds: float) -> None:
    """A day-in-the-life load: two databases, bursts, a queue now and then."""
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds

    async def web(k: int) -> None:
        conn = await client(proxy)
        while loop.time() < stop:
            wave = 0.5 + 0.5 * math.sin(loop.time() / 9 + k / 7)
            await conn.execute(f"SELECT pg_sleep({random.expovariate(1 / 0.012):.4f})")
            await asyncio.sleep(random.expovariate(1 / (0.004 + 0.06 * (1 - wave))))
        await conn.close()

    async def reports() -> None:
        conn = await client(proxy, "template1")
        while loop.time() < stop:
            async with conn.transaction():
                await conn.fetchval("SELECT count(*) FROM pg_class")
                await conn.execute("SELECT pg_sleep(0.04)")
            await asyncio.sleep(0.03)
        await conn.close()

    await asyncio.gather(*(web(k) for k in range(24)), *(reports() for _ in range(3)))


async def screenshot(path: str, seconds: float) -> None:
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium not found")
    with PostgresCluster() as cluster:
        cluster.start()
        async with proxy_with_stats(cluster, default_pool_size=8, min_pool_size=2) as (
            proxy,
            stats,
        ):
            load = asyncio.create_task(demo_load(proxy, seconds + 10))
            await asyncio.sleep(seconds)
            await browse(chromium, stats.url + "/", f"--screenshot={path}",
                         "--window-size=1280,900", budget_ms=3000)  # fmt: skip
            await load


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--screenshot", type=Path, default=Path("docs/img/dashboard.png"))
    cli.add_argument("--seconds", type=float, default=75.0, help="load before the screenshot")
    options = cli.parse_args()
    options.screenshot.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(screenshot(str(options.screenshot.resolve()), options.seconds))
    print(f"wrote {options.screenshot} ({options.screenshot.stat().st_size:,} bytes)")
