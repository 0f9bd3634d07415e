"""millpond: database connection pooling for Python.

A fast, safe pool inside your asyncio process (:func:`create_pool`), and a
PgBouncer-compatible pooling proxy (``millpond proxy``), built on one pool core.
"""

from millpond.config import PoolConfig
from millpond.errors import (
    CircuitOpen,
    CommitUnknown,
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
from millpond.resilience import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    is_retryable,
    retry_call,
)

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "CloseReason",
    "CommitUnknown",
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
    "RetryPolicy",
    "SlotState",
    "__version__",
    "create_pool",
    "is_retryable",
    "retry_call",
]
