"""Slots, their states, and the table of legal moves between states.

A *slot* is one place in the pool: it holds a driver connection (or is about to) and
is always in exactly one :class:`SlotState`. State changes go through
:meth:`Slot.move`, which checks the move against :data:`LEGAL_MOVES`, so an illegal
move is a loud bug instead of a silently lost connection.
"""

from __future__ import annotations

import enum
from typing import Any


class SlotState(enum.Enum):
    CONNECTING = "connecting"  # a connect is under way
    IDLE = "idle"  # connected, in the idle stack, ready to lend
    IN_USE = "in_use"  # lent to a caller (or handed to a waiter)
    CHECKING = "checking"  # out of the idle stack for a liveness ping
    RESETTING = "resetting"  # released dirty; session state being reset
    CLOSING = "closing"  # retired; the close is under way
    BROKEN = "broken"  # dead or failed; being torn down
    CLOSED = "closed"  # gone; the slot is no longer in the pool

    # Members are singletons: identity hashing skips Enum's Python-level __hash__ on
    # every state change (LEGAL_MOVES lookups happen on each lend and release).
    __hash__ = object.__hash__


class CloseReason(enum.Enum):
    LIFETIME = "lifetime"
    IDLE = "idle"
    USES = "uses"
    BROKEN = "broken"
    RESET_FAILED = "reset_failed"
    HEALTH_CHECK = "health_check"
    LEAKED = "leaked"
    POOL_CLOSED = "pool_closed"
    STALE = "stale"  # idle, and older than a connection that was just lost


_S = SlotState

#: For each state, the states it may move to.
LEGAL_MOVES: dict[SlotState, frozenset[SlotState]] = {
    _S.CONNECTING: frozenset({_S.IDLE, _S.IN_USE, _S.BROKEN, _S.CLOSING}),
    _S.IDLE: frozenset({_S.IN_USE, _S.CHECKING, _S.CLOSING, _S.BROKEN}),
    _S.IN_USE: frozenset({_S.IDLE, _S.RESETTING, _S.CLOSING, _S.BROKEN, _S.CHECKING}),
    _S.CHECKING: frozenset({_S.IDLE, _S.IN_USE, _S.CLOSING, _S.BROKEN}),
    _S.RESETTING: frozenset({_S.IDLE, _S.IN_USE, _S.CLOSING, _S.BROKEN}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.BROKEN: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}

#: States in which a slot counts towards the pool's size (and ``max_size``).
LIVE_STATES = frozenset({_S.CONNECTING, _S.IDLE, _S.IN_USE, _S.CHECKING, _S.RESETTING})


class IllegalMove(RuntimeError):
    """A slot was asked to make a move the state table does not allow (a bug)."""


class Slot:
    """One connection's place in the pool, with its bookkeeping."""

    __slots__ = (
        "acquired_at",
        "conn",
        "created_at",
        "expires_at",
        "id",
        "idle_since",
        "leak_reported",
        "lease_site",
        "retire",
        "state",
        "uses",
    )

    def __init__(self, slot_id: int, now: float) -> None:
        self.id = slot_id
        self.state = SlotState.CONNECTING
        self.conn: Any = None
        self.created_at = now
        self.expires_at = float("inf")
        self.idle_since = now
        self.acquired_at = 0.0
        self.uses = 0
        #: set when the slot must be closed instead of reused (lifetime, pool shrink)
        self.retire: CloseReason | None = None
        self.lease_site: Any = None  # a StackSummary when leak detection is on
        self.leak_reported = False

    def move(self, new: SlotState) -> None:
        """Change state, enforcing the table of legal moves."""
        if new not in LEGAL_MOVES[self.state]:
            raise IllegalMove(f"slot {self.id}: {self.state.value} -> {new.value} is not legal")
        self.state = new

    def __repr__(self) -> str:
        return f"<Slot {self.id} {self.state.value} uses={self.uses}>"
