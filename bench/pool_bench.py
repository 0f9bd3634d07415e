"""Queries per second of ``SELECT 1`` through millpond and its peers, side by side.

Run:  python bench/pool_bench.py [--quick] [--duration S] [--only NAME[,NAME]] [--json PATH]

Uses $DATABASE_URL if set, else starts a throwaway PostgreSQL
(:class:`millpond.embedded.PostgresCluster`) for the run. Every case runs in this one
process on one uvloop event loop. A case opens its pool, starts its tasks (each one
loops: borrow, ``SELECT 1``, give back), lets them warm up, counts the queries that
complete during the measured window, then closes its pool. Cases run interleaved
(A B C ... A B C ...) and each reports the median of its repeats. See
docs/benchmarks.md for what is measured and why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from psycopg_pool import AsyncConnectionPool

import millpond
from _common import (
    Run,
    Worker,
    load_average,
    machine,
    median,
    run_uvloop,
    spread,
    table,
    verdict,
)

SQL = "SELECT 1"
PACKAGES = ("millpond", "asyncpg", "psycopg", "psycopg-binary", "psycopg-pool", "uvloop")

#: (tasks, connections) per workload
WORKLOADS = {"200x20": (200, 20), "64x8": (64, 8)}

#: (numerator, denominator, target): the ratios of queries per second we aim at
TARGETS = (
    ("millpond-asyncpg", "asyncpg-pool", 2.5),
    ("millpond-asyncpg", "raw-queue", 0.9),
    ("millpond-psycopg", "psycopg_pool", 1.5),
    ("millpond-psycopg", "psycopg_pool-autocommit", 1.5),
)

#: the connection-per-request case runs at most this long and this many tasks at once,
#: so it cannot exhaust max_connections (closed backends take a moment to exit)
PER_REQUEST_MAX_SECONDS = 1.0


Opener = Callable[[str, int], contextlib.AbstractAsyncContextManager[Worker]]


# -- the cases ----------------------------------------------------------------------
# Each opener starts its pool with `conns` connections and yields the worker coroutine
# function each task runs; leaving the context closes the pool.


@contextlib.asynccontextmanager
async def _millpond(dsn: str, conns: int, driver: str) -> AsyncIterator[Worker]:
    pool = await millpond.create_pool(dsn, driver=driver, min_size=conns, max_size=conns)

    async def worker(run: Run) -> None:
        fetchval = pool.fetchval
        while run.on:
            await fetchval(SQL)
            run.done += 1

    try:
        yield worker
    finally:
        await pool.close()


def millpond_asyncpg(dsn: str, conns: int) -> contextlib.AbstractAsyncContextManager[Worker]:
    return _millpond(dsn, conns, "asyncpg")


def millpond_psycopg(dsn: str, conns: int) -> contextlib.AbstractAsyncContextManager[Worker]:
    return _millpond(dsn, conns, "psycopg")


@contextlib.asynccontextmanager
async def asyncpg_pool(dsn: str, conns: int) -> AsyncIterator[Worker]:
    pool = await asyncpg.create_pool(dsn, min_size=conns, max_size=conns)

    async def worker(run: Run) -> None:
        fetchval = pool.fetchval
        while run.on:
            await fetchval(SQL)
            run.done += 1

    try:
        yield worker
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _psycopg_pool(dsn: str, conns: int, kwargs: dict[str, Any]) -> AsyncIterator[Worker]:
    # As psycopg_pool's docs show; defaults apart from the size (max_size = min_size).
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=conns, kwargs=kwargs or None, open=False
    )
    await pool.open(wait=True, timeout=60)

    async def worker(run: Run) -> None:
        while run.on:
            async with pool.connection() as conn:
                cur = await conn.execute(SQL)
                await cur.fetchone()
            run.done += 1

    try:
        yield worker
    finally:
        await pool.close()


def psycopg_pool_default(dsn: str, conns: int) -> contextlib.AbstractAsyncContextManager[Worker]:
    return _psycopg_pool(dsn, conns, {})


def psycopg_pool_autocommit(dsn: str, conns: int) -> contextlib.AbstractAsyncContextManager[Worker]:
    return _psycopg_pool(dsn, conns, {"autocommit": True})


@contextlib.asynccontextmanager
async def raw_queue(dsn: str, conns: int) -> AsyncIterator[Worker]:
    """The floor: an asyncio.Queue of asyncpg connections, no checks, no reset."""
    opened = await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(conns)))
    queue: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for conn in opened:
        queue.put_nowait(conn)

    async def worker(run: Run) -> None:
        while run.on:
            conn = await queue.get()
            try:
                await conn.fetchval(SQL)
            finally:
                queue.put_nowait(conn)
            run.done += 1

    try:
        yield worker
    finally:
        await asyncio.gather(*(conn.close() for conn in opened))


@contextlib.asynccontextmanager
async def per_request(dsn: str, conns: int) -> AsyncIterator[Worker]:
    """No pool: connect, query, close, every time."""

    async def worker(run: Run) -> None:
        while run.on:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.fetchval(SQL)
            finally:
                await conn.close()
            run.done += 1

    yield worker


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    open: Opener
    capped: bool = False  # at most `conns` tasks and PER_REQUEST_MAX_SECONDS


CASES = (
    Case("millpond-asyncpg", "millpond over asyncpg: pool.fetchval", millpond_asyncpg),
    Case("asyncpg-pool", "asyncpg.create_pool: pool.fetchval", asyncpg_pool),
    Case("millpond-psycopg", "millpond over psycopg: pool.fetchval", millpond_psycopg),
    Case(
        "psycopg_pool",
        "AsyncConnectionPool defaults: async with pool.connection()",
        psycopg_pool_default,
    ),
    Case(
        "psycopg_pool-autocommit",
        'the same with kwargs={"autocommit": True}',
        psycopg_pool_autocommit,
    ),
    Case("raw-queue", "asyncio.Queue of asyncpg connections (floor)", raw_queue),
    Case(
        "per-request",
        "asyncpg.connect/close per query, no pool",
        per_request,
        capped=True,
    ),
)


# -- measuring ----------------------------------------------------------------------


def _raise_if_failed(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def measure(
    case: Case, dsn: str, tasks: int, conns: int, warmup: float, duration: float
) -> tuple[float, float]:
    """Queries per second, and this process's CPU microseconds per query."""
    if case.capped:
        tasks = min(tasks, conns)
        duration = min(duration, PER_REQUEST_MAX_SECONDS)
    gc.collect()
    async with case.open(dsn, conns) as worker:
        run = Run()
        running = [asyncio.create_task(worker(run)) for _ in range(tasks)]
        try:
            await asyncio.sleep(warmup)
            _raise_if_failed(running)
            start_count, start, start_cpu = run.done, time.perf_counter(), time.process_time()
            await asyncio.sleep(duration)
            end_count, end, end_cpu = run.done, time.perf_counter(), time.process_time()
            _raise_if_failed(running)
        finally:
            run.on = False
            _, pending = await asyncio.wait(running, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    queries = max(1, end_count - start_count)
    return queries / (end - start), (end_cpu - start_cpu) / queries * 1e6


@dataclass
class Result:
    case: str
    workload: str
    runs: list[float]
    cpu: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def qps(self) -> float:
        return median(self.runs)


async def bench(
    dsn: str, cases: Sequence[Case], repeats: int, warmup: float, duration: float
) -> list[Result]:
    results: list[Result] = []
    for workload, (tasks, conns) in WORKLOADS.items():
        row = {case.name: Result(case.name, workload, []) for case in cases}
        for repeat in range(repeats):
            for case in cases:  # interleaved: A B C ... A B C ...
                result = row[case.name]
                if result.error is not None:
                    continue
                try:
                    qps, cpu = await measure(case, dsn, tasks, conns, warmup, duration)
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    print(f"  {workload} {case.name}: FAILED {result.error}", file=sys.stderr)
                    continue
                result.runs.append(qps)
                result.cpu.append(cpu)
                print(
                    f"  {workload} round {repeat + 1}/{repeats} {case.name:<24} {qps:>9,.0f} qps"
                    f" {cpu:6.1f} us CPU/query",
                    file=sys.stderr,
                    flush=True,
                )
        results.extend(row.values())
    return results


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """qps ratios against the targets, plus the same comparison on client CPU per query
    (peer's CPU / millpond's), which other load on the machine disturbs less."""
    by_key = {(r.case, r.workload): r for r in results if r.runs}
    out = []
    for workload in WORKLOADS:
        for top, bottom, target in TARGETS:
            mine, theirs = by_key.get((top, workload)), by_key.get((bottom, workload))
            if mine is None or theirs is None:
                continue
            value = mine.qps / theirs.qps
            out.append(
                {
                    "workload": workload,
                    "ratio": f"{top} / {bottom}",
                    "value": value,
                    "target": target,
                    "verdict": verdict(value, target),
                    "cpu_ratio": median(theirs.cpu) / median(mine.cpu),
                }
            )
    return out


async def server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


@contextlib.contextmanager
def database() -> Iterator[tuple[str, str]]:
    """$DATABASE_URL, or a throwaway cluster for the duration of the run."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, "$DATABASE_URL"
        return
    from millpond.embedded import PostgresCluster

    with PostgresCluster(max_connections=200) as cluster:
        yield cluster.dsn(), f"throwaway PostgresCluster on port {cluster.port}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/pool_bench.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--duration", type=float, help="measured seconds per case and repeat")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring")
    parser.add_argument("--repeats", type=int, help="interleaved rounds; the median is kept")
    parser.add_argument(
        "--only", help=f"comma-separated case names: {', '.join(c.name for c in CASES)}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (0.5 if quick else 1.5)
    args.warmup = args.warmup if args.warmup is not None else (0.25 if quick else 0.3)
    args.repeats = args.repeats or (3 if quick else 7)
    names = [c.name for c in CASES]
    args.cases = list(CASES)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            parser.error(f"unknown case {unknown[0]!r}; known: {', '.join(names)}")
        args.cases = [c for c in CASES if c.name in wanted]
    return args


def report(results: Sequence[Result], found: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if r.error is not None and not r.runs:
            rows.append([r.workload, r.case, "FAILED", "", "", r.error[:60]])
            continue
        runs = " ".join(f"{q:,.0f}" for q in r.runs)
        cpu = f"{median(r.cpu):.1f}"
        rows.append([r.workload, r.case, f"{r.qps:,.0f}", cpu, f"{spread(r.runs):.0%}", runs])
    headers = ["workload", "case", "qps (median)", "client CPU us/q", "spread", "runs (qps)"]
    out = [table(headers, rows)]
    if found:
        ratio_rows = [
            [
                f["workload"],
                f["ratio"],
                f"{f['value']:.2f}x",
                f">= {f['target']}x",
                f["verdict"],
                f"{f['cpu_ratio']:.2f}x",
            ]
            for f in found
        ]
        headers = ["workload", "qps ratio", "measured", "target", "verdict", "CPU/q ratio"]
        out += ["", table(headers, ratio_rows)]
    return "\n".join(out)


async def amain(args: argparse.Namespace, dsn: str, where: str) -> dict[str, Any]:
    info = machine(PACKAGES)
    info["postgresql"] = await server_version(dsn)
    info["server"] = where
    info["loop"] = type(asyncio.get_running_loop()).__module__
    print(
        f"SELECT 1 qps; {info['cpus']} CPUs, Python {info['python']}, PostgreSQL "
        f"{info['postgresql']} ({where}); {args.repeats} rounds x {args.duration:g}s "
        f"(+{args.warmup:g}s warm-up) per case",
        file=sys.stderr,
    )
    results = await bench(dsn, args.cases, args.repeats, args.warmup, args.duration)
    info["loadavg_at_end"] = load_average()
    found = ratios(results)
    print(report(results, found))
    print(
        f"\nmillpond {info['revision']}, PostgreSQL {info['postgresql']}, {info['cpus']} CPUs "
        f"shared by client and server; 1-minute load average {info['loadavg_at_start']} at "
        f"start, {info['loadavg_at_end']} at end"
    )
    return {
        "machine": info,
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "workloads": {k: {"tasks": t, "connections": c} for k, (t, c) in WORKLOADS.items()},
            "per_request_max_seconds": PER_REQUEST_MAX_SECONDS,
        },
        "cases": {c.name: c.what for c in args.cases},
        "results": [
            {
                "case": r.case,
                "workload": r.workload,
                "qps": r.qps,
                "runs": r.runs,
                "client_cpu_us_per_query": median(r.cpu) if r.cpu else None,
                "error": r.error,
            }
            for r in results
        ],
        "ratios": found,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with database() as (dsn, where):
        data = run_uvloop(lambda: amain(args, dsn, where))
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n(total {data['elapsed_seconds']}s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    failed = any(r["error"] for r in data["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
