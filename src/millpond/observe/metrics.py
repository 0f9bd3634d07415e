"""Prometheus / OpenMetrics collectors for library pools and for the proxy.

Collectors read a :class:`~millpond.observe.snapshot.View` at scrape time and nothing
else: no counter, timer or callback is added to a pool's hot path. Metric names follow
OpenTelemetry's database-client conventions where one exists
(``db.client.connection.*``, exported the way OpenTelemetry's Prometheus exporter
names them: dots become underscores, seconds get ``_seconds``, counters ``_total``);
the rest are ``millpond_*``. Every pool series carries the labels ``pool_name``,
``database``, ``user``, ``host`` and ``role``.

Usage::

    from prometheus_client import REGISTRY
    from millpond.observe import PoolCollector

    REGISTRY.register(PoolCollector(pool, {"role": "primary"}))   # one collector per registry;
                                                                   # .add() more pools to it
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from millpond.observe.snapshot import (
    CLIENT_STATES,
    LABELS,
    SERVER_STATES,
    Observable,
    PoolsSource,
    PoolView,
    ProxySource,
    Source,
    View,
)
from millpond.pool.pool import Pool
from millpond.pool.stats import HistogramSnapshot

if TYPE_CHECKING:
    from millpond.proxy.server import Proxy

#: Histogram bucket bounds exported (seconds): powers of two of microseconds, 32 us to
#: 134 s. The pool's own finer buckets nest exactly inside them, so counts are exact.
EXPORT_BOUNDS: tuple[float, ...] = tuple((1 << k) / 1_000_000 for k in range(5, 28))
#: How long a scrape from another thread waits for the event loop to take the snapshot.
SNAPSHOT_TIMEOUT = 5.0
BREAKER_STATES = ("closed", "open", "half_open", "disabled")
CLOSE_REASONS = (
    "lifetime", "idle", "uses", "broken", "reset_failed", "health_check", "leaked",
    "pool_closed", "stale",
)  # fmt: skip


def _coarse_index() -> tuple[int, ...]:
    """For each of the pool's fine buckets, the exported bucket that holds it."""
    uppers = HistogramSnapshot.bucket_upper_bounds()
    out = []
    for i, upper in enumerate(uppers):
        exclusive_us = round(upper * 1_000_000) + 1  # values in bucket i are below this
        k = next(
            (j for j, b in enumerate(EXPORT_BOUNDS) if exclusive_us <= round(b * 1_000_000)),
            len(EXPORT_BOUNDS),
        )
        out.append(len(EXPORT_BOUNDS) if i == len(uppers) - 1 else k)
    return tuple(out)


_COARSE = _coarse_index()
_LE = tuple(f"{b:.6f}".rstrip("0") for b in EXPORT_BOUNDS)


def export_buckets(h: HistogramSnapshot) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of a pool histogram, ending with ``+Inf``."""
    counts = [0] * (len(EXPORT_BOUNDS) + 1)
    for i, n in enumerate(h.buckets):
        if n:
            counts[_COARSE[i]] += n
    out, running = [], 0
    for le, n in zip((*_LE, "+Inf"), counts, strict=True):
        running += n
        out.append((le, float(running)))
    return out


class _Families:
    """The metric families of one view, filled pool by pool."""

    def __init__(self) -> None:
        self.order: list[Metric] = []
        self.by_name: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Metric:
        self.order.append(metric)
        self.by_name[metric.name] = metric
        return metric

    def gauge(self, name: str, doc: str, extra: Sequence[str] = (), unit: str = "") -> Any:
        return self._add(GaugeMetricFamily(name, doc, labels=[*LABELS, *extra], unit=unit))

    def counter(self, name: str, doc: str, extra: Sequence[str] = (), unit: str = "") -> Any:
        return self._add(CounterMetricFamily(name, doc, labels=[*LABELS, *extra], unit=unit))

    def histogram(self, name: str, doc: str) -> Any:
        return self._add(HistogramMetricFamily(name, doc, labels=list(LABELS), unit="seconds"))

    def summary(self, name: str, doc: str) -> Any:
        return self._add(SummaryMetricFamily(name, doc, labels=list(LABELS), unit="seconds"))


def _pool_families(f: _Families) -> dict[str, Any]:
    """Every per-pool family, keyed by a short name."""
    return {
        # OpenTelemetry db.client.connection.*
        "count": f.gauge("db_client_connection_count",
                         "Connections in each state (used = lent or being reset)", ["state"]),
        "idle_max": f.gauge("db_client_connection_idle_max", "Most idle connections allowed"),
        "idle_min": f.gauge("db_client_connection_idle_min",
                            "Idle connections kept open (min_size)"),
        "max": f.gauge("db_client_connection_max", "Most connections allowed (max_size)"),
        "pending": f.gauge("db_client_connection_pending_requests",
                           "Requests waiting for a connection"),
        "timeouts": f.counter("db_client_connection_timeouts",
                              "Acquires that timed out waiting for a connection"),
        "wait": f.histogram("db_client_connection_wait_time",
                            "Time to obtain a connection (0 when one was idle)"),
        "use": f.histogram("db_client_connection_use_time",
                           "Time between borrowing a connection and returning it"),
        # millpond_*
        "conns": f.gauge("millpond_pool_connections", "Connections by millpond slot state",
                         ["state"]),
        "size": f.gauge("millpond_pool_size", "Connections held, opening ones included"),
        "ready": f.gauge("millpond_pool_ready", "1 when the pool is open with min_size up"),
        "acquires": f.counter("millpond_pool_acquires", "Connections lent"),
        "waits": f.counter("millpond_pool_waits", "Acquires that had to wait"),
        "rejected": f.counter("millpond_pool_rejected",
                              "Acquires refused at once because max_waiting callers waited"),
        "opened": f.counter("millpond_pool_connections_opened", "Connections opened"),
        "closed": f.counter("millpond_pool_connections_closed", "Connections closed, by reason",
                            ["reason"]),
        "connect_errors": f.counter("millpond_pool_connect_errors",
                                    "Failed connection attempts"),
        "leaks": f.counter("millpond_pool_leaks",
                           "Leases held longer than leak_threshold"),
        "resets": f.counter("millpond_pool_resets",
                            "Connections reset after a borrower left session state"),
        "oldest": f.gauge("millpond_pool_oldest_lease", "Age of the oldest lease", unit="seconds"),
        "breaker": f.gauge("millpond_pool_breaker_state",
                           "Circuit breaker state (1 for the current one)", ["state"]),
        "breaker_opened": f.counter("millpond_pool_breaker_opened",
                                    "Times the circuit breaker opened"),
        "breaker_rejected": f.counter("millpond_pool_breaker_rejected",
                                      "Acquires refused at once by an open circuit breaker"),
        "retries": f.counter("millpond_pool_retries", "Transactions re-run by run_transaction"),
        "giveups": f.counter("millpond_pool_retry_giveups",
                             "Retryable errors run_transaction gave up on"),
    }  # fmt: skip


def _proxy_pool_families(f: _Families) -> dict[str, Any]:
    return {
        "clients": f.gauge("millpond_proxy_clients", "Clients of this pool by state", ["state"]),
        "servers": f.gauge("millpond_proxy_servers",
                           "Server connections by PgBouncer state (SHOW POOLS sv_*)", ["state"]),
        "maxwait": f.gauge("millpond_proxy_max_wait",
                           "How long the oldest waiting client has waited", unit="seconds"),
        "paused": f.gauge("millpond_proxy_pool_paused", "1 while the pool is paused"),
        "xacts": f.counter("millpond_proxy_transactions", "Transactions forwarded"),
        "queries": f.counter("millpond_proxy_queries", "Queries forwarded"),
        "received": f.counter("millpond_proxy_received", "Bytes received from clients",
                              unit="bytes"),
        "sent": f.counter("millpond_proxy_sent", "Bytes sent to clients", unit="bytes"),
        "xact_time": f.summary("millpond_proxy_transaction_time",
                               "Time in transactions (count and sum)"),
        "query_time": f.summary("millpond_proxy_query_time", "Time in queries (count and sum)"),
        "errors": f.counter("millpond_proxy_errors", "Errors sent to clients, by SQLSTATE",
                            ["code"]),
        "pinned": f.gauge("millpond_proxy_pinned_clients",
                          "Clients pinned to a server connection by session state"),
    }  # fmt: skip


def _fill_pool(m: Mapping[str, Any], pool: PoolView) -> None:
    lv = [pool.labels.get(name, "") for name in LABELS]
    s = pool.stats
    used = s.in_use + s.resetting
    m["count"].add_metric([*lv, "idle"], s.idle)
    m["count"].add_metric([*lv, "used"], used)
    m["idle_max"].add_metric(lv, s.max_size)
    m["idle_min"].add_metric(lv, s.min_size)
    m["max"].add_metric(lv, s.max_size)
    m["pending"].add_metric(lv, s.waiting)
    m["timeouts"].add_metric(lv, s.timeouts)
    for key, h in (("wait", s.wait_time), ("use", s.use_time)):
        m[key].add_metric(lv, export_buckets(h), h.sum)
    for state in ("idle", "in_use", "connecting", "resetting"):
        m["conns"].add_metric([*lv, state], getattr(s, state))
    m["size"].add_metric(lv, s.size)
    m["ready"].add_metric(lv, 1 if pool.ready else 0)
    for key, value in (
        ("acquires", s.acquires), ("waits", s.waits), ("rejected", s.rejected),
        ("opened", s.connections_opened), ("connect_errors", s.connect_errors),
        ("leaks", s.leaks), ("resets", s.resets),
        ("breaker_opened", getattr(s, "breaker_opened", 0)),
        ("breaker_rejected", getattr(s, "breaker_rejected", 0)),
        ("retries", getattr(s, "retries", 0)), ("giveups", getattr(s, "retry_giveups", 0)),
    ):  # fmt: skip
        m[key].add_metric(lv, value)
    closed = dict(s.connections_closed)
    for reason in sorted(set(CLOSE_REASONS) | set(closed)):
        m["closed"].add_metric([*lv, reason], closed.get(reason, 0))
    m["oldest"].add_metric(lv, s.oldest_lease_age)
    current = str(getattr(s, "breaker_state", "disabled"))
    for state in sorted(set(BREAKER_STATES) | {current}):
        m["breaker"].add_metric([*lv, state], 1 if state == current else 0)


def _fill_proxy_pool(m: Mapping[str, Any], pool: PoolView) -> None:
    p = pool.proxy
    if p is None:
        return
    lv = [pool.labels.get(name, "") for name in LABELS]
    for state in CLIENT_STATES[:3]:
        m["clients"].add_metric([*lv, state], p.clients.get(state, 0))
    for state in SERVER_STATES:
        m["servers"].add_metric([*lv, state], p.servers.get(state, 0))
    m["maxwait"].add_metric(lv, p.max_wait)
    m["paused"].add_metric(lv, 1 if p.paused else 0)
    m["pinned"].add_metric(lv, p.pinned)
    m["xacts"].add_metric(lv, p.xacts)
    m["queries"].add_metric(lv, p.queries)
    m["received"].add_metric(lv, p.bytes_received)
    m["sent"].add_metric(lv, p.bytes_sent)
    m["xact_time"].add_metric(lv, p.xacts, p.xact_time)
    m["query_time"].add_metric(lv, p.queries, p.query_time)
    for code, n in sorted(p.errors.items()):
        m["errors"].add_metric([*lv, code], n)


def _create_time(view: View, f: _Families) -> Any:
    """db.client.connection.create_time, once PoolStats carries a create_time histogram."""
    if not any(isinstance(getattr(p.stats, "create_time", None), HistogramSnapshot)
               for p in view.pools):  # fmt: skip
        return None
    return f.histogram("db_client_connection_create_time", "Time to open a new connection")


def _process_families(view: View, f: _Families) -> None:
    info = InfoMetricFamily("millpond", "millpond version and what is observed")
    info.add_metric([], {"version": view.version, "kind": view.kind})
    f._add(info)
    up = GaugeMetricFamily("millpond_uptime", "Seconds since observing started", unit="seconds")
    up.add_metric([], view.uptime)
    f._add(up)
    px = view.proxy
    if px is None:
        return
    clients = GaugeMetricFamily(
        "millpond_proxy_client_connections", "Client connections by state", labels=["state"]
    )
    for state in CLIENT_STATES:
        clients.add_metric([state], px.clients.get(state, 0))
    f._add(clients)
    for name, doc, value in (
        ("millpond_proxy_max_client_conn", "max_client_conn", px.max_client_conn),
        ("millpond_proxy_shutting_down", "1 during a shutdown", int(bool(px.shutting_down))),
        ("millpond_proxy_paused", "1 while the whole proxy is paused", int(px.paused)),
    ):  # fmt: skip
        f._add(GaugeMetricFamily(name, doc, value=value))
    f._add(CounterMetricFamily("millpond_proxy_logins", "Successful logins", value=px.logins))
    f._add(
        CounterMetricFamily(
            "millpond_proxy_login_failures", "Failed logins", value=px.login_failures
        )
    )


def render(view: View) -> list[Metric]:
    """The metric families of ``view``, in a stable order."""
    f = _Families()
    _process_families(view, f)
    pool_m = _pool_families(f)
    create = _create_time(view, f)
    proxy_m = _proxy_pool_families(f) if view.kind == "proxy" else None
    for pool in view.pools:
        _fill_pool(pool_m, pool)
        created = getattr(pool.stats, "create_time", None)
        if create is not None and isinstance(created, HistogramSnapshot):
            lv = [pool.labels.get(name, "") for name in LABELS]
            create.add_metric(lv, export_buckets(created), created.sum)
        if proxy_m is not None:
            _fill_proxy_pool(proxy_m, pool)
    return f.order


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ViewCollector:
    """A prometheus_client collector over any :class:`~millpond.observe.snapshot.Source`.

    Safe to scrape from another thread (prometheus_client's ``start_http_server``): the
    snapshot is then taken in the pools' event loop (the one running when the collector
    was made, or a pool's own), never while the loop is changing them.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.loop = _running_loop()

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        if self.loop is not None:
            return self.loop
        for pool in getattr(self.source, "pools", ()):
            loop = getattr(pool, "_loop", None)  # set when the pool opened
            if isinstance(loop, asyncio.AbstractEventLoop):
                return loop
        return None

    def view(self) -> View:
        """A snapshot, taken in the event loop that owns the pools."""
        loop = self._loop()
        if loop is None or loop.is_closed() or not loop.is_running() or _running_loop() is loop:
            return self.source.view()
        result: concurrent.futures.Future[View] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(self.source.view())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return result.result(timeout=SNAPSHOT_TIMEOUT)

    def collect(self) -> Iterator[Metric]:
        return iter(render(self.view()))

    def describe(self) -> Iterator[Metric]:
        """The family names (so a registry refuses a second collector of the same kind)."""
        empty = View(self.source.kind, 0.0, 0.0, "", ())
        return iter(render(empty))


class PoolCollector(ViewCollector):
    """Metrics of library pools: ``registry.register(PoolCollector(pool, labels))``.

    One collector serves any number of pools (``.add(pool, labels)``, ``.remove(pool)``);
    register one per registry. ``labels`` override the ones derived from the pool (its
    name, the DSN's database, user and host, role ``primary``).
    """

    source: PoolsSource

    def __init__(
        self,
        pool: Observable | Iterable[Observable] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(PoolsSource())
        if pool is None:
            return
        if isinstance(pool, Pool) or not isinstance(pool, Iterable):
            self.add(pool, labels)
        else:
            for one in pool:
                self.add(one, labels)

    def add(self, pool: Observable, labels: Mapping[str, str] | None = None) -> None:
        """Observe one more pool (or pool group: each member, labelled with its role)."""
        self.source.add(pool, labels)

    def remove(self, pool: Observable) -> None:
        self.source.remove(pool)


class ProxyCollector(ViewCollector):
    """Metrics of a running proxy: its pools (as above) plus clients and traffic."""

    source: ProxySource

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(ProxySource(proxy))
