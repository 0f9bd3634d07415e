"""Server-connection pools, one per (database, user), built on the library pool core.

The proxy cannot await on its hot path (it runs inside Protocol callbacks), so
:class:`ServerPool` adds callback-style leasing to :class:`millpond.Pool`: take an
idle server connection synchronously, or queue a callback that the pool core's
direct hand-off resolves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

from millpond.config import PoolConfig
from millpond.errors import PoolClosed
from millpond.pool.core import Waiter
from millpond.pool.pool import Pool
from millpond.pool.state import CloseReason, Slot
from millpond.proxy.backend import ServerDriver, ServerTarget
from millpond.proxy.config import DatabaseEntry, ProxyConfig, UserEntry
from millpond.proxy.tcp import socket_options
from millpond.proxy.tls import ServerTLS

if TYPE_CHECKING:
    from millpond.proxy.lane import PoolLane

_FOREVER = 10 * 365 * 86400.0  # PgBouncer's "0 disables the timeout"


class Handoff(Protocol):
    """What the pool core hands a server connection to, synchronously: it quacks like
    the future the core expects. A waiting ClientConnection is one itself."""

    def done(self) -> bool: ...
    def set_result(self, slot: Slot) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...


class Keeper(Protocol):
    """An idle client still holding its last server connection (server affinity)."""

    def unkeep(self, now: float = 0.0) -> None: ...


class DirectWaiter:
    """A :class:`Handoff` that calls back (the proxy's logins use it)."""

    __slots__ = ("_done", "on_error", "on_slot")

    def __init__(
        self, on_slot: Callable[[Slot], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self.on_slot = on_slot
        self.on_error = on_error
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, slot: Slot) -> None:
        self._done = True
        self.on_slot(slot)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self.on_error(exc)


@dataclass(slots=True)
class PoolCounters:
    """Totals for SHOW STATS, counted on the forwarding path."""

    xact_count: int = 0
    query_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_time: float = 0.0
    pinned: int = 0  # clients pinned to a server connection by session state
    errors: dict[str, int] = field(default_factory=dict)


class ServerPool(Pool):
    """The server connections for one (database, user) pair."""

    def __init__(
        self, *, database: str, user: str, mode: str, driver: ServerDriver, **settings: Any
    ) -> None:
        super().__init__(driver=driver, name=f"{database}/{user}", **settings)
        self.database = database
        self.user = user
        self.mode = mode
        self.server_driver = driver
        self.counters = PoolCounters()
        self.base_size = self.config.max_size
        self.reserve = 0  # reserve_pool_size
        self.reserve_timeout = 5.0  # reserve_pool_timeout
        self.paused = False
        self.session_pinning = "pin"
        #: rewrite named prepared statements (transaction/statement modes; PgBouncer 1.21+)
        self.rewrites = mode != "session" and driver.target.max_prepared > 0
        #: server affinity: in transaction and statement modes an idle client keeps its
        #: last server connection until someone else needs it (see :meth:`take_kept`)
        self.affinity = False
        #: the clients keeping one, oldest first (a dict as an ordered set)
        self.kept: dict[Keeper, None] = {}
        #: the core's queue and counters, for the clients' hot path (the same objects)
        self.waiters = self._core.waiters
        self.lends = self._core.counters
        #: the compiled lane (transaction mode, when built and enabled; see lane.py)
        self.lane: PoolLane | None = None

    def start(self) -> None:
        """Open without waiting (prewarming to min_pool_size happens in the background)."""
        if not self._opened:
            self._opened = True
            self._loop = asyncio.get_running_loop()
            self._janitor.start()
            self._housekeep()

    #: An idle server connection now, or None (PoolClosed if the pool is closed).
    take = Pool._take_nowait

    def take_kept(self, now: float = 0.0) -> Slot | None:
        """No server was idle: take back the one kept longest, and lend it (or None).

        What PgBouncer's pool would hold as idle, a kept server holds for one client
        as a shortcut; the first other client that needs it gets it at once.
        """
        kept = self.kept
        while kept:
            next(iter(kept)).unkeep(now)  # back to the pool core, as any release
            slot = self._take_nowait(now)
            if slot is not None:
                return slot
        return None

    def keepable(self, slot: Slot, now: float) -> bool:
        """May an idle client keep ``slot``? Not once it is due to retire (its lifetime
        is over, RECONNECT marked it, the pool closes): the release retires it then."""
        return self._core._retire_reason(slot, now) is None

    def release_kept(self) -> None:
        """Every kept server back to the pool (the sweep, admin commands, pause, reload):
        what the core and SHOW see is then what it would be without affinity."""
        for client in list(self.kept):
            client.unkeep()

    def wait(self, handoff: Handoff, now: float = 0.0, *, own: bool = False) -> Waiter:
        """Queue for a server connection, handed to ``handoff`` synchronously.

        No future, timer or extra loop iteration per wait: the proxy's sweep enforces
        query_wait_timeout (see :meth:`expire`). ``own``: the lane's own request.
        """
        if self._closing:
            raise PoolClosed(f"pool {self.name!r} is closed")
        waiter = self._core.wait(handoff, now or monotonic())  # type: ignore[arg-type]
        if self._core.todo:
            self._flush()
        if not own and self.lane is not None:
            self.lane.owe()  # the lane gives a server back at its next release
        return waiter

    def cancel_wait(self, handle: Waiter) -> None:
        """Out of the queue: nothing will be handed to it any more."""
        self._core.forget_waiter(handle)

    def expire(self, handle: Waiter) -> None:
        """A waiter ran out of query_wait_timeout: count it and take it out of the queue."""
        self._core.counters.timeouts += 1
        self.cancel_wait(handle)

    def use_reserve(self, now: float) -> None:
        """reserve_pool_size: a client waited past reserve_pool_timeout, so allow more."""
        if not self.reserve or self.config.max_size > self.base_size:
            return
        oldest = min((w.since for w in self._core.waiters if w.queued), default=now)
        if now - oldest < self.reserve_timeout:
            return
        self._resize(self.base_size + self.reserve)
        self._core.retry_connects(now)
        self._flush()

    def drop_reserve(self) -> None:
        """Nobody waits: back to pool_size (extra connections go as they idle out)."""
        if self.config.max_size > self.base_size and not self._core.waiters:
            self._resize(self.base_size)

    def _resize(self, size: int) -> None:
        config = replace(self.config, max_size=size)
        self.config = config
        self._core.config = config

    def reconnect(self) -> None:
        """Close idle server connections now, and lent ones when they come back."""
        self.release_kept()
        if self.lane is not None:
            self.lane.close()
        core = self._core
        for slot in core.slots.values():
            slot.retire = CloseReason.LIFETIME
        while core.idle:
            core._retire(core.idle.pop(), CloseReason.LIFETIME)
        self._flush()

    def reconfigure(self, mode: str, settings: dict[str, Any]) -> None:
        """New sizes and timeouts after a reload; connections adapt as they cycle."""
        self.release_kept()
        if self.lane is not None:
            self.lane.close()
        self.mode = mode
        self.rewrites = mode != "session" and self.server_driver.target.max_prepared > 0
        config = PoolConfig(**settings)
        self.config = config
        self._core.config = config
        self.base_size = config.max_size

    #: Return a server connection (synchronously; resets run in the background).
    give = Pool._give_back


def pool_settings(config: ProxyConfig, db: DatabaseEntry, user: UserEntry | None) -> dict[str, Any]:
    """Map PgBouncer's settings for one pool onto the pool core's settings."""
    s = config.settings
    size = (db.pool_size if db.pool_size is not None else None) or (
        user.pool_size if user is not None and user.pool_size is not None else s.default_pool_size
    )
    size = max(1, size)
    min_size = db.min_pool_size if db.min_pool_size is not None else s.min_pool_size
    lifetime = db.server_lifetime if db.server_lifetime is not None else s.server_lifetime
    wait = db.query_wait_timeout if db.query_wait_timeout is not None else s.query_wait_timeout
    return {
        "min_size": min(min_size, size),
        "max_size": size,
        "acquire_timeout": wait or _FOREVER,
        "max_idle": s.server_idle_timeout or None,
        "max_lifetime": lifetime or None,
        "connect_timeout": s.server_connect_timeout or _FOREVER,
        "validate_idle_after": s.server_check_delay or 1e-9,
        "health_check_interval": None,
        "max_concurrent_connects": min(size, 4),
        "reconnect_delay": min(0.1, s.server_login_retry or 0.1),
        "reconnect_delay_max": max(0.1, s.server_login_retry),
        "reset_timeout": s.server_connect_timeout or 15.0,
    }


def pool_mode(config: ProxyConfig, db: DatabaseEntry, user: UserEntry | None) -> str:
    if user is not None and user.pool_mode is not None:
        return user.pool_mode
    return db.pool_mode or config.settings.pool_mode


def server_target(
    config: ProxyConfig, db: DatabaseEntry, client_user: str, password: str | None
) -> ServerTarget:
    startup = tuple(
        (name, value)
        for name, value in (
            ("client_encoding", db.client_encoding),
            ("DateStyle", db.datestyle),
            ("TimeZone", db.timezone),
            ("application_name", db.application_name),
        )
        if value
    )
    return ServerTarget(
        host=db.hosts[0] if db.hosts else None,
        port=db.port,
        database=db.dbname or db.name,
        user=db.user or client_user,
        password=db.password if db.user else (db.password or password),
        socket_dir=config.settings.unix_socket_dir or "/tmp",
        startup=startup,
        connect_query=db.connect_query,
        max_prepared=config.settings.max_prepared_statements,
        tls=ServerTLS.from_settings(config.settings),
        socket_options=socket_options(config.settings),
    )
