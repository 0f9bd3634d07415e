"""One immutable view of a process's pools, rendered by metrics, JSON, health and the dashboard.

A :class:`View` is built in one synchronous pass (the event loop cannot run in between,
so the picture is consistent) from the pools' own immutable snapshots
(:meth:`millpond.Pool.stats`) and, for the proxy, the admin console's snapshot rows
(:mod:`millpond.proxy.admin_show`). Nothing here touches a pool's hot path: a view is
made only when someone reads it (a scrape, a dashboard poll, a health probe).

Two sources make views: :class:`PoolsSource` for an application's library pools and
:class:`ProxySource` for a running ``millpond proxy``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import millpond
from millpond.pool.pool import Pool
from millpond.pool.stats import HistogramSnapshot, PoolStats

if TYPE_CHECKING:
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy

#: The labels every pool carries, in this order (OpenTelemetry's pool name first).
LABELS = ("pool_name", "database", "user", "host", "role")
#: Client states of the proxy as metrics and the dashboard show them: in a pool (active,
#: idle, waiting), logging in, or connected to the admin console.
CLIENT_STATES = ("active", "idle", "waiting", "login", "admin")
#: PgBouncer's server states (SHOW POOLS' sv_* columns).
SERVER_STATES = ("active", "idle", "used", "tested", "login")

_EMPTY: Mapping[str, int] = MappingProxyType({})
_UPPER = HistogramSnapshot.bucket_upper_bounds()


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class ProxyPoolPart:
    """What the proxy adds to one (database, user) pool: its clients and traffic."""

    mode: str
    paused: bool
    clients: Mapping[str, int]  # active, idle, waiting
    servers: Mapping[str, int]  # PgBouncer's sv_active, sv_idle, sv_used, sv_tested, sv_login
    max_wait: float  # seconds the oldest waiting client has waited
    xacts: int
    queries: int
    bytes_received: int  # from clients
    bytes_sent: int  # to clients
    xact_time: float  # seconds, summed
    query_time: float
    errors: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    pinned: int = 0  # clients pinned to a server connection by session state


@dataclass(frozen=True, slots=True)
class PoolView:
    """One pool: its labels, its statistics snapshot and its settings."""

    name: str
    labels: Mapping[str, str]
    stats: PoolStats
    ready: bool
    settings: Mapping[str, Any]
    proxy: ProxyPoolPart | None = None


@dataclass(frozen=True, slots=True)
class ProxyPart:
    """Process-wide facts of a proxy."""

    clients: Mapping[str, int]  # by CLIENT_STATES, every database (the console's too)
    max_client_conn: int
    pinned: int
    logins: int
    login_failures: int
    shutting_down: str | None
    paused: bool
    listen: tuple[str, ...]
    settings: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class View:
    """Everything observability shows, at one moment."""

    kind: str  # "app" or "proxy"
    time: float  # wall clock (epoch seconds)
    uptime: float
    version: str
    pools: tuple[PoolView, ...]
    proxy: ProxyPart | None = None


class Source(Protocol):
    """Something that can describe its pools: library pools or a proxy."""

    kind: str

    def view(self) -> View: ...


# --------------------------------------------------------------------------- library pools


def dsn_labels(dsn: str | None) -> dict[str, str]:
    """database, user and host from a postgresql:// URL or a ``key=value`` conninfo."""
    if not dsn:
        return {}
    if "://" in dsn:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        try:
            port: int | str | None = parts.port
        except ValueError:
            port = None
        found = {
            "database": unquote(parts.path.lstrip("/")),
            "user": unquote(parts.username or ""),
            "host": f"{host}:{port}" if host and port else host,
        }
    else:
        pairs = dict(p.split("=", 1) for p in dsn.split() if "=" in p)
        host, port = pairs.get("host", ""), pairs.get("port", "")
        found = {
            "database": pairs.get("dbname", ""),
            "user": pairs.get("user", ""),
            "host": f"{host}:{port}" if host and port else host,
        }
    return {k: v.strip("'") for k, v in found.items() if v}


def pool_labels(pool: Pool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels of a library pool: its name, the DSN's parts, then ``extra`` on top."""
    labels = {"pool_name": pool.name, "database": "", "user": "", "host": "", "role": "primary"}
    labels.update(dsn_labels(getattr(pool.driver, "dsn", None)))
    if extra:
        labels.update({str(k): str(v) for k, v in extra.items()})
    return labels


def config_settings(pool: Pool) -> dict[str, Any]:
    """The pool's settings as plain values (for the dashboard and the JSON snapshot)."""
    config = pool.config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {}


class GroupLike(Protocol):
    """A pool group (``millpond.routing.PoolGroup``): its ``stats()`` lists its members."""

    name: str

    def stats(self) -> Any: ...


Observable = Pool | GroupLike


def group_views(group: GroupLike, extra: Mapping[str, str] | None) -> list[PoolView]:
    """One view per member of a pool group, from the group's own snapshot.

    ``role`` is the member's observed role (its declared one while unknown), so after a
    failover the series follow the servers' new roles.
    """
    stats = group.stats()
    out = []
    for member in getattr(stats, "members", ()):
        pool = member.pool
        role = member.role if member.role != "unknown" else member.declared_role
        labels = {"pool_name": f"{stats.name}:{member.name}", "database": "", "user": "",
                  "host": "", "role": role, **(extra or {})}  # fmt: skip
        settings = {
            "group": stats.name, "declared_role": member.declared_role,
            "in_rotation": member.in_rotation, "reason": member.reason,
            "lag_seconds": member.lag_seconds, "weight": member.weight,
        }  # fmt: skip
        ready = pool.size - pool.connecting >= pool.min_size
        out.append(PoolView(labels["pool_name"], _frozen(labels), pool, ready, _frozen(settings)))
    return out


class PoolsSource:
    """Library pools (and pool groups) observed together; add and remove them any time."""

    kind = "app"

    def __init__(self) -> None:
        self._pools: dict[int, tuple[Pool, Mapping[str, str] | None]] = {}
        self._groups: dict[int, tuple[GroupLike, Mapping[str, str] | None]] = {}
        self.started = time.time()

    def add(self, pool: Observable, labels: Mapping[str, str] | None = None) -> None:
        """Observe ``pool`` (or every member of a pool group), with ``labels`` on top."""
        if not isinstance(pool, Pool):
            self._groups[id(pool)] = (pool, dict(labels) if labels else None)
            return
        mine = pool_labels(pool, labels)
        for other, extra in self._pools.values():
            if other is not pool and pool_labels(other, extra) == mine:
                raise ValueError(
                    f"pool {pool.name!r} has the same labels as another observed pool; "
                    f"give it a distinct name= or labels= ({mine})"
                )
        self._pools[id(pool)] = (pool, dict(labels) if labels else None)

    def remove(self, pool: Observable) -> None:
        self._pools.pop(id(pool), None)
        self._groups.pop(id(pool), None)

    @property
    def pools(self) -> list[Pool]:
        return [pool for pool, _ in self._pools.values()]

    def view(self) -> View:
        views = tuple(
            PoolView(
                name=pool.name,
                labels=_frozen(pool_labels(pool, extra)),
                stats=pool.stats(),
                ready=pool.is_ready(),
                settings=_frozen(config_settings(pool)),
            )
            for pool, extra in self._pools.values()
        )
        for group, extra in self._groups.values():
            views += tuple(group_views(group, extra))
        now = time.time()
        return View("app", now, now - self.started, millpond.__version__, views)


Pools = Observable | Iterable[Observable] | Mapping[str, Observable]


def pools_source(pools: Pools) -> PoolsSource:
    """A source for a pool or group, several, or a mapping whose keys become ``role``."""
    source = PoolsSource()
    if isinstance(pools, Mapping):
        for role, pool in pools.items():
            source.add(pool, {"role": str(role)})
    elif isinstance(pools, Pool) or not isinstance(pools, Iterable):
        source.add(pools)
    else:
        for pool in pools:
            source.add(pool)
    return source


# --------------------------------------------------------------------------- the proxy


class ProxySource:
    """A running ``millpond proxy``: its pools, its clients, the admin console's rows."""

    kind = "proxy"

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.started = time.time()

    def view(self) -> View:
        from millpond.proxy.admin_show import client_state, pool_rows

        proxy = self.proxy
        proxy.release_kept()  # the pools as they would be without server affinity
        rows = {(r.database, r.user): r for r in pool_rows(proxy)}
        clients, per_pool = _count_clients(proxy, client_state)
        pools = tuple(
            _proxy_pool_view(pool, rows.get(key), per_pool.get(key, {}))
            for key, pool in sorted(proxy.pools.items())
        )
        s = proxy.config.settings
        part = ProxyPart(
            clients=_frozen(clients),
            max_client_conn=int(getattr(s, "max_client_conn", 0) or 0),
            pinned=sum(
                1 for c in proxy.clients if getattr(getattr(c, "session", None), "pinned", 0)
            ),
            logins=proxy.login_stats.logins,
            login_failures=proxy.login_stats.login_failures,
            shutting_down=proxy.shutting_down,
            paused=bool(getattr(proxy, "paused", False)),
            listen=tuple(getattr(proxy, "addresses", ())),
            settings=_frozen(_proxy_settings(s)),
        )
        now = time.time()
        return View("proxy", now, now - self.started, millpond.__version__, pools, part)


def _count_clients(
    proxy: Proxy, client_state: Any
) -> tuple[dict[str, int], dict[tuple[str, str], dict[str, int]]]:
    total = dict.fromkeys(CLIENT_STATES, 0)
    per_pool: dict[tuple[str, str], dict[str, int]] = {}
    for client in proxy.clients:
        if client.admin is not None:
            total["admin"] += 1
            continue
        state = client_state(client)
        if state is None:
            if getattr(client.state, "value", "") != "closed":
                total["login"] += 1
            continue
        total[state] = total.get(state, 0) + 1
        pool = client.pool
        if pool is not None:
            counts = per_pool.setdefault((pool.database, pool.user), {})
            counts[state] = counts.get(state, 0) + 1
    if proxy.door is not None:  # the door's guests: in lanes, with no Python objects
        for pool in proxy.pools.values():
            lane = pool.lane.lane if pool.lane is not None else None
            for side in lane.sides() if lane is not None else ():
                if side.guest and side.active:
                    state = "active" if side.linked else "waiting" if side.queued else "idle"
                    total[state] += 1
                    counts = per_pool.setdefault((pool.database, pool.user), {})
                    counts[state] = counts.get(state, 0) + 1
    return total, per_pool


def _proxy_pool_view(pool: ServerPool, row: Any, clients: Mapping[str, int]) -> PoolView:
    c = pool.counters
    servers = {state: int(getattr(row, f"sv_{state}", 0)) for state in SERVER_STATES}
    part = ProxyPoolPart(
        mode=pool.mode,
        paused=bool(getattr(pool, "paused", False)),
        clients=_frozen({state: clients.get(state, 0) for state in CLIENT_STATES[:3]}),
        servers=_frozen(servers),
        max_wait=float(getattr(row, "maxwait", 0.0)),
        xacts=c.xact_count,
        queries=c.query_count,
        bytes_received=c.bytes_received,
        bytes_sent=c.bytes_sent,
        xact_time=float(getattr(c, "xact_time", 0.0)),
        query_time=float(getattr(c, "query_time", 0.0)),
        errors=_frozen(dict(getattr(c, "errors", {}) or {})),
        pinned=int(getattr(c, "pinned", 0)),
    )
    settings = config_settings(pool)
    settings["pool_mode"] = pool.mode
    return PoolView(
        name=pool.name,
        labels=_frozen(_proxy_labels(pool)),
        stats=pool.stats(),
        ready=pool.is_ready(),
        settings=_frozen(settings),
        proxy=part,
    )


def _proxy_labels(pool: ServerPool) -> dict[str, str]:
    target = getattr(getattr(pool, "server_driver", None), "target", None)
    host = ""
    if target is not None:
        where = target.host or f"{target.socket_dir}/.s.PGSQL"
        host = f"{where}:{target.port}"
    return {
        "pool_name": pool.name,
        "database": pool.database,
        "user": pool.user,
        "host": host,
        "role": "primary",
    }


_PROXY_SETTINGS = (
    "pool_mode", "default_pool_size", "min_pool_size", "reserve_pool_size", "max_client_conn",
    "max_db_connections", "max_user_connections", "query_wait_timeout", "query_timeout",
    "server_idle_timeout", "server_lifetime", "server_connect_timeout", "client_idle_timeout",
    "idle_transaction_timeout", "auth_type", "stats_period",
)  # fmt: skip


def _proxy_settings(settings: Any) -> dict[str, Any]:
    found = {name: getattr(settings, name) for name in _PROXY_SETTINGS if hasattr(settings, name)}
    return {k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
            for k, v in found.items()}  # fmt: skip


# --------------------------------------------------------------------------- JSON


def histogram_json(h: HistogramSnapshot) -> dict[str, Any]:
    """count, sum, max, percentiles, and the non-empty buckets as ``[upper_s, count]``."""
    return {
        "count": h.count,
        "sum": h.sum,
        "max": h.max,
        "p50": h.p50,
        "p90": h.p90,
        "p99": h.p99,
        "buckets": [[_UPPER[i], n] for i, n in enumerate(h.buckets) if n],
    }


def stats_json(s: PoolStats) -> dict[str, Any]:
    """A PoolStats as JSON (fields added later, like the breaker's, read defensively)."""
    out: dict[str, Any] = {
        name: getattr(s, name)
        for name in (
            "min_size", "max_size", "size", "idle", "in_use", "connecting", "resetting",
            "waiting", "acquires", "waits", "timeouts", "rejected", "connect_errors",
            "leaks", "resets", "oldest_lease_age",
        )
    }  # fmt: skip
    out["opened"] = s.connections_opened
    out["closed"] = dict(s.connections_closed)
    out["breaker_state"] = str(getattr(s, "breaker_state", "disabled"))
    for name in ("breaker_opened", "breaker_rejected", "retries", "retry_giveups"):
        out[name] = int(getattr(s, name, 0))
    out["wait_time"] = histogram_json(s.wait_time)
    out["use_time"] = histogram_json(s.use_time)
    create = getattr(s, "create_time", None)
    if isinstance(create, HistogramSnapshot):
        out["create_time"] = histogram_json(create)
    return out


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def pool_json(pool: PoolView) -> dict[str, Any]:
    out: dict[str, Any] = {"name": pool.name, "labels": dict(pool.labels), "ready": pool.ready}
    out.update(stats_json(pool.stats))
    out["settings"] = {k: _json_value(v) for k, v in pool.settings.items()}
    p = pool.proxy
    if p is not None:
        out["proxy"] = {
            "mode": p.mode,
            "paused": p.paused,
            "clients": dict(p.clients),
            "servers": dict(p.servers),
            "max_wait": p.max_wait,
            "xacts": p.xacts,
            "queries": p.queries,
            "bytes_received": p.bytes_received,
            "bytes_sent": p.bytes_sent,
            "xact_time": p.xact_time,
            "query_time": p.query_time,
            "errors": dict(p.errors),
            "pinned": p.pinned,
        }
    return out


def unique_keys(pools: list[dict[str, Any]]) -> None:
    """Give each pool a ``key`` unique in the snapshot: its name, else name@role, else #n."""
    seen: set[str] = set()
    for n, pool in enumerate(pools):
        key = pool["name"]
        if key in seen:
            key = f"{key}@{pool['labels'].get('role', '')}"
        if key in seen:
            key = f"{key}#{n}"
        seen.add(key)
        pool["key"] = key


def view_json(view: View) -> dict[str, Any]:
    """The whole view as JSON-ready data (``/api/snapshot``)."""
    out: dict[str, Any] = {
        "kind": view.kind,
        "version": view.version,
        "time": view.time,
        "uptime": view.uptime,
        "pools": [pool_json(p) for p in view.pools],
    }
    unique_keys(out["pools"])
    px = view.proxy
    if px is not None:
        out["proxy"] = {
            "clients": dict(px.clients),
            "max_client_conn": px.max_client_conn,
            "pinned": px.pinned,
            "logins": px.logins,
            "login_failures": px.login_failures,
            "shutting_down": px.shutting_down,
            "paused": px.paused,
            "listen": list(px.listen),
            "settings": dict(px.settings),
        }
    return out
