"""Limits across pools: max_db_connections and max_user_connections.

Each (database, user) pool sizes itself, but PgBouncer also caps server connections
per database and per user across all their pools. A :class:`Budget` counts those
connections; a pool's connect waits for room in every budget it belongs to (up to
server_connect_timeout, then the pool core's backoff retries), and a closed server
connection gives its room back.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Budget:
    """Room for at most ``limit`` server connections (0: unlimited)."""

    __slots__ = ("_waiters", "limit", "name", "used")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<Budget {self.name} {self.used}/{self.limit or 'unlimited'}>"

    async def take(self, timeout: float) -> None:
        """Wait for room; TimeoutError when none frees up in time."""
        if not self.limit or (self.used < self.limit and not self._waiters):
            self.used += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            async with asyncio.timeout(timeout):
                await future  # the releaser counted us in already
        except BaseException:
            if future.done() and not future.cancelled():
                self.give_back()  # room arrived as we gave up: pass it on
            else:
                future.cancel()
            raise

    def give_back(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # hand the room straight over
                return
        self.used -= 1


class Budgets:
    """The per-database and per-user budgets of one proxy."""

    def __init__(self) -> None:
        self.by_database: dict[str, Budget] = {}
        self.by_user: dict[str, Budget] = {}

    def for_pool(
        self, database: str, db_limit: int, user: str, user_limit: int
    ) -> tuple[Budget, ...]:
        db = self.by_database.setdefault(database, Budget(f"database {database}", db_limit))
        us = self.by_user.setdefault(user, Budget(f"user {user}", user_limit))
        db.limit, us.limit = db_limit, user_limit  # a reload may change them
        return tuple(b for b in (db, us) if b.limit)
