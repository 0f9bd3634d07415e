"""The pool core: every lending decision, made synchronously, without I/O.

Methods here change state and append what must be *done* (open, reset, check or
close a connection) to :attr:`PoolCore.todo`; the async layer (:mod:`.pool`) drains
that list and performs the I/O afterwards, outside any decision. Nothing here awaits,
so no cancellation can interrupt a decision half-way (DESIGN principles 1 and 5).

Invariants:
- every live slot is in exactly one of: the idle stack, lent out, or under way
  (connecting, checking, resetting);
- a waiter is served first-in first-out and gets its slot by direct hand-off: a
  released connection never passes through the idle stack while someone waits;
- connection attempts start only outside a backoff window, at most
  ``max_concurrent_connects`` at a time, and only when the circuit breaker admits them;
- while the breaker is open and no connection is up to wait for, a caller that would
  wait is refused at once: its future fails with CircuitOpen (no suspension).
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from millpond.config import PoolConfig
from millpond.errors import CircuitOpen, DatabaseUnavailable, PoolClosed, PoolOverloaded
from millpond.pool.state import LIVE_STATES, CloseReason, Slot, SlotState
from millpond.pool.stats import Counters, PoolStats, closed_mapping
from millpond.resilience.backoff import Backoff
from millpond.resilience.breaker import BreakerState, CircuitBreaker, StateHook

S = SlotState


class Act(enum.Enum):
    CONNECT = "connect"
    RESET = "reset"
    CHECK = "check"
    CLOSE = "close"


class Release(enum.Enum):
    """What the driver says about a connection coming back from a borrower."""

    CLEAN = "clean"  # reusable as is: zero round trips
    DIRTY = "dirty"  # open transaction or session state: reset first
    BROKEN = "broken"  # mid-protocol or unusable: close it
    LOST = "lost"  # the connection to the server is gone: close it, and every older idle one


# Module-level aliases: the release fast path compares against them.
_CLEAN = Release.CLEAN
_DIRTY = Release.DIRTY
# Enum members as plain names: a class attribute of an Enum is a slow lookup (EnumType
# has __getattr__), and these are read on every lend and release.
_IN_USE, _IDLE = SlotState.IN_USE, SlotState.IDLE
_OPEN = BreakerState.OPEN


class Waiter:
    """A caller waiting for a connection; resolved by direct hand-off.

    ``queued`` is true while it is in its pool's queue and has not given up: one that
    gives up from the middle of the queue stays there, marked, until it reaches the
    front or the queue is compacted (see :meth:`PoolCore.forget_waiter`).
    """

    __slots__ = ("future", "queued", "since")

    def __init__(self, future: asyncio.Future[Slot], since: float) -> None:
        self.future = future
        self.since = since
        self.queued = False


class PoolCore:
    """Sizing, lending, waiting, lifetimes and statistics for one pool."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        name: str = "pool",
        is_alive: Callable[[Any], bool] = lambda conn: True,
        rng: Callable[[], float] = random.random,
        on_breaker_change: StateHook | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self._is_alive = is_alive
        self._rng = rng
        self._on_breaker_change = on_breaker_change
        self.idle: deque[Slot] = deque()
        #: callers waiting, first come first served; the first one is always still
        #: queued, so a non-empty queue means someone waits (see forget_waiter)
        self.waiters: deque[Waiter] = deque()
        self.gone = 0  # waiters that gave up but are still in the queue
        self.slots: dict[int, Slot] = {}
        self.todo: list[tuple[Act, Slot, CloseReason | None]] = []
        self.counters = Counters()
        self.closed = False
        self.live = 0
        self.connecting = 0
        self.replacing = 0
        self.last_connect_error: BaseException | None = None
        self.backoff = Backoff(config.reconnect_delay, config.reconnect_delay_max)
        self.backoff_until = 0.0
        self.failed_rounds = 0  # consecutive backoff windows opened by failed connects
        self.breaker: CircuitBreaker | None = None
        if config.breaker_threshold:
            self.breaker = CircuitBreaker(
                threshold=config.breaker_threshold,
                recovery=config.breaker_recovery,
                probes=config.breaker_probes,
                name=name,
                on_change=self._breaker_changed,
            )
        self._next_id = 0

    # -- lending ---------------------------------------------------------------

    def acquire_nowait(self, now: float) -> Slot | None:
        """An idle connection lent at once, or None. Never waits, never does I/O."""
        idle = self.idle
        validate_after = self.config.validate_idle_after
        while idle:
            slot = idle.pop()
            if not self._is_alive(slot.conn):
                self._discard(slot, CloseReason.BROKEN, now)
                continue
            if validate_after is not None and now - slot.idle_since > validate_after:
                slot.move(S.CHECKING)
                self.todo.append((Act.CHECK, slot, None))
                continue
            self._lend(slot, now)  # no wait: counted in wait_time at snapshot time
            return slot
        return None

    def _lend(self, slot: Slot, now: float) -> None:
        if slot.state is _IDLE:
            slot.state = _IN_USE  # legal by LEGAL_MOVES; the common case, without the lookup
        elif slot.state is not _IN_USE:
            slot.move(_IN_USE)
        slot.acquired_at = now
        slot.uses += 1
        slot.leak_reported = False
        self.counters.acquires += 1

    def wait(self, future: asyncio.Future[Slot], now: float) -> Waiter:
        """Queue a caller for the next free connection (after acquire_nowait failed)."""
        if self.closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        breaker = self.breaker
        if breaker is not None and breaker.state is _OPEN and self._fails_fast(now):
            self.counters.breaker_rejected += 1
            future.set_exception(self._circuit_open(now))
            return Waiter(future, now)
        limit = self.config.max_waiting
        if limit and self.waiting() >= limit:
            self.counters.rejected += 1
            raise PoolOverloaded(
                f"pool {self.name!r}: {self.waiting()} callers already waiting "
                f"(max_waiting={limit}); {self.describe()}"
            )
        waiter = Waiter(future, now)
        waiter.queued = True
        self.waiters.append(waiter)
        self.counters.waits += 1
        if self.live < self.config.max_size:  # at max_size only a release can serve it
            self._want_connections(now)
        return waiter

    def waiting(self) -> int:
        """How many callers wait (those that gave up excluded)."""
        return len(self.waiters) - self.gone

    def forget_waiter(self, waiter: Waiter) -> None:
        """A waiter gave up (timeout or cancellation) before being served.

        O(1) amortized, however many give up at once and in whatever order: the first
        in the queue leaves it at once, one further back is marked and stays until it
        reaches the front, or until the marked ones are half the queue and it is
        compacted. (deque.remove() was O(n): 10,000 waiters leaving newest first
        stalled the event loop for 0.7 s.)
        """
        if not waiter.queued:
            return  # served, refused or forgotten already
        waiter.queued = False
        waiters = self.waiters
        if waiters[0] is waiter:
            waiters.popleft()
            self._drop_gone_heads()
            return
        self.gone += 1
        if self.gone > 16 and 2 * self.gone > len(waiters):
            kept = [w for w in waiters if w.queued]
            waiters.clear()
            waiters.extend(kept)
            self.gone = 0

    def _drop_gone_heads(self) -> None:
        """Keep the first waiter in the queue a live one."""
        waiters = self.waiters
        while waiters and not waiters[0].queued:
            waiters.popleft()
            self.gone -= 1

    def _next_waiter(self) -> Waiter | None:
        """Out of the queue: the first waiter still waiting, or None."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.queued:
                waiter.queued = False
                self._drop_gone_heads()
                return waiter
            self.gone -= 1
        return None

    def release(self, slot: Slot, verdict: Release, now: float) -> None:
        """Take a connection back from its borrower and decide what it needs."""
        self.counters.use_time.record(now - slot.acquired_at)
        slot.lease_site = None
        if verdict is not _CLEAN and verdict is not _DIRTY:  # broken or lost
            self._discard(slot, CloseReason.BROKEN, now)
            self._after_loss(slot, verdict is Release.LOST, now)
            return
        config = self.config
        if (  # _retire_reason() is None, spelt out: this runs on every release
            verdict is _CLEAN
            and slot.retire is None
            and now < slot.expires_at
            and not self.closed
            and not (config.max_uses and slot.uses >= config.max_uses)
            and config.reset != "always"
        ):
            self._put_back(slot, now)
            return
        reason = self._retire_reason(slot, now)
        if reason is not None:
            self._retire(slot, reason)
            self._want_connections(now)
        elif verdict is _DIRTY or config.reset == "always":
            slot.move(S.RESETTING)
            self.counters.resets += 1
            self.todo.append((Act.RESET, slot, None))
        else:
            self._put_back(slot, now)

    def _retire_reason(self, slot: Slot, now: float) -> CloseReason | None:
        """Why ``slot`` must close instead of being lent again, or None. release()
        spells the same test out on its fast path: change both (test_pool_core.py)."""
        if self.closed:
            return CloseReason.POOL_CLOSED
        if slot.retire is not None:
            return slot.retire
        max_uses = self.config.max_uses
        if max_uses and slot.uses >= max_uses:
            return CloseReason.USES
        if now >= slot.expires_at:
            return CloseReason.LIFETIME
        return None

    def _put_back(self, slot: Slot, now: float) -> None:
        """Hand ``slot`` to the first live waiter, or push it on the idle stack."""
        waiters = self.waiters
        while waiters:  # _next_waiter(), inlined: this runs on every release
            waiter = waiters.popleft()
            if not waiter.queued:
                self.gone -= 1
                continue
            waiter.queued = False
            if waiters and not waiters[0].queued:
                self._drop_gone_heads()
            future = waiter.future
            if future.done():
                continue
            self._lend(slot, now)
            self.counters.wait_time.record(now - waiter.since)
            future.set_result(slot)
            return
        slot.move(_IDLE)
        slot.idle_since = now
        self.idle.append(slot)

    # -- outcomes of the I/O the pool performed ------------------------------------

    def connected(self, slot: Slot, conn: Any, now: float) -> bool:
        """A connect succeeded; False if the pool was terminated meanwhile (drop conn)."""
        if slot.state is S.CLOSED:
            return False
        slot.conn = conn
        slot.created_at = now
        lifetime = self.config.max_lifetime
        if lifetime is not None:
            slot.expires_at = now + lifetime * (1 - self.config.lifetime_jitter * self._rng())
        self.connecting -= 1
        self.counters.opened += 1
        self.last_connect_error = None
        self.failed_rounds = 0
        self.backoff_until = 0.0  # the database is back: refill at once
        if self.breaker is not None:
            self.breaker.record_success(now)
        if self.closed:
            self._retire(slot, CloseReason.POOL_CLOSED)
            return True
        self._put_back(slot, now)
        if self.replacing:
            self.replacing -= 1
            self._retire_one_expired_idle()
        self._want_connections(now)  # keep filling towards min_size
        return True

    def connect_failed(self, slot: Slot, error: BaseException, now: float) -> float:
        """Record a failed attempt; return how long until the next one may start.

        The first failure after a backoff window has passed opens the next window
        (and counts once towards the breaker); attempts that were made together and
        fail inside that window count no further.
        """
        if not self._connect_ended(slot):
            return 0.0
        self.counters.connect_errors += 1
        self.last_connect_error = error
        breaker = self.breaker
        if now >= self.backoff_until:
            self.backoff_until = now + self.backoff.delay(self.failed_rounds, self._rng)
            self.failed_rounds += 1
            if breaker is not None:
                breaker.record_failure(_driver_error(error), now)
        elif breaker is not None:
            breaker.record_ignored()
        self._settle_waiters(now)
        return self.next_attempt_at() - now

    def connect_cancelled(self, slot: Slot) -> None:
        """A connect was cancelled (the pool is closing): no verdict on the database."""
        if self._connect_ended(slot) and self.breaker is not None:
            self.breaker.record_ignored()

    def _connect_ended(self, slot: Slot) -> bool:
        if slot.state is S.CLOSED:
            return False
        self.connecting -= 1
        self.replacing = min(self.replacing, self.connecting)
        self._remove(slot, S.BROKEN)
        self.close_done(slot)  # nothing to close: there is no connection
        return True

    def next_attempt_at(self) -> float:
        """When the next connection attempt may start (backoff window, open breaker)."""
        breaker = self.breaker
        if breaker is not None and breaker.state is BreakerState.OPEN:
            return max(self.backoff_until, breaker.retry_at)
        return self.backoff_until

    # -- the circuit breaker -----------------------------------------------------------

    def _fails_fast(self, now: float) -> bool:
        """Open breaker, nothing up to wait for, no trial due yet: refuse, don't queue."""
        breaker = self.breaker
        return (
            breaker is not None
            and breaker.state is BreakerState.OPEN
            and self.live == self.connecting
            and now < self.next_attempt_at()
        )

    def _circuit_open(self, now: float) -> CircuitOpen:
        breaker = self.breaker
        assert breaker is not None
        error = breaker.last_error
        exc = CircuitOpen(
            f"pool {self.name!r}: database unavailable (circuit breaker open after "
            f"{breaker.threshold} failed connection rounds; next attempt in "
            f"{max(0.0, self.next_attempt_at() - now):.2f}s): {error}"
        )
        exc.__cause__ = error
        return exc

    def _settle_waiters(self, now: float) -> None:
        """Fail every waiter at once if the breaker says none of them can be served."""
        if not self.waiters or not self._fails_fast(now):
            return
        while (waiter := self._next_waiter()) is not None:
            future = waiter.future
            if not future.done():
                self.counters.breaker_rejected += 1
                future.set_exception(self._circuit_open(now))

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        if self._on_breaker_change is not None:
            self._on_breaker_change(old, new)

    # -- losses ------------------------------------------------------------------------

    def _after_loss(self, slot: Slot, lost: bool, now: float) -> None:
        """``slot`` was discarded; if its server connection was lost, so are older ones."""
        if lost:
            self._retire_stale(slot.created_at, now)
        self._want_connections(now)
        self._settle_waiters(now)

    def _retire_stale(self, created_at: float, now: float) -> None:
        """Retire every idle connection created no later than ``created_at``."""
        for slot in [s for s in self.idle if s.created_at <= created_at]:
            self.idle.remove(slot)
            self._discard(slot, CloseReason.STALE, now)

    def reset_done(self, slot: Slot, ok: bool, now: float, *, lost: bool = False) -> None:
        if slot.state is S.CLOSED:
            return
        if not ok:
            self._discard(slot, CloseReason.RESET_FAILED, now)
            self._after_loss(slot, lost, now)
        elif self.closed:
            self._retire(slot, CloseReason.POOL_CLOSED)
        else:
            self._put_back(slot, now)

    def check_done(self, slot: Slot, ok: bool, now: float, *, lost: bool = False) -> None:
        if slot.state is S.CLOSED:
            return
        if not ok:
            self._discard(slot, CloseReason.HEALTH_CHECK, now)
            self._after_loss(slot, lost, now)
        elif self.closed:
            self._retire(slot, CloseReason.POOL_CLOSED)
        else:
            self._put_back(slot, now)

    def close_done(self, slot: Slot) -> None:
        if slot.state is not S.CLOSED:
            slot.move(S.CLOSED)
        self.slots.pop(slot.id, None)

    def forget(self, slot: Slot) -> None:
        """Terminate path: drop ``slot`` whatever its state (its connection is gone)."""
        if slot.state in LIVE_STATES:
            self.live -= 1
        if slot.state is S.CONNECTING:
            self.connecting -= 1
        if slot.state is S.IDLE:
            self.idle.remove(slot)
        slot.state = S.CLOSED
        self.slots.pop(slot.id, None)

    @property
    def ready_count(self) -> int:
        """Connections that are up (idle, lent, or being reset or checked)."""
        return self.live - self.connecting

    # -- sizing ------------------------------------------------------------------

    def _want_connections(self, now: float) -> None:
        """Start as many connects as demand, capacity and the connect limit allow."""
        if self.closed or now < self.backoff_until:
            return
        cfg = self.config
        want = max(cfg.min_size - self.live, self.waiting() - self.connecting)
        room = min(cfg.max_size - self.live, cfg.max_concurrent_connects - self.connecting)
        for _ in range(min(want, room)):
            if not self._admit_connect(now):
                return
            self._new_slot(now)

    def _admit_connect(self, now: float) -> bool:
        breaker = self.breaker
        return breaker is None or (breaker.would_allow(now) and breaker.allow(now))

    def _new_slot(self, now: float) -> None:
        self._next_id += 1
        slot = Slot(self._next_id, now)
        self.slots[slot.id] = slot
        self.live += 1
        self.connecting += 1
        self.todo.append((Act.CONNECT, slot, None))

    def retry_connects(self, now: float) -> None:
        """Called when a backoff delay has passed."""
        self._want_connections(now)

    def _retire(self, slot: Slot, reason: CloseReason) -> None:
        self._remove(slot, S.CLOSING)
        self.counters.closed[reason] += 1
        self.todo.append((Act.CLOSE, slot, reason))

    def _discard(self, slot: Slot, reason: CloseReason, now: float) -> None:
        self._remove(slot, S.BROKEN)
        self.counters.closed[reason] += 1
        self.todo.append((Act.CLOSE, slot, reason))

    def _remove(self, slot: Slot, state: SlotState) -> None:
        if slot.state in LIVE_STATES:
            self.live -= 1
        slot.move(state)

    def _retire_one_expired_idle(self) -> None:
        """A fresh connection arrived: let one idle connection marked for retirement go."""
        for slot in self.idle:
            if slot.retire is not None:
                self.idle.remove(slot)
                self._retire(slot, slot.retire)
                return

    # -- housekeeping (called by the janitor) --------------------------------------

    def housekeep(self, now: float) -> list[Slot]:
        """Idle timeouts, lifetimes, health checks, refill; returns newly leaked slots."""
        if self.closed:
            return []
        self._expire_idle(now)
        self._mark_expired(now)
        self._health_checks(now)
        self._want_connections(now)
        return self._find_leaks(now)

    def _expire_idle(self, now: float) -> None:
        max_idle = self.config.max_idle
        if max_idle is None:
            return
        surplus = self.live - self.config.min_size
        # Oldest-idle first: the bottom of the LIFO stack idles longest.
        while surplus > 0 and self.idle and now - self.idle[0].idle_since > max_idle:
            self._retire(self.idle.popleft(), CloseReason.IDLE)
            surplus -= 1

    def _mark_expired(self, now: float) -> None:
        """Past-lifetime idle connections get a replacement before they are closed.

        A replacement may briefly take the pool above ``max_size`` by the number of
        connections being replaced; the old one is retired when the new one is up.
        """
        for slot in self.idle:
            if slot.retire is None and now >= slot.expires_at:
                slot.retire = CloseReason.LIFETIME
        if now < self.backoff_until:
            return  # no replacements while the database is failing
        pending = sum(1 for s in self.idle if s.retire is not None)
        room = self.config.max_concurrent_connects - self.connecting
        for _ in range(max(0, min(room, pending - self.replacing))):
            if not self._admit_connect(now):
                return
            self._new_slot(now)
            self.replacing += 1

    def _health_checks(self, now: float) -> None:
        interval = self.config.health_check_interval
        if interval is None:
            return
        for slot in [s for s in self.idle if now - s.idle_since > interval]:
            self.idle.remove(slot)
            slot.move(S.CHECKING)
            self.todo.append((Act.CHECK, slot, None))

    def _find_leaks(self, now: float) -> list[Slot]:
        threshold = self.config.leak_threshold
        if threshold is None:
            return []
        leaked = []
        for slot in self.slots.values():
            overdue = now - slot.acquired_at > threshold
            if slot.state is S.IN_USE and not slot.leak_reported and overdue:
                slot.leak_reported = True
                self.counters.leaks += 1
                leaked.append(slot)
        return leaked

    def close(self) -> None:
        """Stop lending: fail waiters, retire idle connections; lent ones retire on release."""
        self.closed = True
        while (waiter := self._next_waiter()) is not None:
            future = waiter.future
            if not future.done():
                future.set_exception(PoolClosed(f"pool {self.name!r} is closing"))
        while self.idle:
            self._retire(self.idle.pop(), CloseReason.POOL_CLOSED)

    # -- observation -----------------------------------------------------------------

    def count(self, state: SlotState) -> int:
        return sum(1 for s in self.slots.values() if s.state is state)

    def stats(self, now: float) -> PoolStats:
        c = self.counters
        in_use = [s for s in self.slots.values() if s.state is S.IN_USE]
        oldest = max((now - s.acquired_at for s in in_use), default=0.0)
        return PoolStats(
            name=self.name,
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            size=self.live,
            idle=len(self.idle),
            in_use=len(in_use),
            connecting=self.connecting,
            resetting=self.count(S.RESETTING) + self.count(S.CHECKING),
            waiting=sum(1 for w in self.waiters if w.queued and not w.future.done()),
            acquires=c.acquires,
            waits=c.waits,
            timeouts=c.timeouts,
            rejected=c.rejected,
            connections_opened=c.opened,
            connections_closed=closed_mapping(c.closed),
            connect_errors=c.connect_errors,
            leaks=c.leaks,
            resets=c.resets,
            oldest_lease_age=oldest,
            # every acquisition that did not wait recorded nothing: it waited 0 s
            wait_time=c.wait_time.snapshot(zeros=c.acquires - c.wait_time.count),
            use_time=c.use_time.snapshot(),
            breaker_state=self.breaker.state.value if self.breaker else "disabled",
            breaker_opened=self.breaker.opened if self.breaker else 0,
            breaker_rejected=c.breaker_rejected,
            retries=c.retries,
            retry_giveups=c.retry_giveups,
        )

    def describe(self) -> str:
        size = f"{self.live}/{self.config.max_size}"
        text = f"size={size} idle={len(self.idle)} waiting={self.waiting()}"
        if self.breaker is not None and self.breaker.state is not BreakerState.CLOSED:
            text += f" breaker={self.breaker.state.value}"
        return text


def _driver_error(error: BaseException) -> BaseException:
    """The driver's own error behind the adapter's DatabaseUnavailable wrapper."""
    if isinstance(error, DatabaseUnavailable) and error.__cause__ is not None:
        return error.__cause__
    return error
