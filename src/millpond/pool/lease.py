"""Leases: what ``pool.acquire()`` returns, and where a lease came from.

``pool.acquire()`` is both an async context manager (``async with pool.acquire() as
conn``) and an awaitable (``conn = await pool.acquire()`` then ``await
pool.release(conn)``). A context-manager lease that is garbage collected without
being released (its task was destroyed mid-block) is reclaimed with a warning.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millpond.pool.pool import Pool
    from millpond.pool.state import Slot


def capture_site() -> traceback.StackSummary:
    """Where the caller's caller is, cheaply (source lines are read only if reported)."""
    frames = traceback.walk_stack(sys._getframe(3))
    return traceback.StackSummary.extract(frames, limit=12, lookup_lines=False)


def format_site(site: Any) -> str:
    if isinstance(site, traceback.StackSummary):
        return "".join(reversed(site.format())).rstrip()
    return "(acquire site not recorded)"


class AcquireContext:
    """The result of ``pool.acquire()``."""

    __slots__ = ("_awaited", "_pool", "_slot", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._slot: Slot | None = None
        self._awaited = False

    async def __aenter__(self) -> Any:
        if self._slot is not None:
            raise RuntimeError("this acquire() context is already in use")
        pool = self._pool
        if pool._plain:  # no hooks: the fast path, no extra coroutine
            slot = pool._take_nowait()
            if slot is None:
                slot = await pool._wait_for_slot(self._timeout)
        else:
            slot = await pool._lease(self._timeout)
        self._slot = slot
        return slot.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            pool = self._pool
            if pool._plain:
                pool._give_back(slot, exc)
            else:
                await pool._return(slot, exc)

    def __await__(self) -> Generator[Any, None, Any]:
        self._awaited = True
        return self._pool._acquire_detached(self._timeout).__await__()

    def __del__(self) -> None:
        slot = self._slot
        if slot is not None and not self._awaited:
            self._slot = None
            warnings.warn(
                f"a connection lease of pool {self._pool.name!r} was garbage collected "
                f"without being released; reclaiming it",
                ResourceWarning,
                stacklevel=1,
            )
            self._pool._reclaim(slot)
