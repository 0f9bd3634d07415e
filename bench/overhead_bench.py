"""Pure pool overhead: CPU nanoseconds per acquire + release, no database at all.

Run:  python bench/overhead_bench.py [--quick] [--duration S] [--only NAME[,NAME]] [--json PATH]

Every pool lends in-memory connections that answer at once, so what is left is the
pool's own bookkeeping. Each task loops ``async with <acquire>: await asyncio.sleep(0)``
(the ``sleep(0)`` stands for the query's await, so tasks really contend); a ``baseline``
case runs the same loop without a pool and its cost is subtracted. Time is CPU time of
this process (``time.process_time``), so other load on the machine matters less.

The peers run their real pool code; only the connection underneath is fake:

- millpond: ``driver="memory"`` (:mod:`millpond.drivers.memory`).
- asyncpg: ``asyncpg.create_pool(connect=...)`` returning a real
  :class:`asyncpg.Connection` subclass over a fake protocol (no socket). Its
  ``execute`` answers at once, so the reset query asyncpg's pool sends on every
  release (``RESET ALL`` etc.) costs no round trip here; pool_bench.py measures that.
- psycopg_pool: ``AsyncConnectionPool(connection_class=...)`` whose ``connect``
  returns a real :class:`psycopg.AsyncConnection` over a fake libpq connection that
  reports itself idle, so ``commit()`` on leaving ``pool.connection()`` returns at once
  (as it does on a real idle connection).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import asyncpg
import psycopg
from psycopg import pq
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

PACKAGES = ("millpond", "asyncpg", "psycopg", "psycopg-pool", "uvloop")

#: (tasks, connections) per workload
WORKLOADS = {"1 task": (1, 8), "64x8": (64, 8)}

#: millpond's net overhead should be at most 1/TARGET of each peer's
TARGET = 5.0
PEERS = ("asyncpg-pool", "psycopg_pool", "psycopg_pool-getconn")


# -- fake connections for the peers ---------------------------------------------------


class _FakeSettings:
    server_version = "16.0"


class _FakeProtocol:
    """What asyncpg.Connection and asyncpg's pool ask of a protocol, without a socket."""

    queries_count = 0

    def __init__(self) -> None:
        self._connected = True

    def get_settings(self) -> _FakeSettings:
        return _FakeSettings()

    def is_connected(self) -> bool:
        return self._connected

    def is_in_transaction(self) -> bool:
        return False

    def _is_cancelling(self) -> bool:
        return False

    def abort(self) -> None:
        self._connected = False

    async def close(self, timeout: float | None) -> None:
        self._connected = False


class FakeAsyncpgConnection(asyncpg.Connection):  # type: ignore[misc]
    """A real asyncpg.Connection whose statements are answered at once, in memory."""

    __slots__ = ()

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return "SELECT 1"


async def fake_asyncpg_connect(*args: Any, loop: Any = None, **kwargs: Any) -> Any:
    config = SimpleNamespace(
        command_timeout=None,
        statement_cache_size=100,
        max_cached_statement_lifetime=300,
        max_cacheable_statement_size=15 * 1024,
    )
    cls = kwargs.get("connection_class", FakeAsyncpgConnection)
    return cls(_FakeProtocol(), None, loop or asyncio.get_running_loop(), None, config, None)


class _FakePGconn:
    """The parts of psycopg's libpq connection that the pool path reads."""

    def __init__(self) -> None:
        self.status = pq.ConnStatus.OK
        self.transaction_status = pq.TransactionStatus.IDLE
        self.socket = -1
        self.notice_handler: Any = None
        self.notify_handler: Any = None

    def finish(self) -> None:
        self.status = pq.ConnStatus.BAD


class FakePsycopgConnection(psycopg.AsyncConnection[Any]):
    """A real psycopg.AsyncConnection over a fake, always-idle libpq connection."""

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        conn = cls(_FakePGconn())  # type: ignore[arg-type]
        conn._autocommit = bool(kwargs.get("autocommit", False))
        return conn


# -- the cases ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def baseline(conns: int) -> AsyncIterator[Worker]:
    """The same loop with no pool: subtracted from every other case."""

    async def worker(run: Run) -> None:
        sleep = asyncio.sleep
        while run.on:
            await sleep(0)
            run.done += 1

    yield worker


@contextlib.asynccontextmanager
async def millpond_memory(conns: int) -> AsyncIterator[Worker]:
    pool = await millpond.create_pool(driver="memory", min_size=conns, max_size=conns)

    async def worker(run: Run) -> None:
        sleep = asyncio.sleep
        while run.on:
            async with pool.acquire():
                await sleep(0)
            run.done += 1

    try:
        yield worker
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def asyncpg_pool(conns: int) -> AsyncIterator[Worker]:
    pool = await asyncpg.create_pool(
        min_size=conns,
        max_size=conns,
        connect=fake_asyncpg_connect,
        connection_class=FakeAsyncpgConnection,
    )

    async def worker(run: Run) -> None:
        sleep = asyncio.sleep
        while run.on:
            async with pool.acquire():
                await sleep(0)
            run.done += 1

    try:
        yield worker
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _psycopg_pool(conns: int) -> AsyncIterator[AsyncConnectionPool[Any]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        connection_class=FakePsycopgConnection, min_size=conns, open=False
    )
    await pool.open(wait=True, timeout=30)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def psycopg_pool_connection(conns: int) -> AsyncIterator[Worker]:
    """As the docs show: ``async with pool.connection() as conn``."""
    async with _psycopg_pool(conns) as pool:

        async def worker(run: Run) -> None:
            sleep = asyncio.sleep
            while run.on:
                async with pool.connection():
                    await sleep(0)
                run.done += 1

        yield worker


@contextlib.asynccontextmanager
async def psycopg_pool_getconn(conns: int) -> AsyncIterator[Worker]:
    """The pool alone, without the connection's own ``async with`` (commit on exit)."""
    async with _psycopg_pool(conns) as pool:

        async def worker(run: Run) -> None:
            sleep = asyncio.sleep
            while run.on:
                conn = await pool.getconn()
                try:
                    await sleep(0)
                finally:
                    await pool.putconn(conn)
                run.done += 1

        yield worker


@contextlib.asynccontextmanager
async def queue(conns: int) -> AsyncIterator[Worker]:
    """The floor: an asyncio.Queue of objects (no checks, no statistics, no fairness)."""
    q: asyncio.Queue[object] = asyncio.Queue()
    for _ in range(conns):
        q.put_nowait(object())

    async def worker(run: Run) -> None:
        sleep = asyncio.sleep
        while run.on:
            item = await q.get()
            try:
                await sleep(0)
            finally:
                q.put_nowait(item)
            run.done += 1

    yield worker


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    open: Callable[[int], contextlib.AbstractAsyncContextManager[Worker]]


CASES = (
    Case("baseline", "no pool: just the loop and sleep(0)", baseline),
    Case("millpond", 'millpond, driver="memory": async with pool.acquire()', millpond_memory),
    Case("asyncpg-pool", "asyncpg.create_pool(connect=fake): async with acquire()", asyncpg_pool),
    Case(
        "psycopg_pool",
        "AsyncConnectionPool(fake connection_class): async with pool.connection()",
        psycopg_pool_connection,
    ),
    Case("psycopg_pool-getconn", "the same pool: getconn() / putconn()", psycopg_pool_getconn),
    Case("queue", "asyncio.Queue get / put_nowait (floor)", queue),
)


# -- measuring ----------------------------------------------------------------------


async def measure(case: Case, tasks: int, conns: int, warmup: float, duration: float) -> float:
    """CPU nanoseconds per loop iteration (acquire + sleep(0) + release)."""
    gc.collect()
    async with case.open(conns) as worker:
        run = Run()
        running = [asyncio.create_task(worker(run)) for _ in range(tasks)]
        try:
            await asyncio.sleep(warmup)
            start_count, start_cpu = run.done, time.process_time()
            await asyncio.sleep(duration)
            end_count, end_cpu = run.done, time.process_time()
        finally:
            run.on = False
            await asyncio.gather(*running)
    return (end_cpu - start_cpu) / (end_count - start_count) * 1e9


@dataclass
class Result:
    case: str
    workload: str
    runs: list[float]
    net: float = float("nan")

    @property
    def ns(self) -> float:
        return median(self.runs)


async def bench(
    cases: Sequence[Case], repeats: int, warmup: float, duration: float
) -> list[Result]:
    results: list[Result] = []
    for workload, (tasks, conns) in WORKLOADS.items():
        row = {case.name: Result(case.name, workload, []) for case in cases}
        for repeat in range(repeats):
            for case in cases:  # interleaved
                ns = await measure(case, tasks, conns, warmup, duration)
                row[case.name].runs.append(ns)
                print(
                    f"  {workload} round {repeat + 1}/{repeats} {case.name:<22} {ns:>8,.0f} ns",
                    file=sys.stderr,
                    flush=True,
                )
        base = row["baseline"].ns if "baseline" in row else 0.0
        for result in row.values():
            if result.case != "baseline":
                result.net = result.ns - base
        results.extend(row.values())
    return results


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    net = {(r.case, r.workload): r.net for r in results}
    out = []
    for workload in WORKLOADS:
        mine = net.get(("millpond", workload))
        for peer in PEERS:
            theirs = net.get((peer, workload))
            if mine is None or theirs is None:
                continue
            value = theirs / mine if mine > 0 else float("inf")
            out.append(
                {
                    "workload": workload,
                    "ratio": f"{peer} / millpond",
                    "value": value,
                    "target": TARGET,
                    "verdict": verdict(value, TARGET),
                }
            )
    return out


def report(results: Sequence[Result], found: Sequence[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        net = "" if r.case == "baseline" else f"{r.net:,.0f}"
        runs = " ".join(f"{v:,.0f}" for v in r.runs)
        rows.append([r.workload, r.case, f"{r.ns:,.0f}", net, f"{spread(r.runs):.0%}", runs])
    headers = ["workload", "case", "ns/op", "net ns/op", "spread", "runs (ns/op)"]
    out = [table(headers, rows)]
    if found:
        ratio_rows = [
            [f["workload"], f["ratio"], f"{f['value']:.1f}x", f">= {f['target']:g}x", f["verdict"]]
            for f in found
        ]
        out += [
            "",
            table(["workload", "net overhead", "measured", "target", "verdict"], ratio_rows),
        ]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/overhead_bench.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    parser.add_argument("--duration", type=float, help="measured seconds per case and repeat")
    parser.add_argument("--warmup", type=float, help="seconds of looping before measuring")
    parser.add_argument("--repeats", type=int, help="interleaved rounds; the median is kept")
    parser.add_argument(
        "--only",
        help=f"comma-separated case names ({', '.join(c.name for c in CASES)}); "
        "baseline always runs",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.duration = args.duration or (0.3 if args.quick else 1.0)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.2)
    args.repeats = args.repeats or (3 if args.quick else 5)
    names = [c.name for c in CASES]
    args.cases = list(CASES)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = sorted(wanted - set(names))
        if unknown:
            parser.error(f"unknown case {unknown[0]!r}; known: {', '.join(names)}")
        args.cases = [c for c in CASES if c.name in wanted or c.name == "baseline"]
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    info = machine(PACKAGES)
    info["loop"] = type(asyncio.get_running_loop()).__module__
    print(
        f"pool overhead; {info['cpus']} CPUs, Python {info['python']}; {args.repeats} rounds x "
        f"{args.duration:g}s (+{args.warmup:g}s warm-up) per case",
        file=sys.stderr,
    )
    results = await bench(args.cases, args.repeats, args.warmup, args.duration)
    info["loadavg_at_end"] = load_average()
    found = ratios(results)
    print(report(results, found))
    print(
        f"\nmillpond {info['revision']}, {info['cpus']} CPUs; 1-minute load average "
        f"{info['loadavg_at_start']} at start, {info['loadavg_at_end']} at end"
    )
    return {
        "machine": info,
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "workloads": {k: {"tasks": t, "connections": c} for k, (t, c) in WORKLOADS.items()},
            "unit": "CPU ns per acquire + sleep(0) + release; net = minus baseline",
        },
        "cases": {c.name: c.what for c in args.cases},
        "results": [
            {"case": r.case, "workload": r.workload, "ns": r.ns, "net_ns": r.net, "runs": r.runs}
            for r in results
        ],
        "ratios": found,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data = run_uvloop(lambda: amain(args))
    data["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n(total {data['elapsed_seconds']}s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
