"""Settings of a pool group, and how its members are described.

:class:`GroupConfig` is frozen and validated like :class:`~millpond.config.PoolConfig`:
every setting is keyword-only and a bad value raises
:class:`~millpond.errors.ConfigError` naming it. :class:`Member` describes one server
of the group (a DSN or a ready :class:`~millpond.Pool`, a weight, pool settings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from millpond.errors import ConfigError

if TYPE_CHECKING:
    from millpond.pool.pool import Pool

BALANCE = ("round_robin", "least_in_use")
NO_REPLICA = ("primary", "fail")


def _seconds(name: str, value: object, *, allow_none: bool, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(name, "must be a number of seconds; None is not allowed")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(name, f"expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        accepted = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(name, f"must be {accepted} seconds, got {value!r}")


def _whole(name: str, value: object, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"expected a whole number, got {value!r}")
    if value < low:
        raise ConfigError(name, f"must be at least {low}, got {value}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupConfig:
    """How a group routes, balances and watches its members. Times are in seconds."""

    #: how reads are spread over replicas: "round_robin" or "least_in_use" (both weighted)
    balance: str = "round_robin"
    #: most replay lag (seconds) a replica may have and stay in rotation; None: no bound
    max_lag: float | None = 10.0
    #: most replay lag in bytes of WAL behind the primary; None: no bound
    max_lag_bytes: int | None = None
    #: how often every member's role and lag are checked in the background
    check_interval: float = 1.0
    #: how long one member's check may take before it counts as unreachable
    check_timeout: float = 2.0
    #: where reads go when no replica is usable: "primary", or "fail" (NoReplicaAvailable)
    no_replica: str = "primary"
    #: None: off; seconds: a caller's reads go to the primary that long after it wrote;
    #: "lsn": until the replicas have replayed the primary's WAL position after the write
    read_your_writes: float | str | None = None
    #: how long a write waits for a primary to be found when none is known (0: fail at once)
    wait_for_primary: float = 0.0
    #: most members one automatically routed read is tried on (a replica that fails is
    #: left for the next one)
    read_attempts: int = 3
    #: how many distinct queries' routing verdicts are remembered
    cache_size: int = 4096
    #: functions (``name`` or ``schema.name``) to treat as read-only, besides the built-ins
    read_only_functions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _choice("balance", self.balance, BALANCE)
        _seconds("max_lag", self.max_lag, allow_none=True, allow_zero=True)
        _whole("max_lag_bytes", self.max_lag_bytes, 0, allow_none=True)
        _seconds("check_interval", self.check_interval, allow_none=False)
        _seconds("check_timeout", self.check_timeout, allow_none=False)
        _choice("no_replica", self.no_replica, NO_REPLICA)
        ryw = self.read_your_writes
        if isinstance(ryw, str):
            if ryw != "lsn":
                raise ConfigError(
                    "read_your_writes", f"must be seconds, 'lsn' or None, not {ryw!r}"
                )
        else:
            _seconds("read_your_writes", ryw, allow_none=True)
        _seconds("wait_for_primary", self.wait_for_primary, allow_none=False, allow_zero=True)
        _whole("read_attempts", self.read_attempts, 1)
        _whole("cache_size", self.cache_size, 0)
        if isinstance(self.read_only_functions, str):
            raise ConfigError("read_only_functions", "expected a sequence of names, not a string")
        object.__setattr__(self, "read_only_functions", tuple(self.read_only_functions))

    @classmethod
    def setting_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @property
    def ryw_window(self) -> float | None:
        """The read-your-writes window in seconds, if that mode is on."""
        ryw = self.read_your_writes
        return None if ryw is None or isinstance(ryw, str) else float(ryw)

    @property
    def ryw_lsn(self) -> bool:
        return self.read_your_writes == "lsn"


@dataclass(frozen=True, slots=True, init=False)
class Member:
    """One server of a group: ``Member(dsn_or_pool, weight=2, name=..., **pool_settings)``.

    ``pool_settings`` (``max_size``, ``connect_kwargs``, ``on_connect``, ``driver``, ...)
    override the group's for this member; they are refused with a ready pool.
    """

    target: str | Pool
    weight: float
    name: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self, target: str | Pool, *, weight: float = 1.0, name: str | None = None, **settings: Any
    ) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ConfigError("weight", f"must be a number above zero, got {weight!r}")
        if not isinstance(target, str) and settings:
            raise ConfigError(next(iter(settings)), "pool settings need a DSN, not a ready pool")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "weight", float(weight))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "settings", MappingProxyType(dict(settings)))

    def label(self, index: int) -> str:
        """The member's name: given, or the pool's, or host:port of the DSN."""
        if self.name:
            return self.name
        if not isinstance(self.target, str):
            return self.target.name
        try:
            parts = urlsplit(self.target)
            if parts.hostname:
                return f"{parts.hostname}:{parts.port or 5432}"
        except ValueError:
            pass
        return f"member{index}"


def as_member(spec: str | Pool | Member) -> Member:
    return spec if isinstance(spec, Member) else Member(spec)
