"""``millpond top URL``: a live terminal view of a proxy's or an application's pools.

Reads the stats server's ``/api/snapshot`` (or any ``/metrics`` endpoint exporting
millpond's metrics) once per interval, and shows per pool: connections by state,
waiting requests, throughput, wait-time percentiles over the last interval, use time,
timeouts and the breaker, with a sparkline of recent throughput.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from millpond.observe.remote import FetchError, base_url, fetch_snapshot
from millpond.observe.series import ALL, derive

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 12


def sparkline(values: list[float]) -> str:
    """Unicode blocks scaled to the largest value (empty values show as the lowest)."""
    top = max(values, default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    steps = len(SPARK) - 1
    return "".join(SPARK[min(steps, int(v / top * steps + 0.5))] for v in values)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds == 0:
        return "0"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.3g}s"


def rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def uptime(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def _header(snapshot: Mapping[str, Any], url: str) -> str:
    kind = snapshot.get("kind", "app")
    parts = [
        f"[b]millpond top[/b]  {kind} {snapshot.get('version', '')} at {url}",
        f"up {uptime(float(snapshot.get('uptime', 0)))}",
    ]
    proxy = snapshot.get("proxy")
    if proxy:
        clients = proxy.get("clients", {})
        shown = [f"{n} {k}" for k, n in clients.items() if n]
        if proxy.get("pinned"):
            shown.append(f"{proxy['pinned']} pinned")
        busy = ", ".join(shown) or "none"
        parts.append(f"clients {sum(clients.values())} ({busy})")
    health = snapshot.get("health")
    if health is not None:
        parts.append("[green]ready[/]" if health.get("ready") else "[red b]NOT READY[/]")
    return "  ·  ".join(parts)


def _alerts(pool: Mapping[str, Any]) -> list[Text]:
    """Lines for what needs attention: timeouts, connect errors, leaks, the breaker."""
    from rich.text import Text

    found = [
        f"{pool.get(field, 0)} {label}"
        for field, label in (("timeouts", "timeouts"), ("connect_errors", "connect errors"),
                             ("leaks", "leaks"))
        if pool.get(field)
    ]  # fmt: skip
    breaker = pool.get("breaker_state", "disabled")
    if breaker in ("open", "half_open"):
        found.append(f"circuit breaker {breaker}")
    if not found:
        return []
    return [Text(f"{pool.get('name', '')}: {', '.join(found)} (since start)", style="yellow")]


def render(
    snapshot: Mapping[str, Any],
    point: Mapping[str, Any] | None,
    sparks: Mapping[str, deque[float]],
    url: str,
) -> RenderableType:
    """One frame: a header, the pools table, and why the process is not ready, if so."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    proxy = snapshot.get("kind") == "proxy"
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    for name in ("pool", "in use", "idle", "open/max", "waiting",
                 "xact/s" if proxy else "acq/s", "wait p50", "p99", "use", "recent"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("pool", "recent") else "right")
    points = (point or {}).get("pools", {})
    alerts: list[Text] = []
    for pool in snapshot.get("pools", []):
        key = pool.get("key", pool.get("name", ""))
        p = points.get(key, {})
        px = pool.get("proxy") or {}
        extra = px.get("mode", "") if proxy else pool.get("labels", {}).get("role", "")
        label = Text(str(pool.get("name", key)))
        if extra:
            label.append(f" {extra}", style="dim")
        table.add_row(
            label,
            str(pool.get("in_use", 0)),
            str(pool.get("idle", 0)),
            f"{pool.get('size', 0)}/{pool.get('max_size', 0)}",
            Text(str(pool.get("waiting", 0)), style="red b" if pool.get("waiting") else ""),
            rate(p.get("xact_rate" if proxy else "acquire_rate")),
            duration(p.get("wait_p50")),
            duration(p.get("wait_p99")),
            duration(p.get("use_mean")),
            sparkline(list(sparks.get(key, ()))),
        )
        alerts.extend(_alerts(pool))
    parts: list[RenderableType] = [Text.from_markup(_header(snapshot, url)), table]
    total = points.get(ALL)
    if total:
        what = "transactions" if proxy else "acquires"
        per_second = rate(total.get("xact_rate" if proxy else "acquire_rate"))
        parts.append(
            Text(
                f"all pools: {total.get('in_use', 0)}/{total.get('size', 0)} in use, "
                f"{total.get('waiting', 0)} waiting, {per_second} {what}/s, "
                f"wait p99 {duration(total.get('wait_p99'))}",
                style="dim",
            )
        )
    parts.extend(alerts)
    for reason in (snapshot.get("health") or {}).get("reasons", []):
        parts.append(Text(f"not ready: {reason}", style="red"))
    return Group(*parts)


class Top:
    """Samples a URL and keeps what the frames need."""

    def __init__(self, url: str) -> None:
        self.url = base_url(url)
        self.last: dict[str, Any] | None = None
        self.point: dict[str, Any] | None = None
        self.sparks: dict[str, deque[float]] = {}
        self.error: str | None = None

    def sample(self) -> None:
        try:
            snapshot = fetch_snapshot(self.url)
        except FetchError as exc:
            self.error = str(exc)
            return
        self.error = None
        self.point = derive(snapshot, self.last) if self.last is not None else None
        self.last = snapshot
        proxy = snapshot.get("kind") == "proxy"
        for key, p in (self.point or {}).get("pools", {}).items():
            spark = self.sparks.setdefault(key, deque(maxlen=SPARK_POINTS))
            spark.append(float(p.get("xact_rate" if proxy else "acquire_rate", 0.0) or 0.0))

    def frame(self) -> RenderableType:
        from rich.text import Text

        if self.last is None:
            return Text(f"millpond top: {self.error or 'waiting for ' + self.url}", style="red")
        view = render(self.last, self.point, self.sparks, self.url)
        if self.error:
            from rich.console import Group

            return Group(view, Text(f"stale: {self.error}", style="red"))
        return view


def run(
    url: str, *, interval: float = 1.0, once: bool = False, console: Console | None = None
) -> int:
    """Show the view until interrupted (``once``: one frame after two samples)."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    top = Top(url)
    top.sample()
    if once:
        if top.last is not None:
            time.sleep(interval)
            top.sample()
        console.print(top.frame())
        return 0 if top.error is None else 1
    try:
        with Live(top.frame(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                top.sample()
                live.update(top.frame())
    except KeyboardInterrupt:
        return 0


def _cmd(args: argparse.Namespace) -> int:
    try:
        import rich  # noqa: F401
    except ImportError:
        print("millpond top needs rich: pip install 'millpond[observe]'")
        return 2
    return run(args.url, interval=args.interval, once=args.once)


def add_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``millpond top`` to the ``millpond`` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "top", help="live terminal view of a proxy's or an app's pools (its stats URL)"
    )
    parser.add_argument(
        "url", nargs="?", default="http://127.0.0.1:9187",
        help="stats server (http://HOST:PORT) or a /metrics URL (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.set_defaults(func=_cmd)
    return parser
