"""Read-your-writes: a caller's reads after its own write go where the write is visible.

Each asyncio task (more exactly, each :mod:`contextvars` context) has its own mark of
when it last wrote through the group; tasks it starts afterwards inherit it. Two modes:

- a window (``read_your_writes=2.0``): for that many seconds after a write, the
  caller's reads go to the primary;
- ``"lsn"``: the caller's reads go only to replicas that have replayed the primary's
  WAL position as of the first health check that began after the write, and to the
  primary until that check has run. No extra round trip is made per write or per read:
  the positions come from the health checks, so reads return to replicas within one
  or two ``check_interval`` of a write.

While no primary is known the marks are ignored (the replicas are all there is).
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from time import monotonic

from millpond.routing.topology import Topology


class _WriteMark:
    """When this context last wrote; the WAL position it must see, once known."""

    __slots__ = ("at", "lsn")

    def __init__(self, at: float) -> None:
        self.at = at
        self.lsn: int | None = None


class ReadYourWrites:
    """The per-context write marks of one group."""

    def __init__(self, name: str, window: float | None, topology: Topology) -> None:
        self.window = window
        self._topology = topology
        self._mark: ContextVar[_WriteMark | None] = ContextVar(
            f"millpond_last_write_{name}", default=None
        )

    def wrote(self) -> None:
        """The current context has just written (or tried to)."""
        self._mark.set(_WriteMark(monotonic()))

    def caught_up(self) -> None:
        """Every replica has the write: stop constraining this context's reads."""
        self._mark.set(None)

    def floor(self) -> float | None:
        """None: any replica; an LSN: replicas that replayed it; inf: the primary only."""
        mark = self._mark.get()
        if mark is None:
            return None
        if self.window is not None:
            if monotonic() - mark.at < self.window:
                return math.inf
            self._mark.set(None)
            return None
        if mark.lsn is None:
            mark.lsn = self._topology.lsn_after(mark.at)
            if mark.lsn is None:
                return math.inf
        return float(mark.lsn)
