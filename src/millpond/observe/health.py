"""Health and readiness, from the same snapshot the metrics show.

``health(pool)`` answers an application's own readiness probe without any I/O::

    report = millpond.observe.health(pool)        # or a list / dict of pools
    return Response(report.text(), status=report.status_code)

A pool is *ready* when it is open, holds at least ``min_size`` connections, and its
database looks reachable: the circuit breaker is not open, and connection attempts are
not all failing while callers wait. The reasons say which pool and why. For the proxy
(``/readyz`` on its stats port) a graceful shutdown also makes it not ready, while
``/healthz`` (the process works) stays 200 until the process exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from millpond.observe.snapshot import Pools, PoolView, View, pools_source


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """One pool's readiness and why."""

    name: str
    ready: bool
    reasons: tuple[str, ...]
    size: int
    min_size: int
    max_size: int
    breaker_state: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ready": self.ready,
            "reasons": list(self.reasons),
            "size": self.size,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "breaker_state": self.breaker_state,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Is the process ready to serve, and if not, why (one line per problem)."""

    ready: bool
    reasons: tuple[str, ...]
    pools: tuple[PoolHealth, ...] = field(default=())
    live: bool = True

    def __bool__(self) -> bool:
        return self.ready

    @property
    def status_code(self) -> int:
        """200 when ready, 503 otherwise (for an HTTP readiness probe)."""
        return 200 if self.ready else 503

    def text(self) -> str:
        """A body for a probe: ``ready`` or ``not ready`` then one reason per line."""
        head = "ready" if self.ready else "not ready"
        lines = [head, *(f"- {r}" for r in self.reasons)]
        for pool in self.pools:
            mark = "ok" if pool.ready else "NOT READY"
            lines.append(
                f"pool {pool.name}: {mark}, {pool.size} connections "
                f"(min {pool.min_size}, max {pool.max_size}), breaker {pool.breaker_state}"
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "live": self.live,
            "reasons": list(self.reasons),
            "pools": [p.to_dict() for p in self.pools],
        }


def pool_health(pool: PoolView) -> PoolHealth:
    """Readiness of one pool from its snapshot."""
    s = pool.stats
    breaker = str(getattr(s, "breaker_state", "disabled"))
    up = s.size - s.connecting
    reasons = []
    if breaker == "open":
        reasons.append(
            f"pool {pool.name}: database unreachable (circuit breaker open; "
            f"{s.connect_errors} failed connection attempts)"
        )
    elif up == 0 and s.connect_errors and (s.waiting or s.min_size):
        reasons.append(
            f"pool {pool.name}: database unreachable so far "
            f"({s.connect_errors} failed connection attempts, none open)"
        )
    if up < s.min_size:
        reasons.append(f"pool {pool.name}: {up} of min_size {s.min_size} connections open")
    elif not pool.ready:
        reasons.append(f"pool {pool.name}: not open (closed, closing or not yet opened)")
    return PoolHealth(
        name=pool.name,
        ready=not reasons,
        reasons=tuple(reasons),
        size=s.size,
        min_size=s.min_size,
        max_size=s.max_size,
        breaker_state=breaker,
    )


def view_health(view: View) -> HealthReport:
    """Readiness of everything in a view (the proxy's shutdown included)."""
    pools = tuple(pool_health(p) for p in view.pools)
    reasons = [r for p in pools for r in p.reasons]
    proxy = view.proxy
    if proxy is not None and proxy.shutting_down:
        reasons.insert(0, f"proxy is shutting down ({proxy.shutting_down})")
    if proxy is not None and proxy.paused:
        reasons.append("proxy is paused (PAUSE)")
    return HealthReport(ready=not reasons, reasons=tuple(reasons), pools=pools)


def health(pools: Pools) -> HealthReport:
    """Readiness of one pool, several, or a mapping of them, for an app's own endpoint."""
    return view_health(pools_source(pools).view())
