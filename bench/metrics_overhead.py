"""What metrics cost the library pool's fast path: acquire + release, metrics off and on.

Run:  python bench/metrics_overhead.py [--quick] [--duration S] [--repeats N] [--json PATH]

The workload is overhead_bench.py's: tasks loop ``async with pool.acquire(): await
asyncio.sleep(0)`` on a ``driver="memory"`` pool (no database, so the pool's own work
is all there is). Cases, interleaved round by round:

- ``off``: the pool alone;
- ``collector``: a :class:`millpond.observe.PoolCollector` registered on a registry and
  scraped (``generate_latest``) every second from the event loop;
- ``stats-server``: :func:`millpond.observe.serve` (``/metrics``, its once-a-second
  history sampler) scraped over HTTP every second by a client thread, the way
  Prometheus and the dashboard read it.

Time is this process's CPU time (``time.process_time``, every thread included: the
scrapes are paid for) per loop iteration. The target (issue #6): metrics on cost under
10% of the fast path. A ``baseline`` loop without a pool is measured too, so the table
also shows the overhead relative to the pool's own net cost (a stricter figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

import millpond
from _common import machine, median, run_uvloop, spread, table, verdict
from millpond.observe import PoolCollector, serve

PACKAGES = ("millpond", "prometheus-client", "uvloop")
WORKLOADS = {"1 task": (1, 8), "64x8": (64, 8)}
TARGET = 0.10  # metrics on may cost at most 10% more per acquire + release
SCRAPE_EVERY = 1.0


@dataclass
class Run:
    on: bool = True
    done: int = 0


Worker = Callable[[Run], Any]


async def _loop_worker(pool: millpond.Pool | None, run: Run) -> None:
    sleep = asyncio.sleep
    if pool is None:
        while run.on:
            await sleep(0)
            run.done += 1
        return
    while run.on:
        async with pool.acquire():
            await sleep(0)
        run.done += 1


@contextlib.asynccontextmanager
async def baseline(conns: int) -> AsyncIterator[millpond.Pool | None]:
    yield None


@contextlib.asynccontextmanager
async def off(conns: int) -> AsyncIterator[millpond.Pool | None]:
    async with millpond.create_pool(driver="memory", min_size=conns, max_size=conns) as pool:
        yield pool


@contextlib.asynccontextmanager
async def collector(conns: int) -> AsyncIterator[millpond.Pool | None]:
    async with millpond.create_pool(driver="memory", min_size=conns, max_size=conns) as pool:
        registry = CollectorRegistry()
        registry.register(PoolCollector(pool))
        scrapes = 0

        async def scrape() -> None:
            nonlocal scrapes
            while True:
                await asyncio.sleep(SCRAPE_EVERY)
                generate_latest(registry)
                scrapes += 1

        task = asyncio.create_task(scrape())
        try:
            yield pool
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def stats_server(conns: int) -> AsyncIterator[millpond.Pool | None]:
    async with millpond.create_pool(driver="memory", min_size=conns, max_size=conns) as pool:
        server = await serve(pool, port=0)
        stop = threading.Event()
        url = server.url + "/metrics"

        def scraper() -> None:  # Prometheus, in another thread of this process
            while not stop.wait(SCRAPE_EVERY):
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()

        thread = threading.Thread(target=scraper, name="scraper", daemon=True)
        thread.start()
        try:
            yield pool
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
            await server.close()


CASES: dict[str, Callable[[int], contextlib.AbstractAsyncContextManager[Any]]] = {
    "baseline": baseline,
    "off": off,
    "collector": collector,
    "stats-server": stats_server,
}


async def measure(name: str, tasks: int, conns: int, warmup: float, duration: float) -> float:
    """CPU nanoseconds per loop iteration."""
    gc.collect()
    async with CASES[name](conns) as pool:
        run = Run()
        running = [asyncio.create_task(_loop_worker(pool, run)) for _ in range(tasks)]
        try:
            await asyncio.sleep(warmup)
            count0, cpu0 = run.done, time.process_time()
            await asyncio.sleep(duration)
            count1, cpu1 = run.done, time.process_time()
        finally:
            run.on = False
            await asyncio.gather(*running)
    return (cpu1 - cpu0) / (count1 - count0) * 1e9


async def bench(repeats: int, warmup: float, duration: float) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for workload, (tasks, conns) in WORKLOADS.items():
        row = results[workload] = {name: [] for name in CASES}
        for r in range(repeats):
            for name in CASES:
                ns = await measure(name, tasks, conns, warmup, duration)
                row[name].append(ns)
                print(f"  {workload} round {r + 1}/{repeats} {name:<13} {ns:>8,.0f} ns",
                      file=sys.stderr)  # fmt: skip
    return results


async def scrape_cost(pools: int, rounds: int = 200) -> dict[str, float]:
    """CPU microseconds of one scrape, measured directly (no noise from the load)."""
    opened = [
        await millpond.create_pool(driver="memory", name=f"p{i}", min_size=8, max_size=8)
        for i in range(pools)
    ]
    try:
        for pool in opened:  # some history in the histograms
            for _ in range(1000):
                async with pool.acquire():
                    pass
        registry = CollectorRegistry()
        registry.register(PoolCollector(opened))
        server = await serve(opened, port=0)
        costs = {}
        for name, call in (
            ("collector (generate_latest)", lambda: generate_latest(registry)),
            ("stats server /metrics", lambda: server.respond("/metrics")),
            ("  /metrics: part in the event loop", lambda: server._route("/metrics", "")),
            ("stats server history sample", server._sample),
            ("stats server /api/snapshot", lambda: server.respond("/api/snapshot?history=0")),
            ("  /api/snapshot: part in the loop", lambda: server._route("/api/snapshot", "")),
        ):
            call()
            cpu0 = time.process_time()
            for _ in range(rounds):
                call()
            costs[name] = (time.process_time() - cpu0) / rounds * 1e6
        await server.close()
        return costs
    finally:
        for pool in opened:
            await pool.close()


def summarize(results: dict[str, dict[str, list[float]]]) -> tuple[str, list[dict[str, Any]]]:
    rows, out = [], []
    for workload, cases in results.items():
        base, off_ns = median(cases["baseline"]), median(cases["off"])
        for name in ("collector", "stats-server"):
            on = median(cases[name])
            gross = on / off_ns - 1
            net = (on - off_ns) / (off_ns - base) if off_ns > base else float("nan")
            rows.append([
                workload, name, f"{off_ns:,.0f}", f"{on:,.0f}", f"{gross * 100:+.1f}%",
                f"{net * 100:+.1f}%", f"{spread(cases[name]) * 100:.0f}%",
                verdict(gross, TARGET, higher_is_better=False),
            ])  # fmt: skip
            out.append(
                {"workload": workload, "case": name, "off_ns": off_ns, "on_ns": on,
                 "baseline_ns": base, "overhead": gross, "overhead_of_net": net}
            )  # fmt: skip
    headers = ["workload", "metrics", "off ns/op", "on ns/op", "overhead", "of net",
               "spread", f"< {TARGET:.0%}"]  # fmt: skip
    return table(headers, rows), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s")
    parser.add_argument("--duration", type=float, help="measured seconds per case and round")
    parser.add_argument("--repeats", type=int, help="rounds (cases interleaved)")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--json", help="write everything to this file")
    args = parser.parse_args()
    duration = args.duration or (1.5 if args.quick else 3.0)  # >= 1 scrape per window
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine(PACKAGES)
    print(f"metrics overhead: {repeats} rounds x {duration:g} s per case; "
          f"scrape every {SCRAPE_EVERY:g} s; {info['python']}, {info['cpus']} CPUs, "
          f"load {info['loadavg_at_start']}", file=sys.stderr)  # fmt: skip
    results = run_uvloop(lambda: bench(repeats, args.warmup, duration))
    text, rows = summarize(results)
    print(text)
    costs = {n: run_uvloop(functools.partial(scrape_cost, n)) for n in (1, 10)}
    print("\nOne scrape, CPU time measured directly (at one scrape a second, X us is X/10,000 "
          "% of a CPU-second):")  # fmt: skip
    print(table(["what", "1 pool", "10 pools"],
                [[name, f"{costs[1][name]:,.0f} us", f"{costs[10][name]:,.0f} us"]
                 for name in costs[1]]))  # fmt: skip
    every_second = costs[1]["stats server /metrics"] + costs[1]["stats server history sample"]
    print(
        f"\nstats server, 1 pool: {every_second:,.0f} us of CPU per second = "
        f"{every_second / 1e4:.3f}% of the loop's time, whatever the traffic"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rounds": results, "summary": rows,
                       "scrape_cost_us": costs}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
