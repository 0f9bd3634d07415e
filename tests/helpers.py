"""Small helpers shared by the test suite (no pytest plugins needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from millpond.embedded import PostgresCluster

T = TypeVar("T")

#: What the ``own_cluster`` fixture returns: call it to get a started private cluster.
ClusterFactory = Callable[..., PostgresCluster]

DEFAULT_TIMEOUT = 60.0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, T], *, timeout: float = DEFAULT_TIMEOUT) -> T:
    """Run ``coro`` on a fresh event loop (uvloop when available), failing after ``timeout`` s."""

    async def guarded() -> T:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await coro
        except TimeoutError as exc:
            if scope.expired():
                raise TimeoutError(f"test coroutine still running after {timeout} s") from exc
            raise

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(guarded())


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` (every millisecond) until it is true; fail after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"not reached in {timeout} s: {what or predicate}")
        await asyncio.sleep(0.001)
