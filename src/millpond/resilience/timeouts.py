"""A timeout that holds even when the code inside absorbs the first cancellation.

psycopg answers a cancelled query by sending the server a cancel request and waiting
for the query to stop, up to 10 s, before it gives up (and a server behind a dead
network never answers). ``asyncio.timeout`` therefore fires late there. :func:`hard_timeout`
cancels once when the time is up, giving the driver ``grace`` seconds to cancel
politely (the connection stays usable), then cancels again; psycopg then closes the
connection at once. Either way the caller gets ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: How long a driver may take to cancel politely after a timeout.
CANCEL_GRACE = 0.5


class hard_timeout:
    """``async with hard_timeout(seconds):`` raise TimeoutError after ``seconds`` (+ grace)."""

    __slots__ = ("_delay", "_fired", "_grace", "_handle", "_task")

    def __init__(self, delay: float | None, grace: float = CANCEL_GRACE) -> None:
        self._delay = delay
        self._grace = grace
        self._fired = 0
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> hard_timeout:
        if self._delay is not None:
            self._task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self._delay, self._fire)
        return self

    def _fire(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        self._fired += 1
        task.cancel()
        if self._fired == 1:
            self._handle = asyncio.get_running_loop().call_later(self._grace, self._fire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        task = self._task
        if not self._fired or task is None:
            return
        remaining = task.cancelling()
        for _ in range(self._fired):
            remaining = task.uncancel()
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and not remaining:
            raise TimeoutError(f"timed out after {self._delay:g}s") from exc
