"""The pool core and the library pool built on it."""

from millpond.pool.core import PoolCore, Release
from millpond.pool.pool import Pool, create_pool
from millpond.pool.state import CloseReason, SlotState
from millpond.pool.stats import HistogramSnapshot, PoolStats

__all__ = [
    "CloseReason",
    "HistogramSnapshot",
    "Pool",
    "PoolCore",
    "PoolStats",
    "Release",
    "SlotState",
    "create_pool",
]
