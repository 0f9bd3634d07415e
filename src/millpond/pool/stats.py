"""Statistics: cheap counters on the hot path, immutable snapshots for readers.

Readers (``Pool.stats()``, metrics, the admin console) only ever see a frozen
:class:`PoolStats`; nothing outside the pool touches the live counters.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from millpond.pool.state import CloseReason

# Histogram buckets: 4 per power of two of microseconds, up to ~2^36 us (19 hours).
_SUB = 4
_OCTAVES = 37
_NBUCKETS = _OCTAVES * _SUB


def _bucket(us: int) -> int:
    """Bucket index for a duration in whole microseconds (about 19% wide buckets)."""
    if us < _SUB:
        return max(us, 0)
    bits = us.bit_length()
    idx = (bits - 2) * _SUB + ((us >> (bits - 3)) & (_SUB - 1))
    return idx if idx < _NBUCKETS else _NBUCKETS - 1


def _bucket_upper_us(idx: int) -> float:
    """The largest duration (in microseconds) that falls in bucket ``idx``."""
    if idx < _SUB:
        return float(idx)
    octave, sub = divmod(idx, _SUB)
    bits = octave + 2
    low = (1 << (bits - 1)) | (sub << (bits - 3))
    return float(low + (1 << (bits - 3)) - 1)


class PyHistogramBase:
    """A log-bucketed duration histogram's data and its O(1) record (the reference for
    the compiled twin in :mod:`millpond.pool._histogram`)."""

    __slots__ = ("buckets", "count", "max", "sum")

    def __init__(self) -> None:
        # Contiguous machine integers: an increment touches one cache line and
        # allocates nothing (a list of ints would swap int objects on every record).
        self.buckets = array("Q", bytes(8 * _NBUCKETS))
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds
        us = int(seconds * 1_000_000)
        if us < _SUB:  # _bucket, inlined: this runs on every lease
            self.buckets[us if us > 0 else 0] += 1
            return
        bits = us.bit_length()
        idx = (bits - 2) * _SUB + ((us >> (bits - 3)) & (_SUB - 1))
        self.buckets[idx if idx < _NBUCKETS else _NBUCKETS - 1] += 1


#: What Histogram builds on: the compiled twin when millpond was built with a C compiler
#: (the same attributes and record(); the tests hold the two to the same results).
if TYPE_CHECKING:
    HistogramBase = PyHistogramBase
else:
    try:
        from millpond.pool._histogram import HistogramBase
    except ImportError:  # pragma: no cover - a build without a C compiler
        HistogramBase = PyHistogramBase


class Histogram(HistogramBase):
    """A log-bucketed duration histogram: O(1) record, percentiles within ~19%."""

    __slots__ = ()

    def snapshot(self, zeros: int = 0) -> HistogramSnapshot:
        """A frozen copy. ``zeros``: that many more samples of 0 s, counted elsewhere
        (a pool's immediate acquisitions: the hot path need not touch the histogram)."""
        buckets = list(self.buckets)
        buckets[0] += zeros
        count = self.count + zeros
        return HistogramSnapshot(
            count=count,
            sum=self.sum,
            max=self.max,
            p50=self._quantile(buckets, count, 0.50),
            p90=self._quantile(buckets, count, 0.90),
            p99=self._quantile(buckets, count, 0.99),
            buckets=tuple(buckets),
        )

    def _quantile(self, buckets: list[int], count: int, q: float) -> float:
        if not count:
            return 0.0
        rank = q * count
        seen = 0
        for idx, n in enumerate(buckets):
            seen += n
            if seen >= rank and n:
                return min(_bucket_upper_us(idx) / 1_000_000, self.max)
        return self.max


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Durations in seconds: count, sum, max and estimated percentiles."""

    count: int
    sum: float
    max: float
    p50: float
    p90: float
    p99: float
    buckets: tuple[int, ...] = field(repr=False)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @staticmethod
    def bucket_upper_bounds() -> tuple[float, ...]:
        """Upper bound in seconds of each bucket, for exporters."""
        return tuple(_bucket_upper_us(i) / 1_000_000 for i in range(_NBUCKETS))


class Counters:
    """The live, mutable counters a pool keeps. Only the pool writes them."""

    __slots__ = (
        "acquires",
        "breaker_rejected",
        "closed",
        "connect_errors",
        "leaks",
        "opened",
        "rejected",
        "resets",
        "retries",
        "retry_giveups",
        "timeouts",
        "use_time",
        "wait_time",
        "waits",
    )

    def __init__(self) -> None:
        self.acquires = 0
        self.waits = 0
        self.timeouts = 0
        self.rejected = 0
        self.opened = 0
        self.closed = dict.fromkeys(CloseReason, 0)
        self.connect_errors = 0
        self.leaks = 0
        self.resets = 0
        self.breaker_rejected = 0
        self.retries = 0
        self.retry_giveups = 0
        self.wait_time = Histogram()
        self.use_time = Histogram()


@dataclass(frozen=True, slots=True)
class PoolStats:
    """An immutable snapshot of a pool at one moment."""

    name: str
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    connecting: int
    resetting: int
    waiting: int
    acquires: int
    waits: int
    timeouts: int
    rejected: int
    connections_opened: int
    connections_closed: Mapping[str, int]
    connect_errors: int
    leaks: int
    resets: int
    oldest_lease_age: float
    wait_time: HistogramSnapshot
    use_time: HistogramSnapshot
    #: "closed", "open", "half_open", or "disabled" (breaker_threshold=0)
    breaker_state: str = "disabled"
    #: how many times the circuit breaker opened
    breaker_opened: int = 0
    #: acquires failed at once with CircuitOpen instead of waiting
    breaker_rejected: int = 0
    #: transactions re-run by run_transaction, and retryable errors it gave up on
    retries: int = 0
    retry_giveups: int = 0

    @property
    def connections_closed_total(self) -> int:
        return sum(self.connections_closed.values())

    def describe(self) -> str:
        """A one-line human summary, used in error messages and logs."""
        return (
            f"size={self.size}/{self.max_size} idle={self.idle} in_use={self.in_use} "
            f"connecting={self.connecting} waiting={self.waiting} "
            f"oldest_lease={self.oldest_lease_age:.3f}s"
            + (f" breaker={self.breaker_state}" if self.breaker_state in _TRIPPED else "")
        )


_TRIPPED = frozenset({"open", "half_open"})


def closed_mapping(closed: dict[CloseReason, int]) -> Mapping[str, int]:
    return MappingProxyType({reason.value: n for reason, n in closed.items()})
