"""Frozen, validated pool settings.

Every setting is keyword-only; a bad value raises :class:`~millpond.errors.ConfigError`
naming the setting and saying what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from millpond.errors import ConfigError

ResetPolicy = Literal["auto", "always"]


def _positive_or_none(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"expected a number of seconds or None, got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        accepted = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(name, f"must be {accepted} seconds (or None to disable), got {value!r}")


def _int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"expected a whole number, got {value!r}")
    if value < low:
        raise ConfigError(name, f"must be at least {low}, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """The settings of one pool. Times are in seconds; ``None`` disables a limit."""

    #: connections kept open even when idle (prewarmed by ``open(wait=True)``)
    min_size: int = 1
    #: most connections the pool will ever hold
    max_size: int = 10
    #: how long ``acquire`` waits before raising PoolTimeout (never infinite by default)
    acquire_timeout: float = 30.0
    #: most callers allowed to wait at once; 0 means no limit
    max_waiting: int = 0
    #: close connections idle this long, above ``min_size``
    max_idle: float | None = 600.0
    #: recycle connections older than this (each gets its own jitter)
    max_lifetime: float | None = 3600.0
    #: fraction of ``max_lifetime`` by which each connection's lifetime is shortened at random
    lifetime_jitter: float = 0.1
    #: recycle a connection after this many leases; 0 means no limit
    max_uses: int = 0
    #: how long one connection attempt may take
    connect_timeout: float = 10.0
    #: most connection attempts under way at once (no connect storms)
    max_concurrent_connects: int = 2
    #: ping a connection before lending it if it sat idle longer than this
    validate_idle_after: float | None = 10.0
    #: how often idle connections are pinged in the background
    health_check_interval: float | None = 60.0
    #: report a lease held longer than this, with where it was acquired
    leak_threshold: float | None = None
    #: "auto": reset session state only when a borrower left some; "always": every release
    reset: ResetPolicy = "auto"
    #: how long a reset, ping or graceful close may take before the connection is dropped
    reset_timeout: float = 5.0
    #: first delay between failed connection attempts (doubles up to the cap, with jitter)
    reconnect_delay: float = 0.1
    #: longest delay between failed connection attempts
    reconnect_delay_max: float = 5.0
    #: consecutive failed connection rounds that open the circuit breaker; 0 disables it
    breaker_threshold: int = 5
    #: least time the breaker stays open before a trial connection (it also waits out
    #: the reconnect backoff)
    breaker_recovery: float = 1.0
    #: trial connections that must succeed, half-open, before the breaker closes
    breaker_probes: int = 1

    def __post_init__(self) -> None:
        _int_at_least("min_size", self.min_size, 0)
        _int_at_least("max_size", self.max_size, 1)
        if self.min_size > self.max_size:
            raise ConfigError(
                "min_size", f"must not exceed max_size ({self.min_size} > {self.max_size})"
            )
        _positive_or_none("acquire_timeout", self.acquire_timeout)
        if self.acquire_timeout is None:
            raise ConfigError("acquire_timeout", "must be a number of seconds; None is not allowed")
        _int_at_least("max_waiting", self.max_waiting, 0)
        for name in ("max_idle", "max_lifetime", "validate_idle_after", "leak_threshold"):
            _positive_or_none(name, getattr(self, name))
        _positive_or_none("health_check_interval", self.health_check_interval)
        if not 0 <= self.lifetime_jitter < 1:
            raise ConfigError("lifetime_jitter", f"must be in [0, 1), got {self.lifetime_jitter!r}")
        _int_at_least("max_uses", self.max_uses, 0)
        for name in ("connect_timeout", "reset_timeout", "reconnect_delay", "reconnect_delay_max"):
            _positive_or_none(name, getattr(self, name))
            if getattr(self, name) is None:
                raise ConfigError(name, "must be a number of seconds; None is not allowed")
        _int_at_least("max_concurrent_connects", self.max_concurrent_connects, 1)
        _int_at_least("breaker_threshold", self.breaker_threshold, 0)
        _positive_or_none("breaker_recovery", self.breaker_recovery, allow_zero=True)
        if self.breaker_recovery is None:
            raise ConfigError(
                "breaker_recovery", "must be a number of seconds; None is not allowed"
            )
        _int_at_least("breaker_probes", self.breaker_probes, 1)
        if self.reset not in ("auto", "always"):
            raise ConfigError("reset", f"must be 'auto' or 'always', got {self.reset!r}")

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))
