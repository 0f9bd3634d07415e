"""Helpers shared by the benchmarks: the event loop, timing loops, tables, versions."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from importlib import metadata
from typing import Any, TypeVar

T = TypeVar("T")


def run_uvloop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a uvloop event loop (every case of a run shares this one loop)."""
    import asyncio

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def package_versions(names: Iterable[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine(packages: Iterable[str]) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": package_versions(packages),
        "revision": revision(),
        # other work on the machine skews throughput; shown so a reader can judge
        "loadavg_at_start": load_average(),
    }


def revision() -> str:
    """The git commit benchmarked, with ``-dirty`` for uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median: ``(low, high, coverage)``.

    The k-th smallest and k-th largest of n values bracket the true median with
    probability 1 - 2 P(B < k), B ~ Binomial(n, 1/2); k is the largest that still covers
    ``confidence``. No normality assumed: the rounds of a noisy VM are not normal. Below
    6 values even (min, max) covers less than 95% (5 values: 93.75%); ``coverage`` says
    how much it does cover.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan"), float("nan"), 0.0
    k, tail = 1, 1 / 2**n  # tail: P(B < k)
    while k < (n + 1) // 2:
        below = tail + math.comb(n, k) / 2**n  # P(B < k + 1)
        if 1 - 2 * below < confidence:
            break
        k, tail = k + 1, below
    return ordered[k - 1], ordered[n - k], 1 - 2 * tail


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as a fraction: how noisy the repeats were."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    body = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str], header: bool = False) -> str:
        out = []
        for cell, width in zip(cells, widths, strict=True):
            numeric = not header and cell[:1].isdigit()
            out.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers, header=True), sep, *(line(row) for row in body)])


def verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    if ratio != ratio:  # NaN: a side is missing or failed
        return "n/a"
    ok = ratio >= target if higher_is_better else ratio <= target
    return "meets" if ok else "MISSES"


class Run:
    """Shared by the tasks of one measurement: keep going, and how many queries so far."""

    __slots__ = ("done", "on")

    def __init__(self) -> None:
        self.on = True
        self.done = 0


Worker = Callable[[Run], Coroutine[Any, Any, None]]
