"""Resilience: backoff, circuit breaker, retry policy, and timeouts that hold.

These pieces work on their own (around any coroutine) and inside the pool: the pool
reconnects with :class:`Backoff`, guards its connection attempts with a
:class:`CircuitBreaker`, and ``pool.run_transaction(fn, retry=RetryPolicy(...))``
re-runs whole transactions on errors :func:`is_retryable` accepts.
"""

from millpond.resilience.backoff import Backoff
from millpond.resilience.breaker import BreakerState, CircuitBreaker
from millpond.resilience.retry import (
    RETRYABLE_SQLSTATES,
    RetryPolicy,
    is_retryable,
    retry_call,
    sqlstate,
)
from millpond.resilience.timeouts import hard_timeout

__all__ = [
    "RETRYABLE_SQLSTATES",
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "RetryPolicy",
    "hard_timeout",
    "is_retryable",
    "retry_call",
    "sqlstate",
]
