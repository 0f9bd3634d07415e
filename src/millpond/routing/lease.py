"""Leases of a pool group: what ``group.acquire(read_only=...)`` returns.

Like a pool's lease it is both an async context manager (``async with
group.acquire() as conn``) and an awaitable (``conn = await group.acquire()`` then
``await group.release(conn)``). It remembers which member lent the connection so the
group can count, balance, and learn from errors raised inside the block (a write
refused as read-only means the primary changed; a lost connection means a member
may be down).
"""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from millpond.pool.lease import AcquireContext
    from millpond.pool.pool import Pool
    from millpond.routing.group import PoolGroup
    from millpond.routing.members import MemberState


class GroupLease:
    """The result of ``group.acquire()``."""

    __slots__ = ("_ctx", "_group", "_member", "_read_only", "_timeout")

    def __init__(self, group: PoolGroup, read_only: bool, timeout: float | None) -> None:
        self._group = group
        self._read_only = read_only
        self._timeout = timeout
        self._member: MemberState | None = None
        self._ctx: AcquireContext | None = None

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def member(self) -> str | None:
        """The name of the member that lent the connection (inside the block)."""
        return None if self._member is None else self._member.name

    @property
    def pool(self) -> Pool:
        """The pool that lent the connection (inside the block)."""
        if self._member is None:
            raise RuntimeError("the lease holds no connection")
        return self._member.pool

    async def __aenter__(self) -> Any:
        if self._ctx is not None:
            raise RuntimeError("this acquire() context is already in use")
        member, ctx, conn = await self._group._enter(self._read_only, self._timeout)
        self._member, self._ctx = member, ctx
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        member, ctx = self._member, self._ctx
        self._member = self._ctx = None
        if member is not None and ctx is not None:
            await self._group._exit(member, ctx, exc, self._read_only)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._group._acquire_detached(self._read_only, self._timeout).__await__()
