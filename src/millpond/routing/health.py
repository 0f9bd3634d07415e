"""Background health checks of a group's members: roles, replay lag, reachability.

One :class:`Monitor` per group owns all of the group's background work through a
:class:`~millpond.pool.janitor.Janitor` (DESIGN principle 6): a tick decides whether a
check round is due, and a round probes every member at once, each bounded by
``check_timeout``, then hands the answers to :meth:`Topology.apply`. The monitor keeps
one connection of its own to each member for this, outside the member's pool. Requests
that saw something wrong (a member unreachable, a write refused as read-only) call
:meth:`Monitor.wake` for a round soon, at most one every ``URGENT_GAP`` seconds.

Stopping cancels the round under way and waits for it; a cancelled round changes
nothing, because the topology is only updated once every probe has answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
from time import monotonic
from typing import Any

from millpond.drivers.base import describe
from millpond.pool.janitor import Janitor
from millpond.resilience.timeouts import hard_timeout
from millpond.routing.members import MemberState
from millpond.routing.topology import Probe, Topology, parse_lsn, record_end

log = logging.getLogger("millpond.routing")

#: One round trip tells role, WAL positions, replay age, whether replay is paused, and
#: whether a primary was fenced read-only (``default_transaction_read_only = on``).
PROBE_SQL = (
    "SELECT r,"
    " (CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text,"
    " (CASE WHEN r THEN pg_last_wal_receive_lsn() END)::text,"
    " CASE WHEN r THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END,"
    " CASE WHEN r THEN pg_is_wal_replay_paused() END,"
    " current_setting('default_transaction_read_only')::bool"
    " FROM pg_is_in_recovery() AS r"
)

#: Run on every new connection of a member the group created, to verify its role.
ROLE_SQL = "SELECT pg_is_in_recovery()"

#: Least time between two rounds that requests asked for.
URGENT_GAP = 0.1


class Monitor:
    """Runs check rounds every ``check_interval`` seconds, or sooner when woken."""

    def __init__(self, name: str, topology: Topology) -> None:
        self.name = name
        self.topology = topology
        config = topology.config
        self.interval = config.check_interval
        self.timeout = config.check_timeout
        tick = max(0.01, min(URGENT_GAP, self.interval) / 2)
        self._janitor = Janitor(f"{name}:health", self._tick, tick)
        self._round: asyncio.Task[Any] | None = None
        self._urgent = False
        self._last_start = -math.inf
        #: start time of the last round that finished
        self.finished_start = -math.inf
        self._done = asyncio.Event()
        self._stopped = False
        self._conns: dict[int, Any] = {}  # member index -> the monitor's own connection

    def start(self) -> None:
        self._janitor.start()
        self._tick()

    async def stop(self) -> None:
        self._stopped = True
        await self._janitor.stop()
        self._round = None
        self._done.set()
        await self._close_connections()

    def wake(self) -> None:
        """Ask for a check round soon (re-discovery after a failure)."""
        self._urgent = True
        if not self._stopped:
            self._tick()

    async def wait_round(self, after: float, timeout: float) -> bool:
        """Wait until a round that began after ``after`` has finished; False on timeout."""
        deadline = monotonic() + timeout
        while self.finished_start <= after and not self._stopped:
            self.wake()
            remaining = deadline - monotonic()
            if remaining <= 0:
                return False
            done = self._done
            try:
                async with asyncio.timeout(remaining):
                    await done.wait()
            except TimeoutError:
                return False
        return self.finished_start > after

    # -- rounds ----------------------------------------------------------------------

    def _tick(self) -> None:
        if self._stopped or (self._round is not None and not self._round.done()):
            return
        since = monotonic() - self._last_start
        if since >= self.interval or (self._urgent and since >= URGENT_GAP):
            self._urgent = False
            self._last_start = monotonic()
            self._round = self._janitor.spawn(self._run_round(self._last_start), "check")

    async def _run_round(self, started: float) -> None:
        members = self.topology.members
        probes = await asyncio.gather(*(self._probe(m, started) for m in members))
        for level, message in self.topology.apply(probes, monotonic()):
            log.log(level, "group %r: %s", self.name, message)
        self.finished_start = started
        done, self._done = self._done, asyncio.Event()
        done.set()

    async def _probe(self, member: MemberState, started: float) -> Probe:
        try:
            async with hard_timeout(self.timeout):
                row = await self._ask(member)
        except TimeoutError:
            self._forget(member)
            return Probe(started, error=f"no answer within {self.timeout:g}s")
        except Exception as exc:
            self._forget(member)
            return Probe(started, error=describe(exc))
        except BaseException:
            self._forget(member)
            raise
        return _probe_from_row(started, row)

    async def _ask(self, member: MemberState) -> Any:
        """Run the probe on the monitor's own connection to ``member``.

        Not a pooled one: waiting for it would put the check in line behind the pool's
        borrowers, or behind its reconnect backoff after the server went away. A lost
        connection is replaced at the next check; reconnecting to a server that is down
        fails at once, to one that is back succeeds at once.
        """
        driver = member.pool.driver
        conn = self._conns.get(member.index)
        if conn is None or not driver.is_alive(conn):
            self._forget(member)
            timeout = min(member.pool.config.connect_timeout, self.timeout)
            conn = self._conns[member.index] = await driver.connect(timeout)
        return await driver.fetchrow(conn, PROBE_SQL, (), None)

    def _forget(self, member: MemberState) -> None:
        conn = self._conns.pop(member.index, None)
        if conn is not None:
            member.pool.driver.terminate(conn)

    async def _close_connections(self) -> None:
        for member in self.topology.members:
            conn = self._conns.pop(member.index, None)
            if conn is None:
                continue
            driver = member.pool.driver
            try:
                async with hard_timeout(min(1.0, self.timeout)):
                    await driver.close(conn)
            except Exception:
                driver.terminate(conn)


def _probe_from_row(started: float, row: Any) -> Probe:
    in_recovery = bool(row[0])
    lsn = parse_lsn(row[1])
    if lsn is not None and not in_recovery:
        lsn = record_end(lsn)
    return Probe(
        started,
        in_recovery=in_recovery,
        lsn=lsn,
        receive_lsn=parse_lsn(row[2]),
        replay_age=None if row[3] is None else max(0.0, float(row[3])),
        paused=None if row[4] is None else bool(row[4]),
        read_only=bool(row[5]) and not in_recovery,
    )
