"""Rates and windowed percentiles from two successive JSON snapshots, and their history.

A snapshot's counters and histograms are totals since the pool started; what a person
watching wants is *now*: acquires per second over the last second, the 99th percentile
of the waits that happened in it. :func:`derive` computes that from two snapshots (the
``/api/snapshot`` JSON, or one rebuilt from ``/metrics``), and :class:`History` keeps a
few minutes of such points so the dashboard shows the recent past as soon as it opens.
The same functions serve ``millpond top`` and ``millpond advise``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ALL = "*"  # the key of the all-pools aggregate in a point
QUANTILES = (0.5, 0.9, 0.99)
_GAUGES = ("size", "idle", "in_use", "connecting", "resetting", "waiting", "max_size", "min_size")
_RATES = {"acquires": "acquire_rate", "timeouts": "timeout_rate", "connect_errors": "error_rate"}
_PROXY_RATES = {
    "xacts": "xact_rate",
    "queries": "query_rate",
    "bytes_received": "recv_rate",
    "bytes_sent": "sent_rate",
}

Buckets = Sequence[Sequence[float]]  # [[upper_seconds, count], ...], not cumulative


def bucket_delta(new: Buckets, old: Buckets | None) -> dict[float, float]:
    """Observations per bucket between two histogram snapshots (``old`` may be None)."""
    delta = {float(u): float(n) for u, n in new}
    for u, n in old or ():
        key = float(u)
        delta[key] = delta.get(key, 0.0) - float(n)
    return {u: n for u, n in delta.items() if n > 0}


def quantiles(delta: Mapping[float, float], qs: Sequence[float] = QUANTILES) -> list[float | None]:
    """Upper bounds of the buckets holding each quantile (None when nothing happened)."""
    total = sum(delta.values())
    if total <= 0:
        return [None for _ in qs]
    ordered = sorted(delta.items())
    out: list[float | None] = []
    for q in qs:
        seen, rank, found = 0.0, q * total, ordered[-1][0]
        for upper, n in ordered:
            seen += n
            if seen >= rank:
                found = upper
                break
        out.append(found)
    return out


def _hist_window(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> dict[str, Any]:
    """count, sum and bucket deltas of one histogram between two snapshots."""
    if old is None:
        old = {"count": 0, "sum": 0.0, "buckets": []}
    return {
        "count": float(new.get("count", 0)) - float(old.get("count", 0)),
        "sum": float(new.get("sum", 0.0)) - float(old.get("sum", 0.0)),
        "buckets": bucket_delta(new.get("buckets", []), old.get("buckets", [])),
    }


def _merge(into: dict[str, Any], window: Mapping[str, Any]) -> None:
    into["count"] = into.get("count", 0.0) + window["count"]
    into["sum"] = into.get("sum", 0.0) + window["sum"]
    buckets = into.setdefault("buckets", {})
    for upper, n in window["buckets"].items():
        buckets[upper] = buckets.get(upper, 0.0) + n


def _finish(point: dict[str, Any], wait: Mapping[str, Any], use: Mapping[str, Any]) -> None:
    p50, p90, p99 = quantiles(wait.get("buckets", {}))
    point["wait_p50"], point["wait_p90"], point["wait_p99"] = p50, p90, p99
    count = wait.get("count", 0.0)
    point["wait_mean"] = wait["sum"] / count if count > 0 else None
    count = use.get("count", 0.0)
    point["use_mean"] = use["sum"] / count if count > 0 else None
    point["use_p99"] = quantiles(use.get("buckets", {}), (0.99,))[0]


def _rates(
    point: dict[str, Any],
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    names: Mapping[str, str],
    seconds: float,
) -> None:
    """Per-second rates of counters; None without an earlier snapshot to compare with."""
    for counter, rate in names.items():
        if old is None or seconds <= 0:
            point[rate] = None
        else:
            point[rate] = max(0.0, (new.get(counter, 0) - old.get(counter, 0)) / seconds)


def _pool_point(
    new: Mapping[str, Any], old: Mapping[str, Any] | None, seconds: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    point: dict[str, Any] = {name: new.get(name, 0) for name in _GAUGES}
    _rates(point, new, old, _RATES, seconds)
    proxy, proxy_old = new.get("proxy"), (old or {}).get("proxy")
    if proxy:
        _rates(point, proxy, proxy_old, _PROXY_RATES, seconds)
        point["clients_active"] = proxy.get("clients", {}).get("active", 0)
        point["clients_waiting"] = proxy.get("clients", {}).get("waiting", 0)
        point["clients_idle"] = proxy.get("clients", {}).get("idle", 0)
    wait = _hist_window(new.get("wait_time", {}), (old or {}).get("wait_time"))
    use = _hist_window(new.get("use_time", {}), (old or {}).get("use_time"))
    _finish(point, wait, use)
    return point, wait, use


def _pools_by_key(snapshot: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not snapshot:
        return {}
    return {p.get("key", p.get("name", "")): p for p in snapshot.get("pools", [])}


def derive(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> dict[str, Any]:
    """One point: gauges now, rates and percentiles between ``old`` and ``new``.

    ``point["pools"]`` holds one entry per pool key, plus :data:`ALL` summing them
    (its percentiles come from the merged bucket deltas, not an average of percentiles).
    """
    seconds = float(new.get("time", 0.0)) - float(old.get("time", 0.0)) if old else 0.0
    before = _pools_by_key(old)
    pools: dict[str, Any] = {}
    total: dict[str, Any] = {}
    wait_all: dict[str, Any] = {"count": 0.0, "sum": 0.0, "buckets": {}}
    use_all: dict[str, Any] = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for key, pool in _pools_by_key(new).items():
        point, wait, use = _pool_point(pool, before.get(key), seconds)
        pools[key] = point
        for name, value in point.items():
            if isinstance(value, int | float) and not name.startswith(("wait_", "use_")):
                total[name] = total.get(name, 0) + value
        _merge(wait_all, wait)
        _merge(use_all, use)
    _finish(total, wait_all, use_all)
    pools[ALL] = total
    out: dict[str, Any] = {"t": new.get("time", 0.0), "seconds": seconds, "pools": pools}
    proxy = new.get("proxy")
    if proxy:
        out["clients"] = dict(proxy.get("clients", {}))
    return out


class History:
    """The last ``size`` points, numbered so a poller can ask for what it hasn't seen."""

    def __init__(self, size: int = 300) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=size)
        self.seq = 0
        self._last: Mapping[str, Any] | None = None

    def sample(self, snapshot: Mapping[str, Any]) -> dict[str, Any]:
        point = derive(snapshot, self._last)
        self._last = snapshot
        self.seq += 1
        point["seq"] = self.seq
        self.points.append(point)
        return point

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [p for p in self.points if p["seq"] > seq]


def mean(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None
