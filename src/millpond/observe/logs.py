"""Structured logs: a JSON formatter, and periodic statistics lines instead of per-query ones.

Nothing here logs on the hot path. :class:`StatsLogger` wakes every ``period`` seconds,
takes a snapshot, and logs one line per pool with the period's rates and waits (for the
proxy, PgBouncer's ``log_stats`` line every ``stats_period``), plus a warning when
acquires were slow or timed out in the period. Events the pool and the proxy log
themselves (connect failures, leaks with their stack, breaker changes, logins and
disconnections under ``log_connections``/``log_disconnections``) come out through the
same ``logging`` loggers (``millpond.pool``, ``millpond.proxy``), so
:class:`JsonFormatter` turns all of them into one JSON object per line::

    millpond.observe.logs.configure(json=True)        # or wire JsonFormatter yourself
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from millpond.observe.series import derive
from millpond.observe.snapshot import Pools, ProxySource, Source, pools_source, view_json
from millpond.pool.janitor import Janitor

if TYPE_CHECKING:
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.stats")

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = (
                    value if isinstance(value, str | int | float | bool | None) else str(value)
                )
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure(
    *, json: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send millpond's loggers to ``stream`` (stderr), as JSON lines or as text."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger("millpond")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def _us(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1_000_000)


def _slow(new: Mapping[str, Any], old: Mapping[str, Any] | None, threshold: float) -> int:
    """Acquires in the period whose wait fell in buckets above ``threshold`` seconds."""
    before = {float(u): n for u, n in (old or {}).get("wait_time", {}).get("buckets", [])}
    return int(
        sum(
            n - before.get(float(u), 0)
            for u, n in new.get("wait_time", {}).get("buckets", [])
            if float(u) > threshold
        )
    )


class StatsLogger:
    """Every ``period`` seconds, one statistics line per pool (and warnings if slow)."""

    def __init__(self, source: Source, period: float = 60.0, slow_acquire: float = 0.1) -> None:
        self.source = source
        self.period = period
        self.slow_acquire = slow_acquire
        self._last: Mapping[str, Any] | None = None
        self._janitor = Janitor("stats-log", self.tick, period)

    def start(self) -> None:
        self._last = view_json(self.source.view())
        self._janitor.start()

    async def stop(self) -> None:
        await self._janitor.stop()

    def tick(self) -> None:
        try:
            new = view_json(self.source.view())
        except Exception:
            log.exception("taking the statistics snapshot failed")
            return
        old, self._last = self._last, new
        point = derive(new, old)
        before = {p.get("key"): p for p in (old or {}).get("pools", [])}
        for pool in new["pools"]:
            key = pool["key"]
            p = point["pools"].get(key, {})
            self._line(pool, p)
            self._warn(pool, before.get(key), p)

    def _line(self, pool: Mapping[str, Any], p: Mapping[str, Any]) -> None:
        px = pool.get("proxy")
        fields = {"pool": pool["key"], **{k: v for k, v in p.items() if v is not None}}
        if px is not None:  # PgBouncer's log_stats line
            log.info(
                "stats: %s %.0f xacts/s, %.0f queries/s, in %.0f B/s, out %.0f B/s, "
                "wait p99 %d us, use %d us",
                pool["key"], p.get("xact_rate") or 0, p.get("query_rate") or 0,
                p.get("recv_rate") or 0, p.get("sent_rate") or 0, _us(p.get("wait_p99")),
                _us(p.get("use_mean")), extra=fields,
            )  # fmt: skip
            return
        log.info(
            "stats: pool %r %.1f acquires/s, wait p99 %d us, use %d us, in use %d/%d, waiting %d",
            pool["key"], p.get("acquire_rate") or 0, _us(p.get("wait_p99")),
            _us(p.get("use_mean")), pool["in_use"], pool["max_size"], pool["waiting"],
            extra=fields,
        )  # fmt: skip

    def _warn(self, pool: Mapping[str, Any], old: Mapping[str, Any] | None, p: Any) -> None:
        slow = _slow(pool, old, self.slow_acquire)
        timeouts = pool.get("timeouts", 0) - (old or pool).get("timeouts", 0)
        if slow or timeouts:
            log.warning(
                "pool %r: %d slow acquires (waited over %g ms) and %d timeouts in the last "
                "%g s; wait p99 %d us, %d waiting now",
                pool["key"], slow, self.slow_acquire * 1000, timeouts, self.period,
                _us(p.get("wait_p99")), pool["waiting"],
                extra={"pool": pool["key"], "slow_acquires": slow, "timeouts": timeouts},
            )  # fmt: skip


def start_stats_logger(proxy: Proxy) -> StatsLogger | None:
    """PgBouncer's ``log_stats`` for the proxy: a line per pool every ``stats_period``."""
    s = proxy.config.settings
    if not getattr(s, "log_stats", True):
        return None
    logger = StatsLogger(ProxySource(proxy), float(getattr(s, "stats_period", 60)))
    logger.start()
    return logger


def log_stats(
    pools: Pools,
    *,
    period: float = 60.0,
    slow_acquire: float = 0.1,
) -> StatsLogger:
    """Log library pools' statistics every ``period`` seconds (call inside the event loop)."""
    logger = StatsLogger(pools_source(pools), period, slow_acquire)
    logger.start()
    return logger
