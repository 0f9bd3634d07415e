"""What the admin console's commands do to a running proxy, and what it keeps per proxy.

:mod:`millpond.proxy.admin` parses and answers the commands; the actions here (PAUSE and
RESUME of one database or all, KILL, RELOAD's swap of the configuration, SHUTDOWN) and
the console's own state (its counters, the averages' samples, the databases paused one
by one) are shared with the proxy's signal handlers.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from millpond.pool.state import SlotState
from millpond.proxy import admin_stats as stats
from millpond.proxy.config import ProxyConfig

if TYPE_CHECKING:
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy


# -- per-proxy state --------------------------------------------------------------------


@dataclass
class AdminState:
    """What the console keeps for one proxy: its own counters, averages, paused databases."""

    paused_dbs: set[str] = field(default_factory=set)
    commands: int = 0
    history: stats.StatsHistory = field(default_factory=stats.StatsHistory)
    sampling: bool = False

    def admin_totals(self) -> stats.StatsTotals:
        return stats.StatsTotals(xact_count=self.commands, query_count=self.commands)


_STATES: weakref.WeakKeyDictionary[Proxy, AdminState] = weakref.WeakKeyDictionary()


def admin_state(proxy: Proxy) -> AdminState:
    state = _STATES.get(proxy)
    if state is None:
        state = _STATES[proxy] = AdminState()
    return state


def start_stats(proxy: Proxy) -> None:
    """Sample the totals every ``stats_period`` for the averages (once per proxy)."""
    state = admin_state(proxy)
    if not state.sampling:
        state.sampling = True
        proxy.janitor.spawn(_sample_stats(proxy, state), "stats")


async def _sample_stats(proxy: Proxy, state: AdminState) -> None:
    loop = asyncio.get_running_loop()
    while True:
        state.history.sample(stats.database_totals(proxy, state.admin_totals()), loop.time())
        await asyncio.sleep(proxy.config.settings.stats_period)


def paused_databases(proxy: Proxy) -> set[str]:
    """Databases paused one by one (``Proxy.paused_databases`` once the proxy keeps it)."""
    own = getattr(proxy, "paused_databases", None)
    return own if isinstance(own, set) else admin_state(proxy).paused_dbs


# -- actions ----------------------------------------------------------------------------


def pools_of(proxy: Proxy, database: str | None) -> list[ServerPool]:
    return [p for p in proxy.pools.values() if database is None or p.database == database]


_BUSY = frozenset({SlotState.IN_USE, SlotState.CHECKING, SlotState.RESETTING})
_GONE = frozenset({SlotState.CLOSING, SlotState.BROKEN, SlotState.CLOSED})


def busy_servers(pool: ServerPool) -> bool:
    return any(slot.state in _BUSY for slot in pool._core.slots.values())


def closing_servers(pool: ServerPool) -> bool:
    """Servers still marked close_needed (SHOW SERVERS), which WAIT_CLOSE waits for."""
    return any(
        slot.retire is not None and slot.state not in _GONE for slot in pool._core.slots.values()
    )


def reconnect_pool(pool: ServerPool) -> None:
    pool.reconnect()  # idle servers close now, lent ones when released


def pause_database(proxy: Proxy, database: str) -> None:
    paused_databases(proxy).add(database)
    for pool in pools_of(proxy, database):
        pool.paused = True
        pool.release_kept()


def resume_databases(proxy: Proxy, database: str | None) -> None:
    """RESUME everything (``None``) or one database; parked clients of unpaused pools go on."""
    paused = paused_databases(proxy)
    if database is None and not paused:
        proxy.resume()
        return
    if database is None:
        proxy.paused = False
    else:
        paused.discard(database)
    for pool in proxy.pools.values():
        pool.paused = proxy.paused or pool.database in paused
    for client in list(proxy.parked):
        if client.pool is not None and not client.pool.paused:
            del proxy.parked[client]
            client.resume_from_pause()


def kill_database(proxy: Proxy, database: str) -> None:
    """KILL: pause the database, drop its clients and close its pools at once."""
    hook = getattr(proxy, "kill", None)
    if callable(hook):
        hook(database)
        return
    pause_database(proxy, database)
    for client in list(proxy.clients):
        if client.admin is None and client.database == database:
            client.fail("08P01", "database removed")
    for key, pool in list(proxy.pools.items()):
        if pool.database == database:
            del proxy.pools[key]
            proxy.janitor.spawn(pool.close(timeout=0), f"kill-{pool.name}")


def apply_config(proxy: Proxy, config: ProxyConfig, tls: Any) -> None:
    """Swap in a new configuration (``Proxy.apply_config`` when the proxy has it)."""
    hook = getattr(proxy, "apply_config", None)
    if callable(hook):
        hook(config, tls)
        return
    proxy.config = config
    proxy.client_tls = tls


def start_shutdown(proxy: Proxy, mode: str) -> None:
    """SHUTDOWN: "immediate", "safe" (WAIT_FOR_SERVERS) or "super-safe" (WAIT_FOR_CLIENTS)."""
    hook = getattr(proxy, "start_shutdown", None) or getattr(proxy, "_start_shutdown", None)
    if callable(hook):
        hook(mode)
        return
    proxy.janitor.spawn(proxy.shutdown(), "shutdown")
