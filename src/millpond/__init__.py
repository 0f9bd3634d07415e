"""millpond: database connection pooling for Python.

A fast, safe pool inside your asyncio process (:func:`create_pool`), and a
PgBouncer-compatible pooling proxy (``millpond proxy``), built on one pool core.
"""

from millpond.config import PoolConfig
from millpond.errors import (
    CircuitOpen,
    ConfigError,
    DatabaseUnavailable,
    MillpondError,
    PoolClosed,
    PoolError,
    PoolOverloaded,
    PoolTimeout,
    ProtocolError,
)
from millpond.pool import CloseReason, Pool, PoolStats, SlotState, create_pool

__version__ = "0.1.0"

__all__ = [
    "CircuitOpen",
    "CloseReason",
    "ConfigError",
    "DatabaseUnavailable",
    "MillpondError",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolOverloaded",
    "PoolStats",
    "PoolTimeout",
    "ProtocolError",
    "SlotState",
    "__version__",
    "create_pool",
]
