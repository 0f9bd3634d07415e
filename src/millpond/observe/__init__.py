"""Observability: metrics, health endpoints, a live dashboard and a pool-sizing advisor.

Everything here reads immutable snapshots (:meth:`millpond.Pool.stats`, the proxy's
admin-console rows) when someone asks; nothing is added to a pool's hot path.

- :class:`PoolCollector` / :class:`ProxyCollector`: prometheus_client collectors
  (needs ``prometheus-client``);
- :func:`health`: readiness of library pools, for an application's own endpoint;
- :func:`serve` / :func:`start_stats_server`: the HTTP endpoint (``/metrics``,
  ``/healthz``, ``/readyz``, ``/api/snapshot``, the dashboard at ``/``);
- :func:`log_stats` / :func:`start_stats_logger`: a statistics line per pool every
  period (PgBouncer's ``log_stats``), :class:`JsonFormatter` for JSON log lines;
- ``millpond top``, ``millpond size``, ``millpond advise``: see :mod:`millpond.observe.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from millpond.observe.health import HealthReport, PoolHealth, health
from millpond.observe.http import StatsServer, serve, start_stats_server
from millpond.observe.logs import JsonFormatter, StatsLogger, log_stats, start_stats_logger
from millpond.observe.snapshot import PoolsSource, PoolView, ProxySource, View

if TYPE_CHECKING:
    from millpond.observe.metrics import PoolCollector, ProxyCollector

__all__ = [
    "HealthReport",
    "JsonFormatter",
    "PoolCollector",
    "PoolHealth",
    "PoolView",
    "PoolsSource",
    "ProxyCollector",
    "ProxySource",
    "StatsLogger",
    "StatsServer",
    "View",
    "health",
    "log_stats",
    "serve",
    "start_stats_logger",
    "start_stats_server",
]


def __getattr__(name: str) -> Any:
    # The collectors import prometheus_client; load them only when asked for.
    if name in ("PoolCollector", "ProxyCollector"):
        from millpond.observe import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'millpond.observe' has no attribute {name!r}")
