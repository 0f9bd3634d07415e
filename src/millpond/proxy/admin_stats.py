"""The admin console's statistics: SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS.

Totals are summed per database from each pool's counters (the forwarding path's, and the
pool core's lends and waits); averages compare the last two samples taken
``stats_period`` apart, as PgBouncer's do (``src/stats.c``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from millpond.proxy.admin_show import ADMIN_DB, STAT_NAMES, Row

if TYPE_CHECKING:
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy


@dataclass(frozen=True, slots=True)
class StatsTotals:
    """Counters since start, as SHOW STATS_TOTALS shows them (times in microseconds)."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    xact_time: int = 0
    query_time: int = 0
    wait_time: int = 0
    client_parse_count: int = 0
    server_parse_count: int = 0
    bind_count: int = 0

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in STAT_NAMES)

    def __add__(self, other: StatsTotals) -> StatsTotals:
        return StatsTotals(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def averages(self, older: StatsTotals, seconds: float) -> tuple[int, ...]:
        """PgBouncer's averages over a period: rates per second, times per event."""
        if seconds <= 0:
            return (0,) * len(STAT_NAMES)
        d = [a - b for a, b in zip(self.values(), older.values(), strict=True)]

        def per(total: int, count: int) -> int:
            return total // count if count > 0 else 0

        rates = [int(x / seconds) for x in d]
        return (*rates[:5], per(d[5], d[1]), per(d[6], d[2]), per(d[7], d[0]), *rates[8:])


TOTALS_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
    "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
    "ps_bind_count",
)  # fmt: skip


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def pool_totals(pool: ServerPool) -> StatsTotals:
    """One pool's counters (the forwarding path's, and the pool core's lends and waits)."""
    c, core = pool.counters, pool.stats()
    return StatsTotals(
        server_assignment_count=core.acquires,
        xact_count=c.xact_count,
        query_count=c.query_count,
        bytes_received=c.bytes_received,
        bytes_sent=c.bytes_sent,
        xact_time=_us(c.xact_time),
        query_time=_us(c.query_time),
        wait_time=_us(c.wait_time or core.wait_time.sum),
    )


def database_totals(proxy: Proxy, admin: StatsTotals) -> dict[str, StatsTotals]:
    """Totals per database (pools summed), the console's own as ``pgbouncer``."""
    totals = {ADMIN_DB: admin}
    for pool in proxy.pools.values():
        totals[pool.database] = totals.get(pool.database, StatsTotals()) + pool_totals(pool)
    return dict(sorted(totals.items()))


class StatsHistory:
    """The last two samples of the totals, ``stats_period`` apart, for the averages."""

    def __init__(self) -> None:
        self.older: tuple[float, dict[str, StatsTotals]] | None = None
        self.newer: tuple[float, dict[str, StatsTotals]] | None = None

    def sample(self, totals: dict[str, StatsTotals], now: float) -> None:
        self.older, self.newer = self.newer, (now, dict(totals))

    def averages(self, database: str) -> tuple[int, ...]:
        if self.older is None or self.newer is None:
            return (0,) * len(STAT_NAMES)
        (then, old), (now, new) = self.older, self.newer
        zero = StatsTotals()
        return new.get(database, zero).averages(old.get(database, zero), now - then)


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One database's totals and last-period averages (SHOW STATS and friends)."""

    database: str
    totals: StatsTotals
    averages: tuple[int, ...]


def stats_rows(proxy: Proxy, admin: StatsTotals, history: StatsHistory) -> tuple[StatsRow, ...]:
    totals = database_totals(proxy, admin)
    return tuple(StatsRow(db, t, history.averages(db)) for db, t in totals.items())


def totals_rows(rows: Sequence[StatsRow]) -> tuple[Row, ...]:
    """SHOW TOTALS: SHOW STATS summed over every database, one value per row."""
    total, avgs = StatsTotals(), [0] * len(STAT_NAMES)
    for row in rows:
        total = total + row.totals
        avgs = [a + b for a, b in zip(avgs, row.averages, strict=True)]
    return (
        *((f"total_{n}", v) for n, v in zip(TOTALS_NAMES, total.values(), strict=True)),
        *((f"avg_{n}", v) for n, v in zip(TOTALS_NAMES, avgs, strict=True)),
    )
