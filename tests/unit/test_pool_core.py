"""The pool core's release decisions, driven directly (no I/O, no event loop).

release() spells out _retire_reason() on its fast path (a clean connection back to the
next waiter or the idle stack); these hold the two to the same decisions.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from millpond.config import PoolConfig
from millpond.pool.core import Act, PoolCore, Release
from millpond.pool.state import CloseReason, Slot, SlotState


def lent_slot(core: PoolCore, now: float = 0.0) -> Slot:
    """One connection, connected and lent."""
    core._want_connections(now)
    (_, slot, _), *_ = core.todo
    core.todo.clear()
    core.connected(slot, object(), now)
    taken = core.acquire_nowait(now)
    assert taken is slot
    assert slot.state is SlotState.IN_USE
    return slot


class Handoff:
    """What a waiter is handed (the proxy's clients quack like this)."""

    def __init__(self) -> None:
        self.slot: Slot | None = None

    def done(self) -> bool:
        return self.slot is not None

    def set_result(self, slot: Slot) -> None:
        self.slot = slot

    def set_exception(self, exc: BaseException) -> None:  # pragma: no cover - not here
        raise exc


def core_with(**settings: Any) -> PoolCore:
    return PoolCore(PoolConfig(**{"min_size": 1, "max_size": 1, **settings}))


def test_clean_release_goes_to_the_waiter_first() -> None:
    core = core_with()
    slot = lent_slot(core)
    waiter = Handoff()
    core.wait(waiter, 1.0)  # type: ignore[arg-type]
    core.release(slot, Release.CLEAN, 3.0)
    assert waiter.slot is slot
    assert slot.state is SlotState.IN_USE
    assert (slot.uses, slot.acquired_at, core.counters.acquires) == (2, 3.0, 2)
    assert core.counters.wait_time.count == 1
    assert core.counters.wait_time.sum == 2.0
    assert core.counters.use_time.count == 1
    assert not core.idle
    assert not core.todo


def test_clean_release_with_nobody_waiting_is_idle() -> None:
    core = core_with()
    slot = lent_slot(core)
    core.release(slot, Release.CLEAN, 2.0)
    assert list(core.idle) == [slot]
    assert slot.state is SlotState.IDLE
    assert slot.idle_since == 2.0


@pytest.mark.parametrize(
    ("settings", "prepare", "reason"),
    [
        ({}, lambda core, slot: setattr(slot, "retire", CloseReason.LIFETIME), "lifetime"),
        ({"max_lifetime": 5.0, "lifetime_jitter": 0.0}, None, "lifetime"),
        ({"max_uses": 1}, None, "uses"),
        ({}, lambda core, slot: core.close(), "pool_closed"),
    ],
    ids=["marked", "lifetime over", "max_uses", "pool closed"],
)
def test_clean_release_of_a_retiring_connection_closes_it(
    settings: dict[str, Any], prepare: Any, reason: str
) -> None:
    core = core_with(**settings)
    slot = lent_slot(core)
    if prepare is not None:
        prepare(core, slot)
    waiter = Handoff()
    if not core.closed:
        core.wait(waiter, 1.0)  # type: ignore[arg-type]
        core.todo.clear()  # (a connect for the waiter, if the pool has room)
    core.release(slot, Release.CLEAN, 10.0)
    assert waiter.slot is None, "a retiring connection was handed on"
    assert slot.state is SlotState.CLOSING
    assert (Act.CLOSE, slot, CloseReason(reason)) in core.todo


@pytest.mark.parametrize("verdict", [Release.CLEAN, Release.DIRTY])
def test_reset_always_resets_even_clean_connections(verdict: Release) -> None:
    core = core_with(reset="always")
    slot = lent_slot(core)
    waiter = Handoff()
    core.wait(waiter, 1.0)  # type: ignore[arg-type]
    core.release(slot, verdict, 2.0)
    assert waiter.slot is None
    assert slot.state is SlotState.RESETTING
    assert core.todo == [(Act.RESET, slot, None)]


def test_waiter_that_gave_up_is_skipped() -> None:
    core = core_with()
    slot = lent_slot(core)
    loop = asyncio.new_event_loop()
    try:
        gone: asyncio.Future[Slot] = loop.create_future()
        gone.cancel()
        core.wait(gone, 1.0)
        waiter = Handoff()
        core.wait(waiter, 1.5)  # type: ignore[arg-type]
        core.release(slot, Release.CLEAN, 2.0)
        assert waiter.slot is slot
    finally:
        loop.close()
