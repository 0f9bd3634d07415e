"""The janitor: owns every background task a pool runs (DESIGN principle 6).

Connects, resets, health checks and graceful closes are spawned here, named, and
tracked, so closing the pool can cancel and await every one of them; the periodic
housekeeping loop lives here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("millpond.pool")


class Janitor:
    """Named background tasks for one pool, plus a periodic tick."""

    def __init__(self, name: str, tick: Callable[[], None], interval: float) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = self.spawn(self._run(), "housekeeping")

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"millpond:{self.name}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def busy(self) -> int:
        """Background tasks under way, not counting the housekeeping loop."""
        return len(self._tasks) - (1 if self._loop_task in self._tasks else 0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._tick()
            except Exception:  # a bug in one tick must not end housekeeping for good
                log.exception(
                    "%s: housekeeping failed; it runs again in %gs", self.name, self.interval
                )

    async def stop(self) -> None:
        """Cancel everything and wait until it has all finished."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
