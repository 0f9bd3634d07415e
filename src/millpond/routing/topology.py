"""Who is the primary, and which replicas take reads: decided without I/O.

The health checks (:mod:`.health`) probe every member and hand the results to
:meth:`Topology.apply`, which changes member state and returns what changed, for the
log. Requests that find a member unreachable report it with :meth:`Topology.mark_failed`.
Nothing here awaits (DESIGN principle 1).

Replay lag of a replica, in bytes, is how far its replayed WAL position is behind the
primary's WAL insert position, both sampled in the same round. In seconds it is
``now() - pg_last_xact_replay_timestamp()`` on the replica, except that a replica
that has replayed everything is 0 s behind however long ago the last write was. When
no primary is reachable, "everything" means everything the replica has received, so
replicas keep serving reads during a primary outage. A replica that has not replayed a
single transaction since it started has no replay timestamp; its lag in seconds is then
estimated from the primary's WAL positions seen by earlier checks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

from millpond.routing.config import GroupConfig
from millpond.routing.members import MemberState, Role

#: (logging level, message) describing a change the topology saw.
Event = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Probe:
    """One member's answer to a health check (or why there was none)."""

    started: float
    in_recovery: bool | None = None
    #: replayed position on a replica; WAL insert position on a primary
    lsn: int | None = None
    #: received position on a replica
    receive_lsn: int | None = None
    #: seconds since the last replayed transaction committed (replicas)
    replay_age: float | None = None
    paused: bool | None = None
    #: a primary fenced with ``default_transaction_read_only``: not written to
    read_only: bool = False
    error: str | None = None


def parse_lsn(text: object) -> int | None:
    """``'16/B374D848'`` -> an integer byte position; None stays None."""
    if text is None:
        return None
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


_PAGE = 8192  # XLOG_BLCKSZ, as PostgreSQL is built by default
_SEGMENT = 16 * 1024 * 1024  # the default WAL segment size
_SHORT_HEADER, _LONG_HEADER = 24, 40


def record_end(insert_lsn: int) -> int:
    """The end of the last WAL record, from a primary's insert position.

    At the start of a page the insert position points past the page header, where no
    record has been written yet; a replica that replayed everything reports the page
    start. Without this, an idle primary would look a few bytes ahead forever.
    """
    if insert_lsn % _SEGMENT == _LONG_HEADER:
        return insert_lsn - _LONG_HEADER
    if insert_lsn % _PAGE == _SHORT_HEADER:
        return insert_lsn - _SHORT_HEADER
    return insert_lsn


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


class Topology:
    """The group's view of its members; changed only here."""

    def __init__(self, members: Sequence[MemberState], config: GroupConfig) -> None:
        self.members = tuple(members)
        self.config = config
        self.writer: MemberState | None = None
        self.readable: tuple[MemberState, ...] = ()
        self.primary_changes = 0
        self.rounds = 0
        self._last_writer: MemberState | None = None
        # (check start time, primary WAL position) for read-your-writes by LSN
        self._writer_lsns: deque[tuple[float, int]] = deque(maxlen=512)

    # -- health-check results ------------------------------------------------------

    def apply(self, probes: Sequence[Probe], now: float) -> list[Event]:
        """Take one round of probes (one per member, in order); return what to log."""
        self.rounds += 1
        events: list[Event] = []
        for member, probe in zip(self.members, probes, strict=True):
            events.extend(self._observe(member, probe))
        events.extend(self._choose_writer(probes))
        writer_probe = self._writer_probe(probes)
        for member, probe in zip(self.members, probes, strict=True):
            if probe.error is None:
                self._place(member, probe, writer_probe, now)
        self._rebuild()
        return events

    def _observe(self, member: MemberState, probe: Probe) -> list[Event]:
        old = member.role
        if probe.error is not None:
            member.role = Role.UNKNOWN
            member.in_rotation = False
            member.reason = f"unreachable: {probe.error}"
            member.lag_seconds = member.lag_bytes = None
            if old is Role.UNKNOWN:
                return []
            return [(WARNING, f"member {member.name!r} unreachable: {probe.error}")]
        member.role = Role.REPLICA if probe.in_recovery else Role.PRIMARY
        member.checked_at = probe.started
        member.paused = probe.paused
        if member.failed_at is not None and probe.started > member.failed_at:
            member.failed_at = None
        if old is Role.UNKNOWN or old is member.role:
            return []
        return [(WARNING, f"member {member.name!r} is now a {member.role.value} (was {old.value})")]

    def _choose_writer(self, probes: Sequence[Probe]) -> list[Event]:
        writable = [
            m
            for m, p in zip(self.members, probes, strict=True)
            if p.error is None and not p.in_recovery and not p.read_only
        ]
        old = self.writer
        if old is not None and old in writable:
            return []
        self.writer = writable[0] if writable else None
        if self.writer is None:
            return [(WARNING, "no primary: no member is writable")] if old is not None else []
        last, self._last_writer = self._last_writer, self.writer
        if last is not None and last is not self.writer:
            self.primary_changes += 1
            return [(WARNING, f"primary is now {self.writer.name!r} (was {last.name!r})")]
        return [(INFO, f"primary is {self.writer.name!r}")]

    def _writer_probe(self, probes: Sequence[Probe]) -> Probe | None:
        writer = self.writer
        if writer is None:
            return None
        probe = probes[self.members.index(writer)]
        if probe.lsn is not None:
            self._writer_lsns.append((probe.started, probe.lsn))
        return probe

    def _place(
        self, member: MemberState, probe: Probe, writer_probe: Probe | None, now: float
    ) -> None:
        """Put a reachable member in rotation or not, and say why."""
        member.replay_lsn = probe.lsn if probe.in_recovery else None
        if member is self.writer:
            member.in_rotation = False
            member.reason = "primary"
            member.lag_seconds = member.lag_bytes = None
            return
        if member.role is Role.PRIMARY:
            member.in_rotation = False
            member.reason = (
                "not in recovery, but read-only (default_transaction_read_only)"
                if probe.read_only
                else "writable, but not the primary the group chose"
            )
            return
        self._measure_lag(member, probe, writer_probe, now)
        reason = self._lag_verdict(member)
        if reason is None and member.failed_at is not None:
            reason = "a request found it unreachable; waiting for a check"
        member.in_rotation = reason is None
        paused = " (replay paused)" if probe.paused else ""
        member.reason = (reason or "ok") + paused

    def _measure_lag(
        self, member: MemberState, probe: Probe, writer_probe: Probe | None, now: float
    ) -> None:
        replay = probe.lsn
        if writer_probe is not None and writer_probe.lsn is not None and replay is not None:
            behind: int | None = max(0, writer_probe.lsn - replay)
        elif probe.receive_lsn is not None and replay is not None:
            behind = max(0, probe.receive_lsn - replay)  # no primary to compare with
        else:
            behind = None
        member.lag_bytes = behind
        if behind == 0:
            member.lag_seconds = 0.0
        elif probe.replay_age is not None or replay is None:
            member.lag_seconds = probe.replay_age
        else:  # nothing replayed since the replica started: no commit timestamp to go by
            member.lag_seconds = self._behind_since(replay, now)

    def _behind_since(self, replay: int, now: float) -> float | None:
        """Seconds since the primary's WAL first went past ``replay``, from past checks.

        None when even the oldest check remembered was already past it (how long the
        replica has been behind is then not known).
        """
        history = self._writer_lsns
        for i, (started, lsn) in enumerate(history):
            if lsn > replay:
                return None if i == 0 else max(0.0, now - started)
        return None

    def _lag_verdict(self, member: MemberState) -> str | None:
        """Why ``member``'s lag keeps it out of rotation, or None."""
        cfg = self.config
        if cfg.max_lag is not None:
            if member.lag_seconds is None:
                return "replay lag unknown"
            if member.lag_seconds > cfg.max_lag:
                return f"lagging {member.lag_seconds:.1f}s (max {cfg.max_lag:g}s)"
        if cfg.max_lag_bytes is not None:
            if member.lag_bytes is None:
                return "replay lag unknown"
            if member.lag_bytes > cfg.max_lag_bytes:
                return (
                    f"lagging {format_bytes(member.lag_bytes)} "
                    f"(max {format_bytes(cfg.max_lag_bytes)})"
                )
        return None

    def _rebuild(self) -> None:
        self.readable = tuple(m for m in self.members if m.in_rotation)

    # -- what requests report --------------------------------------------------------

    def mark_failed(self, member: MemberState, now: float, error: str) -> None:
        """A request could not reach ``member``: no reads until a later check passes."""
        member.failed_at = now
        if member.in_rotation:
            member.in_rotation = False
            member.reason = f"request failed: {error}"
            self._rebuild()

    def drop_writer(self, member: MemberState) -> bool:
        """``member`` refused a write as read-only (25006): it is no primary any more."""
        if self.writer is not member:
            return False
        self.writer = None
        member.role = Role.UNKNOWN
        member.reason = "refused a write (read-only); re-checking roles"
        return True

    def lsn_after(self, moment: float) -> int | None:
        """The primary's WAL position from the first check begun after ``moment``."""
        for started, lsn in self._writer_lsns:
            if started > moment:
                return lsn
        return None
