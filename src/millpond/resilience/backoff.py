"""Exponential backoff with equal jitter.

``Backoff(base, cap)`` gives, for the n-th consecutive failure (counting from 0), a
delay drawn uniformly from ``[ceiling/2, ceiling]`` where ``ceiling = min(cap, base *
factor**n)``. This is *equal jitter*. We use it (rather than full jitter, uniform in
``[0, ceiling]``) for both reconnecting and retrying because:

- it keeps a floor: after a failure the next attempt is at least ``ceiling/2`` away,
  so "at most N attempts per backoff window" is a real bound and a database that is
  coming back is not hit again within microseconds;
- it still spreads callers over half the window, which is what breaks up lockstep
  retries (many pools, or many transactions that conflicted at the same moment).

Full jitter minimises total work when very many independent clients contend for one
resource; here contention is already bounded (``max_concurrent_connects``, a bounded
number of transactions), and the floor matters more.

A :class:`Backoff` is an immutable description; the caller keeps the failure count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from millpond.errors import ConfigError

#: Exponents beyond this are treated as "at the cap" (avoids float overflow).
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of ``base * factor**n``, capped at ``cap``, with equal jitter.

    If ``cap < base`` the cap wins: every delay is at most ``cap``.
    """

    base: float
    cap: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("base", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(name, f"must be a number of seconds above zero, got {value!r}")
        if isinstance(self.factor, bool) or not self.factor >= 1:
            raise ConfigError("factor", f"must be at least 1, got {self.factor!r}")

    def ceiling(self, failures: int) -> float:
        """The largest delay after ``failures + 1`` consecutive failures (``failures >= 0``)."""
        exponent = min(max(failures, 0), _MAX_EXPONENT)
        try:
            grown = self.base * self.factor**exponent
        except OverflowError:
            return self.cap
        return min(self.cap, grown)

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """A jittered delay in ``[ceiling/2, ceiling]``; ``rng`` returns floats in [0, 1)."""
        top = self.ceiling(failures)
        return top / 2 + top / 2 * rng()

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """An endless sequence of jittered delays for failures 0, 1, 2, ..."""
        failures = 0
        while True:
            yield self.delay(failures, rng)
            failures += 1
