"""Read a running pool's or proxy's snapshot over HTTP, for ``millpond top`` and ``advise``.

Given a stats server's URL, :func:`fetch_snapshot` reads ``/api/snapshot``; given a
``/metrics`` URL (say, an application exporting :class:`PoolCollector` through its own
Prometheus endpoint), it rebuilds the same JSON shape from the metrics, so both tools
work against either.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from millpond.observe.snapshot import LABELS, unique_keys

TIMEOUT = 5.0
_P = "millpond_pool_"
_PX = "millpond_proxy_"
_DB = "db_client_connection_"


class FetchError(Exception):
    """The URL could not be read or did not hold a snapshot or metrics."""


def _get(url: str, accept: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot read {url}: {reason}") from exc


def base_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def fetch_snapshot(url: str) -> dict[str, Any]:
    """The snapshot behind ``url`` (a stats server, or any ``/metrics`` endpoint)."""
    url = base_url(url)
    if url.endswith("/metrics"):
        return snapshot_from_metrics(_metrics_text(url))
    if url.endswith("/api/snapshot"):
        url = url[: -len("/api/snapshot")]
    status, content_type, body = _get(url + "/api/snapshot", "application/json")
    if status == 200 and "json" in content_type:
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError as exc:
            raise FetchError(f"{url}/api/snapshot: not JSON: {exc}") from exc
        return data
    return snapshot_from_metrics(_metrics_text(url + "/metrics"))


def _metrics_text(url: str) -> str:
    status, _, body = _get(url, "text/plain")
    if status != 200:
        raise FetchError(f"{url}: HTTP {status}: {body[:200].decode(errors='replace')}")
    return body.decode()


# --------------------------------------------------------------------------- /metrics


def _pool(pools: dict[tuple[str, ...], dict[str, Any]], labels: dict[str, str]) -> dict[str, Any]:
    key = tuple(labels.get(name, "") for name in LABELS)
    pool = pools.get(key)
    if pool is None:
        pool = pools[key] = {
            "name": labels.get("pool_name", ""),
            "labels": {name: labels.get(name, "") for name in LABELS},
            "closed": {},
            "wait_time": {"count": 0, "sum": 0.0, "cumulative": []},
            "use_time": {"count": 0, "sum": 0.0, "cumulative": []},
            "settings": {},
        }
    return pool


def _proxy_part(pool: dict[str, Any]) -> dict[str, Any]:
    part: dict[str, Any] = pool.setdefault("proxy", {"clients": {}, "servers": {}, "errors": {}})
    return part


def _setter(field: str) -> Callable[[dict[str, Any], dict[str, str], float], None]:
    def put(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
        pool[field] = value

    return put


def _proxy_setter(field: str) -> Callable[[dict[str, Any], dict[str, str], float], None]:
    def put(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
        _proxy_part(pool)[field] = value

    return put


def _by_label(
    field: str, label: str, proxy: bool = False
) -> Callable[[dict[str, Any], dict[str, str], float], None]:
    def put(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
        target = _proxy_part(pool) if proxy else pool
        target.setdefault(field, {})[labels.get(label, "")] = value

    return put


def _state(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
    pool[labels.get("state", "")] = value


def _db_count(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
    pool["_otel_" + labels.get("state", "")] = value


def _breaker(pool: dict[str, Any], labels: dict[str, str], value: float) -> None:
    if value:
        pool["breaker_state"] = labels.get("state", "")


_SAMPLES: dict[str, Callable[[dict[str, Any], dict[str, str], float], None]] = {
    _DB + "count": _db_count,
    _DB + "max": _setter("max_size"),
    _DB + "idle_min": _setter("min_size"),
    _DB + "pending_requests": _setter("waiting"),
    _DB + "timeouts_total": _setter("timeouts"),
    _P + "connections": _state,
    _P + "size": _setter("size"),
    _P + "ready": _setter("ready"),
    _P + "acquires_total": _setter("acquires"),
    _P + "waits_total": _setter("waits"),
    _P + "rejected_total": _setter("rejected"),
    _P + "connections_opened_total": _setter("opened"),
    _P + "connections_closed_total": _by_label("closed", "reason"),
    _P + "connect_errors_total": _setter("connect_errors"),
    _P + "leaks_total": _setter("leaks"),
    _P + "resets_total": _setter("resets"),
    _P + "oldest_lease_seconds": _setter("oldest_lease_age"),
    _P + "breaker_state": _breaker,
    _P + "breaker_opened_total": _setter("breaker_opened"),
    _P + "breaker_rejected_total": _setter("breaker_rejected"),
    _P + "retries_total": _setter("retries"),
    _P + "retry_giveups_total": _setter("retry_giveups"),
    _PX + "clients": _by_label("clients", "state", proxy=True),
    _PX + "servers": _by_label("servers", "state", proxy=True),
    _PX + "max_wait_seconds": _proxy_setter("max_wait"),
    _PX + "pool_paused": _proxy_setter("paused"),
    _PX + "pinned_clients": _proxy_setter("pinned"),
    _PX + "transactions_total": _proxy_setter("xacts"),
    _PX + "queries_total": _proxy_setter("queries"),
    _PX + "received_bytes_total": _proxy_setter("bytes_received"),
    _PX + "sent_bytes_total": _proxy_setter("bytes_sent"),
    _PX + "transaction_time_seconds_sum": _proxy_setter("xact_time"),
    _PX + "query_time_seconds_sum": _proxy_setter("query_time"),
    _PX + "errors_total": _by_label("errors", "code", proxy=True),
}
_HISTOGRAMS = {_DB + "wait_time_seconds": "wait_time", _DB + "use_time_seconds": "use_time"}


def _histogram_sample(
    pool: dict[str, Any], name: str, labels: dict[str, str], value: float
) -> bool:
    for prefix, field in _HISTOGRAMS.items():
        if name.startswith(prefix):
            h = pool[field]
            suffix = name[len(prefix) :]
            if suffix == "_count":
                h["count"] = value
            elif suffix == "_sum":
                h["sum"] = value
            elif suffix == "_bucket":
                h["cumulative"].append((float(labels.get("le", "inf")), value))
            return True
    return False


def _finish_histogram(h: dict[str, Any]) -> None:
    cumulative = sorted(h.pop("cumulative"))
    buckets, before, last = [], 0.0, 0.0
    for le, running in cumulative:
        upper = le if le != float("inf") else max(last * 2, 1.0)
        if running > before:
            buckets.append([upper, running - before])
        before, last = running, upper
    h["buckets"] = buckets


def _finish_pool(pool: dict[str, Any]) -> None:
    pool.setdefault("idle", pool.pop("_otel_idle", 0))
    pool.setdefault("in_use", pool.pop("_otel_used", 0))
    pool.pop("_otel_idle", None)
    pool.pop("_otel_used", None)
    for name in ("connecting", "resetting", "waiting", "min_size", "max_size", "timeouts"):
        pool.setdefault(name, 0)
    pool.setdefault("size", pool["idle"] + pool["in_use"] + pool["connecting"])
    pool.setdefault("breaker_state", "disabled")
    for h in ("wait_time", "use_time"):
        _finish_histogram(pool[h])
    pool.setdefault("acquires", pool["wait_time"]["count"])
    pool["ready"] = bool(pool.get("ready", 1))
    for name, value in list(pool.items()):
        if isinstance(value, float) and value.is_integer() and name != "oldest_lease_age":
            pool[name] = int(value)


def snapshot_from_metrics(text: str) -> dict[str, Any]:
    """The ``/api/snapshot`` JSON shape, rebuilt from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    pools: dict[tuple[str, ...], dict[str, Any]] = {}
    out: dict[str, Any] = {"kind": "app", "version": "", "time": time.time(), "uptime": 0.0}
    clients: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, dict(sample.labels), float(sample.value)
            if name == "millpond_info":
                out["kind"], out["version"] = labels.get("kind", "app"), labels.get("version", "")
            elif name == "millpond_uptime_seconds":
                out["uptime"] = value
            elif name == _PX + "client_connections":
                clients[labels.get("state", "")] = int(value)
            elif "pool_name" in labels:
                pool = _pool(pools, labels)
                if not _histogram_sample(pool, name, labels, value) and name in _SAMPLES:
                    _SAMPLES[name](pool, labels, value)
    for pool in pools.values():
        _finish_pool(pool)
    out["pools"] = list(pools.values())
    unique_keys(out["pools"])
    if clients or out["kind"] == "proxy":
        out["kind"] = "proxy"
        out["proxy"] = {"clients": clients}
    return out
