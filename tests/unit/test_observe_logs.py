"""Periodic statistics lines and the JSON log formatter (memory driver)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

import millpond
from millpond.observe.logs import JsonFormatter, StatsLogger, configure
from millpond.observe.snapshot import pools_source
from tests.helpers import run


def test_stats_line_and_slow_acquire_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with millpond.create_pool(
            driver="memory", name="jobs", min_size=1, max_size=1
        ) as pool:
            stats = StatsLogger(pools_source(pool), period=60, slow_acquire=0.05)
            stats.start()
            try:
                conn = await pool.acquire()
                waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
                await asyncio.sleep(0.12)  # the waiter waits over 50 ms
                await pool.release(conn)
                await waiter
                with caplog.at_level(logging.INFO, logger="millpond.stats"):
                    stats.tick()  # what the janitor runs every period
            finally:
                await stats.stop()

    run(main())
    info, warning = caplog.records
    assert info.getMessage().startswith("stats: pool 'jobs' ")
    assert "in use 0/1, waiting 0" in info.getMessage()
    assert info.pool == "jobs"  # type: ignore[attr-defined]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        "pool 'jobs': 1 slow acquires (waited over 50 ms) and 0 timeouts in the last 60 s"
    )
    assert warning.slow_acquires == 1  # type: ignore[attr-defined]


def test_json_lines() -> None:
    stream = io.StringIO()
    level = logging.getLogger("millpond").level
    handler = configure(json=True, stream=stream)
    try:
        logging.getLogger("millpond.proxy").warning(
            "login failed: %s", "bob", extra={"client": "10.0.0.1"}
        )
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("millpond.pool").exception("reset failed")
    finally:
        logging.getLogger("millpond").removeHandler(handler)
        logging.getLogger("millpond").setLevel(level)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{")
    assert first["message"] == "login failed: bob"
    assert first["level"] == "warning"
    assert first["logger"] == "millpond.proxy"
    assert first["client"] == "10.0.0.1"
    assert first["time"].endswith("Z")
    assert "ValueError: boom" in second["exception"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
