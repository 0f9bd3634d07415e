"""The pool core's release decisions, driven directly (no I/O, no event loop).

release() spells out _retire_reason() on its fast path (a clean connection back to the
next waiter or the idle stack); these hold the two to the same decisions.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from millpond.config import PoolConfig
from millpond.errors import PoolOverloaded
from millpond.pool.core import Act, PoolCore, Release, Waiter
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


def queue_of(core: PoolCore, count: int) -> list[tuple[Handoff, Waiter]]:
    """``count`` waiters queued on a pool whose one connection is lent."""
    core.config = PoolConfig(min_size=1, max_size=1, max_waiting=0)
    queued = []
    for i in range(count):
        handoff = Handoff()
        queued.append((handoff, core.wait(handoff, float(i))))  # type: ignore[arg-type]
    core.todo.clear()
    return queued


@pytest.mark.parametrize("order", ["oldest first", "newest first", "every other"])
def test_waiters_that_give_up_leave_the_rest_in_order(order: str) -> None:
    core = core_with()
    slot = lent_slot(core)
    queued = queue_of(core, 100)
    leaving = {
        "oldest first": queued[:60],
        "newest first": queued[:39:-1],
        "every other": queued[::2] + queued[1::2][-10:],
    }[order]
    for _, waiter in leaving:
        core.forget_waiter(waiter)
        core.forget_waiter(waiter)  # twice is once
    staying = [h for h, w in queued if (h, w) not in leaving]
    assert core.waiting() == len(staying) == 40
    assert core.stats(200.0).waiting == 40
    assert core.waiters[0].queued, "the first in the queue must be one still waiting"
    assert len(core.waiters) <= 2 * 40 + 16, "the queue was never compacted"
    served = []
    for _ in staying:
        core.release(slot, Release.CLEAN, 300.0)
        served.append(next(h for h in staying if h.slot is slot and h not in served))
    assert served == staying, "waiters were not served in arrival order"
    assert core.waiting() == 0
    assert not core.waiters


def test_forgetting_a_waiter_already_served_changes_nothing() -> None:
    core = core_with()
    slot = lent_slot(core)
    (first, waiter), (second, _) = queue_of(core, 2)
    core.release(slot, Release.CLEAN, 5.0)
    assert first.slot is slot
    core.forget_waiter(waiter)  # it gave up just as it was served
    assert core.waiting() == 1
    core.release(slot, Release.CLEAN, 6.0)
    assert second.slot is slot


def test_max_waiting_counts_only_waiters_still_waiting() -> None:
    core = core_with()
    lent_slot(core)
    queued = queue_of(core, 3)
    core.config = PoolConfig(min_size=1, max_size=1, max_waiting=3)
    with pytest.raises(PoolOverloaded):
        core.wait(Handoff(), 9.0)  # type: ignore[arg-type]
    core.forget_waiter(queued[1][1])  # from the middle: stays in the deque, marked
    assert core.waiting() == 2
    core.wait(Handoff(), 9.0)  # type: ignore[arg-type]
    assert core.waiting() == 3


def test_ten_thousand_waiters_leaving_newest_first_is_linear() -> None:
    """deque.remove() made this quadratic (0.7 s on a 2-vCPU VM); count the work."""
    core = core_with()
    lent_slot(core)
    queued = queue_of(core, 10_000)
    copied = 0  # waiters moved by compactions: the work beyond O(1) per waiter
    for _, waiter in reversed(queued):
        before = len(core.waiters)
        core.forget_waiter(waiter)
        if len(core.waiters) < before - 1:
            copied += len(core.waiters)
        assert len(core.waiters) <= 2 * core.waiting() + 17
    assert core.waiting() == 0
    assert not core.waiters
    assert copied <= 10_000, "compactions copied more than the queue once over"
