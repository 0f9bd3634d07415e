"""A circuit breaker: closed, open, half-open.

- **closed**: calls go through; ``threshold`` consecutive failures open the breaker.
- **open**: calls are refused at once with :class:`~millpond.errors.CircuitOpen`
  (the last failure chained as ``__cause__``) until ``recovery`` seconds have passed.
- **half-open**: the first ``probes`` calls after that go through as trials; when all
  of them succeed the breaker closes, and any failure opens it again.

The state machine is synchronous and takes the time as an argument, so the pool core
can drive it from inside its decisions (no I/O, no awaits). Standalone, wrap any
coroutine: ``async with breaker: ...`` or ``await breaker.call(fn, *args)``.

Which exceptions count as failures is decided by ``is_failure`` (default: every
``Exception``; cancellation never counts). The ``on_change(old, new)`` hook runs
synchronously on every transition; it must not block (schedule async work yourself).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from time import monotonic
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from millpond.errors import CircuitOpen

log = logging.getLogger("millpond.resilience")

P = ParamSpec("P")
T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_B = BreakerState

#: For each state, the states it may move to (``reset()`` may close from any state).
LEGAL_MOVES: dict[BreakerState, frozenset[BreakerState]] = {
    _B.CLOSED: frozenset({_B.OPEN}),
    _B.OPEN: frozenset({_B.HALF_OPEN, _B.CLOSED}),
    _B.HALF_OPEN: frozenset({_B.OPEN, _B.CLOSED}),
}

StateHook = Callable[[BreakerState, BreakerState], object]


def _every_exception(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class CircuitBreaker:
    """Fail fast while a dependency is down; probe it now and then to see it return."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        recovery: float = 1.0,
        probes: int = 1,
        name: str = "breaker",
        on_change: StateHook | None = None,
        is_failure: Callable[[BaseException], bool] = _every_exception,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"threshold must be a whole number >= 1, got {threshold!r}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a whole number >= 1, got {probes!r}")
        if not recovery >= 0:
            raise ValueError(f"recovery must be zero or more seconds, got {recovery!r}")
        self.threshold = threshold
        self.recovery = recovery
        self.probes = probes
        self.name = name
        self.on_change = on_change
        self.is_failure = is_failure
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive failures while closed
        self.opened = 0  # how many times the breaker opened
        self.rejected = 0  # calls refused while open
        self.opened_at = 0.0
        self.last_error: BaseException | None = None
        self._probing = 0  # trial calls under way (half-open)
        self._probe_successes = 0

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.name!r} {self.state.value} failures={self.failures}/"
            f"{self.threshold} opened={self.opened}>"
        )

    # -- the synchronous state machine ------------------------------------------------

    @property
    def retry_at(self) -> float:
        """When an open breaker lets the next trial call through (clock time)."""
        return self.opened_at + self.recovery

    def would_allow(self, now: float | None = None) -> bool:
        """Would a call be let through now? Changes nothing."""
        if self.state is _B.CLOSED:
            return True
        now = self._clock() if now is None else now
        if self.state is _B.OPEN:
            return now >= self.retry_at
        return self._probing < self.probes

    def allow(self, now: float | None = None) -> bool:
        """Admit one call (True) or refuse it (False, counted in ``rejected``)."""
        if self.state is _B.CLOSED:
            return True
        now = self._clock() if now is None else now
        if self.state is _B.OPEN and now >= self.retry_at:
            self._move(_B.HALF_OPEN)
            self._probing = self._probe_successes = 0
        if self.state is _B.HALF_OPEN and self._probing < self.probes:
            self._probing += 1
            return True
        self.rejected += 1
        return False

    def record_success(self, now: float | None = None) -> None:
        """An admitted call succeeded."""
        if self.state is _B.CLOSED:
            self.failures = 0
        elif self.state is _B.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.probes:
                self._close()
        # Open: a call admitted before the breaker opened; it changes nothing.

    def record_failure(self, error: BaseException | None = None, now: float | None = None) -> None:
        """An admitted call failed; ``error`` becomes the cause of later CircuitOpen errors."""
        if error is not None:
            self.last_error = error
        if self.state is _B.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(now)
        elif self.state is _B.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._open(now)

    def record_ignored(self) -> None:
        """An admitted call ended without a verdict (cancelled, or not a failure)."""
        if self.state is _B.HALF_OPEN:
            self._probing = max(0, self._probing - 1)

    def reset(self) -> None:
        """Close the breaker by hand, forgetting the failures."""
        if self.state is not _B.CLOSED:
            self._close()
        self.failures = 0

    def error(self, now: float | None = None) -> CircuitOpen:
        """The CircuitOpen to raise for a refused call, with the last failure chained."""
        now = self._clock() if now is None else now
        wait = max(0.0, self.retry_at - now)
        last = f": {self.last_error}" if self.last_error is not None else ""
        exc = CircuitOpen(
            f"circuit breaker {self.name!r} is open after {self.threshold} consecutive "
            f"failures; next trial in {wait:.2f}s{last}"
        )
        exc.__cause__ = self.last_error
        return exc

    def _open(self, now: float | None) -> None:
        self.opened_at = self._clock() if now is None else now
        self.opened += 1
        self._probing = self._probe_successes = 0
        self._move(_B.OPEN)

    def _close(self) -> None:
        self.failures = 0
        self._probing = self._probe_successes = 0
        self._move(_B.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old = self.state
        if new not in LEGAL_MOVES[old]:
            raise RuntimeError(f"breaker {self.name!r}: {old.value} -> {new.value} is not legal")
        self.state = new
        hook = self.on_change
        if hook is not None:
            try:
                hook(old, new)
            except Exception:
                log.exception("breaker %r: on_change hook failed", self.name)

    # -- standalone use around any coroutine ---------------------------------------------

    async def __aenter__(self) -> CircuitBreaker:
        now = self._clock()
        if not self.allow(now):
            raise self.error(now)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.record_success()
        elif isinstance(exc, Exception) and self.is_failure(exc):
            self.record_failure(exc)
        else:
            self.record_ignored()

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` through the breaker."""
        async with self:
            return await fn(*args, **kwargs)

    def stats(self) -> dict[str, Any]:
        """State and counters, for logs and dashboards."""
        return {
            "state": self.state.value,
            "failures": self.failures,
            "opened": self.opened,
            "rejected": self.rejected,
        }
