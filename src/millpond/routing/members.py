"""The members of a group: their live state, and the snapshots readers get.

A :class:`MemberState` is mutable and owned by its group: the health checks write
role, lag and rotation into it (through :mod:`.topology`), the request path reads them
and keeps a few counters. Readers outside get frozen :class:`MemberStats` inside a
:class:`GroupStats` (DESIGN principle 7).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from millpond.pool.pool import Pool
    from millpond.pool.stats import PoolStats


class Role(enum.Enum):
    """What a member is, as last observed (``pg_is_in_recovery()``)."""

    PRIMARY = "primary"
    REPLICA = "replica"
    UNKNOWN = "unknown"


class MemberState:
    """One server of the group and what the group knows about it."""

    __slots__ = (
        "checked_at",
        "declared",
        "errors",
        "failed_at",
        "in_flight",
        "in_rotation",
        "index",
        "lag_bytes",
        "lag_seconds",
        "name",
        "paused",
        "pool",
        "reads",
        "reason",
        "replay_lsn",
        "role",
        "rr_current",
        "weight",
        "writes",
    )

    def __init__(self, index: int, name: str, pool: Pool, declared: Role, weight: float) -> None:
        self.index = index
        self.name = name
        self.pool = pool
        self.declared = declared
        self.weight = weight
        self.role = Role.UNKNOWN
        self.in_rotation = False
        self.reason = "not checked yet"
        self.lag_seconds: float | None = None
        self.lag_bytes: int | None = None
        self.replay_lsn: int | None = None
        self.paused: bool | None = None
        self.checked_at: float | None = None  # when the last successful check started
        self.failed_at: float | None = None  # when a request last found it unreachable
        self.in_flight = 0
        self.reads = 0
        self.writes = 0
        self.errors = 0
        self.rr_current = 0.0

    def __repr__(self) -> str:
        where = "in rotation" if self.in_rotation else f"out: {self.reason}"
        return f"<member {self.name!r} {self.role.value} {where}>"

    def snapshot(self, now: float) -> MemberStats:
        return MemberStats(
            name=self.name,
            declared_role=self.declared.value,
            role=self.role.value,
            in_rotation=self.in_rotation,
            reason=self.reason,
            weight=self.weight,
            lag_seconds=self.lag_seconds,
            lag_bytes=self.lag_bytes,
            replay_paused=self.paused,
            checked_ago=None if self.checked_at is None else max(0.0, now - self.checked_at),
            in_flight=self.in_flight,
            reads=self.reads,
            writes=self.writes,
            errors=self.errors,
            pool=self.pool.stats(),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStats:
    """One member as seen at snapshot time."""

    name: str
    #: the role it was given ("primary" or "replica")
    declared_role: str
    #: the role last observed: "primary", "replica" or "unknown" (unreachable)
    role: str
    #: whether reads are sent to it (always False for the primary)
    in_rotation: bool
    #: why it is (or is not) in rotation, e.g. "lagging 3.2s (max 1s)"
    reason: str
    weight: float
    lag_seconds: float | None
    lag_bytes: int | None
    replay_paused: bool | None
    #: seconds since the last successful check began
    checked_ago: float | None
    #: the group's requests under way on it now
    in_flight: int
    reads: int
    writes: int
    #: requests that could not reach it, or that it refused as read-only
    errors: int
    pool: PoolStats


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupStats:
    """An immutable snapshot of a group: members, routing counters, the query cache."""

    name: str
    #: the member writes go to, or None while no primary is known
    primary: str | None
    members: tuple[MemberStats, ...]
    #: reads served by replicas / by the primary (for any reason)
    replica_reads: int
    primary_reads: int
    #: reads sent to the primary because no replica was usable
    fallback_reads: int
    #: reads sent to the primary because the caller had just written
    ryw_reads: int
    writes: int
    #: operations tried again on another member after one failed, and writes re-sent
    #: to a newly found primary
    rerouted: int
    #: health-check rounds run, and how many times the primary changed
    checks: int
    primary_changes: int
    cache_hits: int
    cache_misses: int
    cache_size: int

    def member(self, name: str) -> MemberStats:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    @property
    def in_rotation(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members if m.in_rotation)

    def describe(self) -> str:
        parts = [f"primary={self.primary or 'none'}"]
        for m in self.members:
            state = "in" if m.in_rotation else "out"
            parts.append(f"{m.name}={m.role}/{state} ({m.reason})")
        return ", ".join(parts)
