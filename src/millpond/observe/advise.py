"""``millpond advise URL``: size a running pool from what it measured.

It samples the stats server (or a ``/metrics`` endpoint) once a second for a while,
then, per pool, from the differences between the samples:

- the arrival rate ``λ``: acquires, plus timeouts, refusals and growth of the queue
  (a saturated pool completes fewer acquires than arrive);
- the use time ``S``: mean time a lease was held (leases that ended in the window);
- waits: mean and 99th percentile; how often the pool was full (no idle, at max_size).

Then Little's law gives the connections the load keeps busy (``λS``), Erlang C the
``max_size`` that keeps 99% of waits under the target, and the verdict tells apart:

- a **leak**: connections held that finished leases do not explain (the pool's ``in_use``
  well above ``λS``), the oldest lease aging through the whole window, use time growing,
  or the pool's ``leaks`` counter rising. A bigger pool only delays the exhaustion;
- an **undersized** pool: full most of the time with callers waiting, and ``λS`` close to
  or above ``max_size``: the work in flight really needs more connections;
- an **oversized** one (many more connections than the target needs), or **ok**.

With ``--instances`` and ``--max-connections`` (or ``--dsn`` to read ``SHOW
max_connections``) it warns when pool size × instances exceeds what the server accepts.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from millpond.observe.advisor import (
    DEFAULT_PERCENTILE,
    DEFAULT_TARGET_WAIT,
    servers_for_wait,
    wait_exceeds,
)
from millpond.observe.series import bucket_delta, quantiles

Snapshot = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Observation:
    """One pool over the observed window."""

    key: str
    name: str
    seconds: float
    samples: int
    arrival_rate: float  # acquires + timeouts + refusals + queue growth, per second
    completed_rate: float  # acquires per second
    use_mean: float | None  # seconds a lease was held, on average
    use_first: float | None  # ... in the first and the second half of the window
    use_second: float | None
    wait_mean: float | None
    wait_p99: float | None
    in_use_avg: float
    waiting_avg: float
    full_share: float  # share of samples with the pool at max_size and nothing idle
    min_size: int
    max_size: int
    timeouts: int
    leaks: int
    oldest_first: float
    oldest_last: float

    @property
    def busy(self) -> float:
        """Little's law on finished leases: connections the load keeps busy."""
        return self.arrival_rate * (self.use_mean or 0.0)


@dataclass(frozen=True, slots=True)
class Advice:
    observation: Observation
    verdict: str  # "leak", "undersized", "oversized", "ok", "idle"
    min_size: int
    max_size: int
    findings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        o = self.observation
        data = {name: getattr(o, name) for name in o.__slots__}
        data["busy"] = o.busy
        return {
            "pool": o.name,
            "verdict": self.verdict,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "findings": list(self.findings),
            "observation": data,
        }


# --------------------------------------------------------------------------- measuring


def _pools(snapshot: Snapshot) -> dict[str, Mapping[str, Any]]:
    return {p.get("key", p.get("name", "")): p for p in snapshot.get("pools", [])}


def _hist_mean(new: Mapping[str, Any], old: Mapping[str, Any]) -> float | None:
    count = float(new.get("count", 0)) - float(old.get("count", 0))
    total = float(new.get("sum", 0.0)) - float(old.get("sum", 0.0))
    return total / count if count > 0 else None


def observe_pool(key: str, snapshots: Sequence[Snapshot]) -> Observation | None:
    """What ``snapshots`` (oldest first) say about pool ``key``; None if it is missing."""
    series = [_pools(s).get(key) for s in snapshots]
    pairs = [(s, p) for s, p in zip(snapshots, series, strict=True) if p is not None]
    if len(pairs) < 2:
        return None
    (t0, first), (t1, last) = pairs[0], pairs[-1]
    middle = pairs[len(pairs) // 2][1]
    seconds = max(1e-9, float(t1["time"]) - float(t0["time"]))

    def delta(field: str) -> float:
        return float(last.get(field, 0)) - float(first.get(field, 0))

    queue_growth = float(last.get("waiting", 0)) - float(first.get("waiting", 0))
    arrivals = delta("acquires") + delta("timeouts") + delta("rejected") + queue_growth
    wait_d = bucket_delta(
        last["wait_time"].get("buckets", []), first["wait_time"].get("buckets", [])
    )
    pools = [p for _, p in pairs]
    full = sum(1 for p in pools if p.get("size", 0) >= p.get("max_size", 0) and not p.get("idle"))
    return Observation(
        key=key,
        name=str(last.get("name", key)),
        seconds=seconds,
        samples=len(pairs),
        arrival_rate=max(0.0, arrivals / seconds),
        completed_rate=max(0.0, delta("acquires") / seconds),
        use_mean=_hist_mean(last["use_time"], first["use_time"]),
        use_first=_hist_mean(middle["use_time"], first["use_time"]),
        use_second=_hist_mean(last["use_time"], middle["use_time"]),
        wait_mean=_hist_mean(last["wait_time"], first["wait_time"]),
        wait_p99=quantiles(wait_d, (0.99,))[0],
        in_use_avg=sum(float(p.get("in_use", 0)) for p in pools) / len(pools),
        waiting_avg=sum(float(p.get("waiting", 0)) for p in pools) / len(pools),
        full_share=full / len(pools),
        min_size=int(last.get("min_size", 0)),
        max_size=int(last.get("max_size", 0)),
        timeouts=int(delta("timeouts")),
        leaks=int(delta("leaks")),
        oldest_first=float(first.get("oldest_lease_age", 0.0)),
        oldest_last=float(last.get("oldest_lease_age", 0.0)),
    )


# --------------------------------------------------------------------------- judging


def _leak_evidence(o: Observation) -> list[str]:
    found = []
    s = o.use_mean or 0.0
    if o.leaks > 0:
        found.append(f"the pool reported {o.leaks} lease(s) held past leak_threshold")
    held = o.in_use_avg - o.busy
    aging = o.oldest_last - o.oldest_first >= 0.8 * o.seconds
    if held > max(1.0, 0.5 * o.busy) and aging and o.oldest_last > max(1.0, 10 * s):
        found.append(
            f"{o.in_use_avg:.3g} connections in use on average, but the leases that ended "
            f"explain only {o.busy:.3g} (λS): about {held:.3g} are held and not returned; "
            f"the oldest lease is {o.oldest_last:.3g} s old and aged through the whole window"
        )
    if o.use_first and o.use_second and o.use_second > 1.5 * o.use_first and aging:
        found.append(
            f"use time grew from {o.use_first * 1e3:.3g} ms to {o.use_second * 1e3:.3g} ms "
            f"within the window"
        )
    return found


def judge(
    o: Observation,
    *,
    target_wait_s: float = DEFAULT_TARGET_WAIT,
    percentile: float = DEFAULT_PERCENTILE,
) -> Advice:
    """The verdict and recommended sizes for one observed pool."""
    if o.arrival_rate <= 0 or o.use_mean is None:
        held = o.in_use_avg > 0 and o.oldest_last - o.oldest_first >= 0.8 * o.seconds
        verdict = "leak" if held or o.leaks else "idle"
        why = (
            f"{o.in_use_avg:.3g} connections held all window with no lease finishing"
            if verdict == "leak"
            else "no acquires in the window: nothing to size"
        )
        return Advice(o, verdict, o.min_size, o.max_size, (why,))
    busy = o.busy
    rec_max = servers_for_wait(o.arrival_rate, o.use_mean, target_wait_s, percentile)
    rec_min = min(rec_max, max(1, math.ceil(busy)))
    leak = _leak_evidence(o)
    findings = [
        f"{o.arrival_rate:.4g} acquires/s arrive, each holds a connection "
        f"{o.use_mean * 1e3:.3g} ms: λS = {busy:.3g} connections busy (Little's law)",
        f"{rec_max} connections keep {percentile * 100:g}% of waits under "
        f"{target_wait_s * 1e3:g} ms (Erlang C: "
        f"{wait_exceeds(rec_max, o.arrival_rate, o.use_mean, target_wait_s) * 100:.2g}% over)",
    ]
    waited = o.waiting_avg > 0.5 or (o.wait_p99 or 0.0) > target_wait_s or o.timeouts > 0
    if leak:
        verdict = "leak"
        findings += leak
        findings.append(
            "a leak, not an undersized pool: a bigger pool would only run out later; "
            "find the code that keeps connections (leak_threshold= logs its stack)"
        )
        rec_max = max(rec_max, o.max_size)
    elif waited and o.full_share >= 0.5:
        verdict = "undersized"
        findings.append(
            f"undersized: the pool was full {o.full_share * 100:.0f}% of the time with "
            f"{o.waiting_avg:.3g} callers waiting on average (p99 wait "
            f"{(o.wait_p99 or 0) * 1e3:.3g} ms, {o.timeouts} timeouts); "
            f"max_size {o.max_size} -> {rec_max}"
        )
    elif rec_max * 2 <= o.max_size and o.max_size - rec_max >= 4:
        verdict = "oversized"
        findings.append(f"oversized: max_size {o.max_size} could be {rec_max}; the rest would idle")
    else:
        verdict = "ok"
    return Advice(o, verdict, rec_min, rec_max, tuple(findings))


def capacity_warnings(
    advice: Sequence[Advice], instances: int, max_connections: int | None, reserved: int = 0
) -> list[str]:
    """Warn when pool sizes × instances exceed what the server accepts."""
    if max_connections is None:
        return []
    available = max_connections - reserved
    out = []
    for label, total in (
        ("configured", sum(a.observation.max_size for a in advice) * instances),
        ("recommended", sum(a.max_size for a in advice) * instances),
    ):
        if total > available:
            out.append(
                f"warning: {label} pool sizes x {instances} instances = {total} connections, "
                f"more than the server's max_connections {max_connections}"
                + (f" - {reserved} reserved" if reserved else "")
                + "; lower them or put millpond proxy in front"
            )
    return out


def analyze(snapshots: Sequence[Snapshot], **options: Any) -> list[Advice]:
    """Advice for every pool seen in the last snapshot."""
    if len(snapshots) < 2:
        raise ValueError("need at least two snapshots")
    out = []
    for key in _pools(snapshots[-1]):
        o = observe_pool(key, snapshots)
        if o is not None:
            out.append(judge(o, **options))
    return out


# --------------------------------------------------------------------------- the command


def sample(fetch: Callable[[], Snapshot], seconds: float, interval: float = 1.0) -> list[Snapshot]:
    """Snapshots every ``interval`` for ``seconds`` (at least two)."""
    found = [fetch()]
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        found.append(fetch())
        if time.monotonic() >= deadline:
            return found


def report(advice: Sequence[Advice], warnings: Sequence[str]) -> str:
    lines = []
    for a in advice:
        o = a.observation
        lines.append(
            f"pool {o.name}: {a.verdict.upper()}  (observed {o.seconds:.3g} s, "
            f"{o.samples} samples; now min_size {o.min_size}, max_size {o.max_size})"
        )
        lines += [f"  - {f}" for f in a.findings]
        lines.append(f"  recommend: min_size = {a.min_size}, max_size = {a.max_size}")
        lines.append("")
    return "\n".join([*lines, *warnings]).rstrip() + "\n"


async def server_max_connections(dsn: str) -> tuple[int, int]:
    """(max_connections, superuser_reserved_connections) of the server at ``dsn``."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    finally:
        await conn.close()
    return limit, reserved


def _cmd(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from millpond.observe.remote import FetchError, fetch_snapshot

    limit, reserved = args.max_connections, 0
    if args.dsn:
        limit, reserved = asyncio.run(server_max_connections(args.dsn))
    try:
        snapshots = sample(lambda: fetch_snapshot(args.url), args.seconds, args.interval)
    except FetchError as exc:
        print(f"millpond advise: {exc}")
        return 2
    options = {"target_wait_s": args.target_wait_ms / 1000, "percentile": args.percentile / 100}
    advice = analyze(snapshots, **options)
    if args.pool:
        advice = [a for a in advice if args.pool in (a.observation.name, a.observation.key)]
    warnings = capacity_warnings(advice, args.instances, limit, reserved)
    if args.json:
        print(json.dumps({"pools": [a.to_dict() for a in advice], "warnings": warnings}, indent=2))
    else:
        print(report(advice, warnings), end="")
    return 0


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``millpond advise`` to the ``millpond`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "advise", help="recommend pool sizes from a running pool's or proxy's measurements"
    )
    p.add_argument("url", help="stats server (http://HOST:PORT) or a /metrics URL")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to observe (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument(
        "--target-wait-ms",
        type=float,
        default=DEFAULT_TARGET_WAIT * 1000,
        help="longest acceptable wait (default %(default)g)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=DEFAULT_PERCENTILE * 100,
        help="share of acquires that must meet it, in %% (default %(default)g)",
    )
    p.add_argument("--instances", type=int, default=1, help="processes running such pools")
    p.add_argument("--max-connections", type=int, help="the server's max_connections")
    p.add_argument("--dsn", help="read max_connections from this server (SHOW max_connections)")
    p.add_argument("--pool", help="only this pool (name or key)")
    p.add_argument("--json", action="store_true", help="print the advice as JSON")
    p.set_defaults(func=_cmd)
    return p
