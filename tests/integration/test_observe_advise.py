"""``millpond advise`` and ``millpond top`` against live loads whose answers are known.

An open-loop generator starts requests at a fixed rate λ; each holds a connection for
``pg_sleep(h)``. So λ and the use time are known in advance, and with them Little's
law (λh busy connections) and the Erlang C size; the advisor must measure them back
through the stats server's URL and tell an undersized pool from a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from typing import Any

import pytest
from rich.console import Console

import millpond
from millpond.observe import advise, advisor, serve, top
from millpond.observe.cli import add_arguments
from millpond.observe.remote import fetch_snapshot
from tests.helpers import run


async def open_loop(pool: millpond.Pool, rate: float, hold: float, seconds: float) -> int:
    """Start ``rate`` requests per second for ``seconds``, each holding a connection."""
    loop = asyncio.get_running_loop()
    start, started = loop.time(), 0
    tasks: set[asyncio.Task[None]] = set()

    async def request() -> None:
        with contextlib.suppress(millpond.PoolTimeout):
            async with pool.acquire() as conn:
                await conn.execute(f"SELECT pg_sleep({hold})")

    while loop.time() < start + seconds:
        due = start + started / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        task = asyncio.create_task(request())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        started += 1
    await asyncio.gather(*tasks)
    return started


async def observe(url: str, seconds: float) -> list[dict[str, Any]]:
    snaps = await asyncio.to_thread(advise.sample, lambda: fetch_snapshot(url), seconds, 0.5)
    return [dict(s) for s in snaps]


async def advise_live(
    pool: millpond.Pool, rate: float, hold: float, seconds: float = 3.0
) -> advise.Advice:
    server = await serve(pool, port=0)
    try:
        load = asyncio.create_task(open_loop(pool, rate, hold, seconds + 1.0))
        await asyncio.sleep(0.5)  # let the load settle
        snaps = await observe(server.url, seconds)
        await load
    finally:
        await server.close()
    (advice,) = advise.analyze(snaps)
    return advice


def test_advise_a_load_whose_answer_is_known(pg_dsn: str) -> None:
    # 100 requests/s holding 20 ms: 2 busy by Little's law; Erlang C (99% under 100 ms)
    # says servers_for_wait(100, 0.02, 0.1) = 3, and 5 connections is not oversized.
    async def main() -> advise.Advice:
        async with millpond.create_pool(pg_dsn, name="known", min_size=5, max_size=5) as pool:
            return await advise_live(pool, rate=100, hold=0.02)

    a = run(main())
    o = a.observation
    assert o.arrival_rate == pytest.approx(100, rel=0.15)
    assert 0.020 <= (o.use_mean or 0) <= 0.040  # 20 ms of pg_sleep plus a round trip
    assert o.busy == pytest.approx(2.0, rel=0.3)
    assert a.verdict == "ok"
    assert a.max_size == advisor.servers_for_wait(o.arrival_rate, o.use_mean or 0, 0.1)
    assert advisor.servers_for_wait(100, 0.02, 0.1) == 3
    assert a.max_size in (3, 4, 5)  # the known answer, give or take the round trip
    assert a.min_size == math.ceil(o.busy)


def test_advise_an_undersized_pool(pg_dsn: str) -> None:
    # 150/s holding 20 ms need 3 busy connections; 2 cannot keep up
    async def main() -> advise.Advice:
        pool = millpond.create_pool(pg_dsn, name="small", min_size=2, max_size=2,
                                    acquire_timeout=0.3)  # fmt: skip
        async with pool:
            return await advise_live(pool, rate=150, hold=0.02)

    a = run(main())
    o = a.observation
    assert o.arrival_rate == pytest.approx(150, rel=0.2)  # not the ~95/s it completes
    assert o.completed_rate < 110
    assert o.full_share >= 0.8
    assert a.verdict == "undersized"
    assert a.max_size >= 4
    assert a.max_size == advisor.servers_for_wait(o.arrival_rate, o.use_mean or 0, 0.1)


def test_advise_a_leak(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 of 6 connections taken and never given back; 20/s of 5 ms need 0.1 connections
    async def main() -> tuple[advise.Advice, int, str]:
        pool = millpond.create_pool(pg_dsn, name="leaky", min_size=1, max_size=6,
                                    leak_threshold=0.5)  # fmt: skip
        async with pool:
            leaked = [await pool.acquire() for _ in range(4)]
            server = await serve(pool, port=0)
            try:
                load = asyncio.create_task(open_loop(pool, 20, 0.005, 4.0))
                await asyncio.sleep(0.5)
                snaps = await observe(server.url, 3.0)
                code = await asyncio.to_thread(
                    cli, "advise", server.url, "--seconds", "1", "--interval", "0.5", "--json"
                )
                out = capsys.readouterr().out
                await load
            finally:
                await server.close()
                for conn in leaked:
                    await pool.release(conn)
        (a,) = advise.analyze(snaps)
        return a, code, out

    a, code, out = run(main())
    assert a.verdict == "leak"
    assert a.observation.in_use_avg >= 4
    assert any("held and not returned" in f for f in a.findings)
    assert code == 0
    (cli_advice,) = json.loads(out)["pools"]
    assert cli_advice["verdict"] == "leak"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="millpond")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_max_connections_from_the_server(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    limit, reserved = run(advise.server_max_connections(pg_dsn))
    assert limit > reserved >= 0

    async def main() -> int:
        async with millpond.create_pool(pg_dsn, name="many", min_size=1, max_size=10) as pool:
            server = await serve(pool, port=0)
            try:
                load = asyncio.create_task(open_loop(pool, 50, 0.002, 2.0))
                code = await asyncio.to_thread(
                    cli, "advise", server.url, "--seconds", "1", "--interval", "0.5",
                    "--instances", "1000", "--dsn", pg_dsn,
                )  # fmt: skip
                await load
                return code
            finally:
                await server.close()

    assert run(main()) == 0
    out = capsys.readouterr().out
    assert f"max_connections {limit} - {reserved} reserved" in out
    assert "configured pool sizes x 1000 instances = 10000 connections" in out


def test_top_against_a_live_pool(pg_dsn: str) -> None:
    async def main() -> str:
        async with millpond.create_pool(pg_dsn, name="watched", min_size=2, max_size=4) as pool:
            server = await serve(pool, port=0)
            try:
                load = asyncio.create_task(open_loop(pool, 100, 0.005, 1.5))
                console = Console(record=True, width=120, color_system=None)
                code = await asyncio.to_thread(
                    top.run, server.url, interval=0.5, once=True, console=console
                )
                await load
                assert code == 0
                return console.export_text()
            finally:
                await server.close()

    text = run(main())
    assert "millpond top  app" in text
    row = next(line for line in text.splitlines() if line.startswith("watched"))
    cells = row.split()
    assert cells[0:2] == ["watched", "primary"]
    assert cells[4] == "4/4" or cells[4].endswith("/4")
    assert 40 <= float(cells[6].replace(",", "")) <= 160  # ~100 acquires/s
