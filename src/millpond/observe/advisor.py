"""How big should a pool be? ``millpond size``, and the queueing math ``advise`` shares.

Three answers, side by side, for ``λ`` queries per second each holding a connection
for ``S`` seconds, with a target wait ``W``:

- **The article's formula**, as issue #6 words it: ``((C × P) / W) + R`` with ``C`` the
  calls per second, ``P`` the processing time, ``W`` the target wait and ``R`` a reserve
  (default 3, PostgreSQL's ``superuser_reserved_connections``). For 1000 queries/s of
  50 ms and W = 100 ms: 1000 × 50 / 100 + 3 = **503**.
- **Little's law**: connections busy on average ``L = λ × S`` = 1000/s × 0.05 s = **50**.
  That is a count; the article's ``C × P / W`` is a rate (per second), read as a count.
  It scales with ``1/W`` (patient callers "need" fewer connections, impatient ones
  thousands), while the work in flight is 50 connections whatever anyone's patience.
- **Erlang C** (M/M/c queue): the fewest connections ``c`` such that at most 1% of
  acquires wait longer than ``W``: ``P(wait > W) = C(c, a) · exp(-(c - a) · W / S)``
  with ``a = λS``. For the example: **53**. More only idles; fewer than 51 and the
  queue grows without bound.

With ``--cores``/``--spindles`` the database side is shown too: PostgreSQL runs about
``cores × 2 + spindles`` queries at once efficiently (the PostgreSQL wiki / HikariCP
rule); more busy connections than that means the database, not the pool, is the limit.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_TARGET_WAIT = 0.1
DEFAULT_RESERVE = 3
DEFAULT_PERCENTILE = 0.99
MAX_SERVERS = 1_000_000


def article_formula(qps: float, query_s: float, target_wait_s: float, reserve: float) -> float:
    """``((C × P) / W) + R``: C calls/s, P and W in the same unit of time, R spare."""
    if target_wait_s <= 0:
        raise ValueError("the target wait must be positive")
    return (qps * query_s) / target_wait_s + reserve


def littles_law(qps: float, query_s: float) -> float:
    """Connections busy on average: arrival rate × time each holds one."""
    return qps * query_s


def erlang_c(servers: int, load: float) -> float:
    """Probability an arrival waits in an M/M/c queue (``load`` = λS, in Erlangs).

    Computed through the Erlang B recurrence (stable for thousands of servers).
    """
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


def wait_exceeds(servers: int, qps: float, query_s: float, t: float) -> float:
    """P(wait > t) with ``servers`` connections (M/M/c)."""
    load = qps * query_s
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    return erlang_c(servers, load) * math.exp(-(servers - load) * t / query_s)


def mean_wait(servers: int, qps: float, query_s: float) -> float:
    """Average wait for a connection (M/M/c); infinite when the pool cannot keep up."""
    load = qps * query_s
    if load <= 0:
        return 0.0
    if servers <= load:
        return math.inf
    return erlang_c(servers, load) * query_s / (servers - load)


def servers_for_wait(
    qps: float, query_s: float, target_wait_s: float, percentile: float = DEFAULT_PERCENTILE
) -> int:
    """Fewest connections keeping ``percentile`` of acquires waiting at most the target."""
    load = qps * query_s
    if load <= 0:
        return 1
    miss = 1 - percentile
    c = max(1, math.floor(load) + 1)
    # walk up with the Erlang B recurrence, resuming where the previous c left off
    b, k = 1.0, 0
    while c < MAX_SERVERS:
        while k < c:
            k += 1
            b = load * b / (k + load * b)
        waits = c * b / (c - load * (1 - b))
        if waits * math.exp(-(c - load) * target_wait_s / query_s) <= miss:
            return c
        c += 1
    return MAX_SERVERS


def database_ceiling(cores: int, spindles: int) -> int:
    """Queries PostgreSQL runs at once efficiently: cores × 2 + effective spindles."""
    return cores * 2 + spindles


@dataclass(frozen=True, slots=True)
class SizeReport:
    """``millpond size``'s figures."""

    qps: float
    query_s: float
    target_wait_s: float
    reserve: float
    percentile: float
    article: float
    busy: float
    recommended: int
    wait_miss: float  # P(wait > target) at ``recommended``
    mean_wait_s: float  # average wait at ``recommended``
    instances: int = 1
    per_instance: int | None = None
    ceiling: int | None = None
    max_connections: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def size(
    qps: float,
    query_s: float,
    *,
    target_wait_s: float = DEFAULT_TARGET_WAIT,
    reserve: float = DEFAULT_RESERVE,
    percentile: float = DEFAULT_PERCENTILE,
    cores: int | None = None,
    spindles: int = 1,
    instances: int = 1,
    max_connections: int | None = None,
) -> SizeReport:
    if qps < 0 or query_s <= 0:
        raise ValueError("queries per second must be >= 0 and the query time > 0")
    if not 0 < percentile < 1:
        raise ValueError("the percentile must be between 0 and 1")
    recommended = servers_for_wait(qps, query_s, target_wait_s, percentile)
    per_instance = None
    if instances > 1:
        per_instance = servers_for_wait(qps / instances, query_s, target_wait_s, percentile)
    return SizeReport(
        qps=qps,
        query_s=query_s,
        target_wait_s=target_wait_s,
        reserve=reserve,
        percentile=percentile,
        article=article_formula(qps, query_s, target_wait_s, reserve),
        busy=littles_law(qps, query_s),
        recommended=recommended,
        wait_miss=wait_exceeds(recommended, qps, query_s, target_wait_s),
        mean_wait_s=mean_wait(recommended, qps, query_s),
        instances=instances,
        per_instance=per_instance,
        ceiling=None if cores is None else database_ceiling(cores, spindles),
        max_connections=max_connections,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.4g} ms"


def explain(r: SizeReport) -> str:
    """The report as text: the three figures, the recommendation, and why they differ."""
    pct = f"{r.percentile * 100:g}%"
    lines = [
        f"{r.qps:g} queries/s, each holding a connection {ms(r.query_s)}; "
        f"target: {pct} of acquires wait under {ms(r.target_wait_s)}",
        "",
        f"  Little's law   L = λ × S = {r.qps:g}/s × {r.query_s:g} s = {r.busy:.4g} "
        f"connections busy on average",
        f"  Erlang C       {r.recommended} connections: {r.wait_miss * 100:.2g}% of acquires "
        f"wait over {ms(r.target_wait_s)} (mean wait {ms(r.mean_wait_s)})",
        f"  the article    ((C × P) / W) + R = (({r.qps:g} × {ms(r.query_s)}) / "
        f"{ms(r.target_wait_s)}) + {r.reserve:g} = {r.article:.4g}",
        "",
        f"recommended: max_size = {r.recommended}, min_size = {math.ceil(r.busy)}",
    ]
    if r.per_instance is not None:
        lines.append(
            f"  with {r.instances} instances sharing the load: max_size = {r.per_instance} "
            f"each ({r.per_instance * r.instances} in all; one pooled proxy needs {r.recommended})"
        )
    lines += ["", "Why they differ:", *_why(r)]
    lines += _warnings(r)
    return "\n".join(lines)


def _why(r: SizeReport) -> list[str]:
    factor = (r.article - r.reserve) / r.busy if r.busy else math.inf
    return [
        f"  C × P = {r.busy:.4g} is already the answer's core: the connections a load of "
        f"{r.qps:g}/s keeps busy (Little's law).",
        f"  Dividing by W (a time) turns that count into a rate, {r.busy / r.target_wait_s:.4g} "
        f"per second, which the formula then reads as connections: {factor:.3g}x the work in "
        f"flight. Halving W would double it, yet a query holds its connection "
        f"{ms(r.query_s)} whatever the caller's patience.",
        f"  Waiting is set by the spare connections above {r.busy:.4g}: Erlang C finds "
        f"{r.recommended - r.busy:.3g} spare enough for the target; any more sit idle, "
        f"each a server process.",
    ]


def _warnings(r: SizeReport) -> list[str]:
    out = []
    if r.ceiling is not None and r.busy > r.ceiling:
        out.append(
            f"warning: {r.busy:.4g} busy connections exceed what the server runs at once "
            f"efficiently (cores × 2 + spindles = {r.ceiling}): the database is the limit; "
            f"a bigger pool moves the queue into the server and {ms(r.query_s)} will grow."
        )
    elif r.ceiling is not None:
        out.append(f"server: cores × 2 + spindles = {r.ceiling} queries at once; this load fits.")
    if r.max_connections is not None:
        total = (r.per_instance or r.recommended) * r.instances
        if total > r.max_connections:
            out.append(
                f"warning: {r.instances} × {r.per_instance or r.recommended} = {total} "
                f"connections exceed the server's max_connections ({r.max_connections}); "
                f"put a proxy in front (millpond proxy) or lower the pool sizes."
            )
    return ["", *out] if out else []


# --------------------------------------------------------------------------- the command


def _cmd_size(args: argparse.Namespace) -> int:
    try:
        report = size(
            args.qps,
            args.query_ms / 1000,
            target_wait_s=args.target_wait_ms / 1000,
            reserve=args.reserve,
            percentile=args.percentile / 100,
            cores=args.cores,
            spindles=args.spindles,
            instances=args.instances,
            max_connections=args.max_connections,
        )
    except ValueError as exc:
        print(f"millpond size: {exc}")
        return 2
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(explain(report))
    return 0


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``millpond size`` to the ``millpond`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "size", help="compute a pool size from query time, queries per second and a target wait"
    )
    p.add_argument("--query-ms", type=float, required=True, help="time a query holds a connection")
    p.add_argument("--qps", type=float, required=True, help="queries (acquires) per second")
    p.add_argument(
        "--target-wait-ms",
        type=float,
        default=DEFAULT_TARGET_WAIT * 1000,
        help="longest acceptable wait for a connection (default %(default)g)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=DEFAULT_PERCENTILE * 100,
        help="share of acquires that must meet the target, in %% (default %(default)g)",
    )
    p.add_argument(
        "--reserve",
        type=float,
        default=DEFAULT_RESERVE,
        help="the article's R (default %(default)g)",
    )
    p.add_argument("--cores", type=int, help="database server CPU cores")
    p.add_argument("--spindles", type=int, default=1, help="effective disks (default 1)")
    p.add_argument("--instances", type=int, default=1, help="app instances, each with a pool")
    p.add_argument("--max-connections", type=int, help="the server's max_connections, to check")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=_cmd_size)
    return p
