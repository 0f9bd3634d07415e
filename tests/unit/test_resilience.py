"""Backoff, circuit breaker, retry classification and hard timeouts, on their own."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import millpond
from millpond import CircuitOpen, CommitUnknown, ConfigError, DatabaseUnavailable
from millpond.errors import PoolClosed, PoolOverloaded, PoolTimeout
from millpond.resilience import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    RetryPolicy,
    hard_timeout,
    is_retryable,
    retry_call,
)
from millpond.resilience.breaker import LEGAL_MOVES
from tests.helpers import run

# -- backoff ------------------------------------------------------------------------


@given(
    base=st.floats(min_value=1e-4, max_value=10),
    cap=st.floats(min_value=1e-4, max_value=100),
    failures=st.integers(min_value=0, max_value=10_000),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_stays_within_bounds(base: float, cap: float, failures: int, r: float) -> None:
    b = Backoff(base, cap)
    top = b.ceiling(failures)
    assert top <= cap
    assert top == pytest.approx(min(cap, base * 2.0 ** min(failures, 64)))
    delay = b.delay(failures, lambda: r)
    assert top / 2 <= delay <= top  # equal jitter: never below half the ceiling
    assert b.ceiling(failures + 1) >= top


def test_backoff_grows_then_caps() -> None:
    b = Backoff(0.1, 1.0)
    assert [b.ceiling(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.delay(0, lambda: 0.0) == pytest.approx(0.05)
    assert b.ceiling(10**9) == 1.0  # no overflow
    assert Backoff(1e300, 1e308, factor=1e10).ceiling(100) == 1e308
    delays = b.delays(lambda: 0.5)
    assert [round(next(delays), 3) for _ in range(3)] == [0.075, 0.15, 0.3]


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"base": 0, "cap": 1}, "base"),
        ({"base": 1, "cap": -1}, "cap"),
        ({"base": 1, "cap": 2, "factor": 0.5}, "factor"),
    ],
)
def test_backoff_validates(kwargs: dict[str, float], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        Backoff(**kwargs)
    assert info.value.setting == setting


# -- circuit breaker ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_breaker(**kwargs: Any) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    moves: list[tuple[str, str]] = []
    kwargs.setdefault("threshold", 3)
    kwargs.setdefault("recovery", 10.0)
    breaker = CircuitBreaker(
        clock=clock, on_change=lambda old, new: moves.append((old.value, new.value)), **kwargs
    )
    return breaker, clock, moves


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b, _, moves = make_breaker(threshold=3)
    for _ in range(2):
        assert b.allow()
        b.record_failure(ValueError("down"))
    b.record_success()  # a success resets the count
    for _ in range(2):
        b.record_failure(ValueError("down"))
    assert b.state is BreakerState.CLOSED
    b.record_failure(ValueError("still down"))
    assert b.state is BreakerState.OPEN
    assert moves == [("closed", "open")]
    assert not b.allow()
    assert not b.would_allow()
    assert b.rejected == 1
    err = b.error()
    assert isinstance(err, CircuitOpen)
    assert isinstance(err, DatabaseUnavailable)
    assert isinstance(err.__cause__, ValueError)
    assert "still down" in str(err)
    assert "next trial in 10.00s" in str(err)
    assert "open" in repr(b)


def test_breaker_half_open_probes_then_closes() -> None:
    b, clock, moves = make_breaker(threshold=1, recovery=5.0, probes=2)
    b.record_failure(OSError("x"))
    clock.now = 4.9
    assert not b.allow()
    clock.now = 5.0
    assert b.would_allow()
    assert b.allow()  # two trial calls
    assert b.allow()
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # no third while two are under way
    b.record_success()
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # one slot freed
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert b.opened == 1


def test_breaker_failed_probe_reopens_with_a_new_recovery_period() -> None:
    b, clock, _ = make_breaker(threshold=1, recovery=5.0)
    b.record_failure(OSError("x"))
    clock.now = 6.0
    assert b.allow()
    b.record_failure(OSError("y"))
    assert b.state is BreakerState.OPEN
    assert b.retry_at == 11.0
    clock.now = 10.0
    assert not b.allow()
    assert b.opened == 2
    assert str(b.last_error) == "y"


def test_breaker_ignores_cancellation_and_filtered_errors() -> None:
    async def main() -> None:
        b, clock, _ = make_breaker(threshold=1, is_failure=lambda e: not isinstance(e, KeyError))
        with pytest.raises(KeyError):
            async with b:
                raise KeyError("not the dependency's fault")
        assert b.state is BreakerState.CLOSED
        task = asyncio.ensure_future(b.call(asyncio.sleep, 10))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.state is BreakerState.CLOSED
        with pytest.raises(OSError, match="boom"):
            async with b:
                raise OSError("boom")
        assert b.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen) as info:
            await b.call(asyncio.sleep, 0)
        assert isinstance(info.value.__cause__, OSError)
        clock.now = 100.0
        assert await b.call(asyncio.sleep, 0, "result") == "result"
        assert b.state is BreakerState.CLOSED

    run(main())


def test_breaker_hook_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def bad_hook(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("hook bug")

    b = CircuitBreaker(threshold=1, on_change=bad_hook)
    with caplog.at_level(logging.ERROR, logger="millpond.resilience"):
        b.record_failure(OSError())
    assert b.state is BreakerState.OPEN
    assert "hook failed" in caplog.text
    b.reset()
    assert b.state is BreakerState.CLOSED
    assert b.stats() == {"state": "closed", "failures": 0, "opened": 1, "rejected": 0}


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 0}, {"probes": 0}, {"recovery": -1.0}, {"threshold": True}]
)
def test_breaker_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        CircuitBreaker(**kwargs)


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, outcomes and clock steps: the breaker keeps its promises."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.moves: list[tuple[BreakerState, BreakerState]] = []
        self.b = CircuitBreaker(
            threshold=3,
            recovery=2.0,
            probes=2,
            clock=self.clock,
            on_change=lambda old, new: self.moves.append((old, new)),
        )
        self.in_flight = 0
        self.last_state = self.b.state

    @rule(dt=st.floats(min_value=0, max_value=3))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def call(self) -> None:
        state, open_and_early = self.b.state, self.clock.now < self.b.retry_at
        admitted = self.b.allow()
        if state is BreakerState.OPEN and open_and_early:
            assert not admitted
        if state is BreakerState.CLOSED:
            assert admitted
        self.in_flight += admitted

    @precondition(lambda self: self.in_flight > 0)
    @rule(ok=st.booleans())
    def finish(self, ok: bool) -> None:
        self.in_flight -= 1
        before = self.b.state
        if ok:
            self.b.record_success()
        else:
            self.b.record_failure(OSError())
            if before is BreakerState.HALF_OPEN:
                assert self.b.state is BreakerState.OPEN

    @invariant()
    def moves_are_legal_and_reported(self) -> None:
        for old, new in self.moves:
            assert new in LEGAL_MOVES[old]
        if self.moves:
            assert self.moves[-1][1] is self.b.state
        if self.b.state is BreakerState.CLOSED:
            assert self.b.failures < self.b.threshold
        if self.b.state is BreakerState.HALF_OPEN:
            assert 0 <= self.b._probing <= self.b.probes
        assert self.b.opened == sum(1 for _, new in self.moves if new is BreakerState.OPEN)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- retry classification ---------------------------------------------------------------


class SqlError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("exc", "in_tx", "outside_tx"),
    [
        (SqlError("40001"), True, True),  # serialization failure
        (SqlError("40P01"), True, True),  # deadlock
        (SqlError("23505"), False, False),  # unique violation
        (SqlError("42601"), False, False),  # syntax error
        (DatabaseUnavailable("connect failed"), True, True),
        (CircuitOpen("breaker open"), True, True),
        (PoolTimeout("no connection"), False, False),
        (PoolOverloaded("queue full"), False, False),
        (PoolClosed("closed"), False, False),
        (CommitUnknown("lost during COMMIT"), False, False),
        (ConnectionResetError("reset"), True, False),  # lost: safe only in a transaction
        (TimeoutError(), False, False),
        (ValueError("application bug"), False, False),
        (asyncio.CancelledError(), False, False),
        (asyncpg.SerializationError("x"), True, True),
        (asyncpg.DeadlockDetectedError("x"), True, True),
        (asyncpg.UniqueViolationError("x"), False, False),
        (asyncpg.PostgresSyntaxError("x"), False, False),
        (asyncpg.ConnectionDoesNotExistError("closed mid-operation"), True, False),
        (asyncpg.AdminShutdownError("terminating connection"), True, False),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"), True, True),
        (asyncpg.InternalClientError("another operation (2) is in progress"), True, True),
        (asyncpg.QueryCanceledError("canceling statement"), False, False),
        (psycopg.errors.SerializationFailure("x"), True, True),
        (psycopg.errors.DeadlockDetected("x"), True, True),
        (psycopg.errors.UniqueViolation("x"), False, False),
        (psycopg.errors.SyntaxError("x"), False, False),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True, False),
        (psycopg.errors.AdminShutdown("terminating connection"), True, False),
        (psycopg.OperationalError("the connection is closed"), True, True),
        (psycopg.errors.QueryCanceled("canceling statement"), False, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_retry_classification(exc: BaseException, in_tx: bool, outside_tx: bool) -> None:
    assert is_retryable(exc) is in_tx
    assert is_retryable(exc, in_transaction=False) is outside_tx


def test_retry_call_retries_then_gives_up_with_a_note() -> None:
    async def main() -> None:
        calls: list[int] = []
        retries: list[tuple[int, float]] = []
        gave_up: list[BaseException] = []

        async def flaky() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise SqlError("40001")
            return "done"

        policy = RetryPolicy(attempts=3, base=0.001, cap=0.002)
        assert (
            await retry_call(flaky, policy, on_retry=lambda e, n, d: retries.append((n, d)))
            == "done"
        )
        assert [n for n, _ in retries] == [1, 2]
        assert all(0.0005 <= d <= 0.002 for _, d in retries)

        calls.clear()

        async def always() -> None:
            calls.append(1)
            raise SqlError("40P01")

        with pytest.raises(SqlError) as info:
            await retry_call(always, policy, on_give_up=gave_up.append)
        assert len(calls) == 3
        assert gave_up == [info.value]
        assert "3 of 3 attempts failed" in " ".join(info.value.__notes__)

    run(main())


def test_retry_call_respects_the_deadline_and_non_retryable_errors() -> None:
    async def main() -> None:
        clock = Clock()
        calls = 0

        async def slow_failure() -> None:
            nonlocal calls
            calls += 1
            clock.now += 4.0
            raise DatabaseUnavailable("down")

        policy = RetryPolicy(attempts=100, base=0.001, cap=0.001, deadline=10.0)
        with pytest.raises(DatabaseUnavailable) as info:
            await retry_call(slow_failure, policy, clock=clock)
        assert calls == 3  # at 12 s the next try would start past the deadline
        assert "deadline" in " ".join(info.value.__notes__)

        calls = 0

        async def bug() -> None:
            nonlocal calls
            calls += 1
            raise KeyError("not retryable")

        with pytest.raises(KeyError):
            await retry_call(bug, policy)
        assert calls == 1

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 1.5}, "attempts"),
        ({"base": 0}, "base"),
        ({"deadline": 0}, "deadline"),
    ],
)
def test_retry_policy_validates(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**kwargs)
    assert info.value.setting == setting


def test_public_names() -> None:
    for name in ("Backoff", "CircuitBreaker", "BreakerState", "RetryPolicy", "CommitUnknown"):
        assert name in millpond.__all__


# -- hard timeouts ----------------------------------------------------------------------


async def stubborn(first: float, second: float) -> None:
    """Absorbs the first cancellation (as psycopg does to cancel a query politely)."""
    try:
        await asyncio.sleep(first)
    except asyncio.CancelledError:
        await asyncio.sleep(second)
        raise


def test_hard_timeout_fires_on_plain_code() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with hard_timeout(0.05):
                await asyncio.sleep(5)
        assert loop.time() - start < 0.5
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        async with hard_timeout(None):
            await asyncio.sleep(0)
        async with hard_timeout(1):
            await asyncio.sleep(0)

    run(main())


def test_hard_timeout_holds_when_the_first_cancel_is_absorbed() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with hard_timeout(0.05, grace=0.05):
                await stubborn(5, 5)
        assert loop.time() - start < 0.5  # asyncio.timeout would take 5 s here
        start = loop.time()
        with pytest.raises(TimeoutError):  # a polite cancel that finishes within grace
            async with hard_timeout(0.05, grace=1):
                await stubborn(5, 0.01)
        assert loop.time() - start < 0.5

    run(main())


def test_hard_timeout_lets_outside_cancellation_through() -> None:
    async def main() -> None:
        async def inner() -> None:
            async with hard_timeout(0.05, grace=0.05):
                await stubborn(5, 5)

        task = asyncio.ensure_future(inner())
        await asyncio.sleep(0.07)  # our timeout fired once; now the caller cancels too
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
