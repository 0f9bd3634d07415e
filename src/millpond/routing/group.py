"""A pool group: one primary and its replicas behind a pool's everyday API.

Reads go to replicas, writes to the primary. The one-shot helpers (``fetch``,
``fetchrow``, ``fetchval``, ``execute``) route each statement by what it does
(:mod:`.classify`); ``acquire(read_only=...)`` and ``transaction(readonly=...)`` route
as told. Which member is the primary, and which replicas are fresh enough to read
from, is learnt in the background (:mod:`.health`) and corrected at once when a
request sees otherwise: a write refused as read-only (SQLSTATE 25006) or a member that
cannot be reached starts a new check round, so after a failover writes reach the new
primary without a restart.

A read that fails because its member is unreachable (or, on a replica, because it
conflicted with recovery) is tried on the next member; nothing was written, so this is
safe. A write is sent again only when nothing can have been written: the connection
could not be made, or the server refused it as read-only.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar

from millpond.drivers.base import Driver, describe
from millpond.errors import DatabaseUnavailable, PoolClosed
from millpond.pool.pool import Pool
from millpond.pool.transact import Transaction
from millpond.resilience.retry import RetryPolicy, is_retryable, retry_call, sqlstate
from millpond.routing.balance import make_balancer
from millpond.routing.build import build_members, split_settings
from millpond.routing.classify import Classifier, Route, Verdict
from millpond.routing.config import GroupConfig, Member, as_member
from millpond.routing.consistency import ReadYourWrites
from millpond.routing.errors import NoPrimaryAvailable, NoReplicaAvailable
from millpond.routing.health import ROLE_SQL, URGENT_GAP, Monitor
from millpond.routing.lease import GroupLease
from millpond.routing.members import GroupStats, MemberState, Role
from millpond.routing.topology import Topology

if TYPE_CHECKING:
    from millpond.pool.lease import AcquireContext

log = logging.getLogger("millpond.routing")

T = TypeVar("T")
Op = Callable[[Pool], Awaitable[T]]

#: read_only_sql_transaction: the server is (now) a replica.
READ_ONLY_SQLSTATE = "25006"
#: On a replica, a query cancelled by a conflict with recovery; fine to run elsewhere.
RECOVERY_CONFLICT_SQLSTATE = "40001"


class _Counters:
    __slots__ = (
        "fallback_reads",
        "primary_reads",
        "replica_reads",
        "rerouted",
        "ryw_reads",
        "writes",
    )

    def __init__(self) -> None:
        self.replica_reads = self.primary_reads = self.fallback_reads = 0
        self.ryw_reads = self.writes = self.rerouted = 0


class PoolGroup:
    """A primary and its replicas, each a :class:`~millpond.Pool`, used as one pool.

    ``PoolGroup(primary, replicas, driver=..., **settings)``: ``primary`` and each
    replica are a DSN, a :class:`~millpond.Pool`, or a :class:`Member` (with a weight
    and pool settings of its own). ``settings`` holds group settings
    (:class:`GroupConfig`) and pool settings applied to every member the group creates.
    The group opens and closes every member's pool.
    """

    def __init__(
        self,
        primary: str | Pool | Member,
        replicas: Sequence[str | Pool | Member] = (),
        *,
        driver: str | Driver = "asyncpg",
        name: str | None = None,
        **settings: Any,
    ) -> None:
        group_settings, pool_settings = split_settings(settings)
        self.config = GroupConfig(**group_settings)
        self.name = name or "group"
        specs = [as_member(primary), *(as_member(r) for r in replicas)]
        self._members = build_members(self.name, specs, driver, pool_settings, self._verify_role)
        driver_name = self._members[0].pool.driver.name
        self._classifier = Classifier(
            read_only_functions=self.config.read_only_functions,
            placeholders="format" if driver_name == "psycopg" else "dollar",
            cache_size=self.config.cache_size,
        )
        self._topology = Topology(self._members, self.config)
        self._monitor = Monitor(self.name, self._topology)
        self._balancer = make_balancer(self.config.balance)
        self._counters = _Counters()
        self._ryw = (
            ReadYourWrites(self.name, self.config.ryw_window, self._topology)
            if self.config.read_your_writes is not None
            else None
        )
        self._detached: dict[int, tuple[MemberState, bool]] = {}
        self._opened = self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "new"
        writer = self._topology.writer
        readable = ",".join(m.name for m in self._topology.readable) or "none"
        primary = writer.name if writer else "none"
        return f"<millpond.PoolGroup {self.name!r} {state} primary={primary} replicas={readable}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Open every member's pool and start the health checks.

        With ``wait``, return after the first check round, which verifies every
        member's role; raise DatabaseUnavailable (and close) if no member answered.
        A group whose members answered but none as a primary opens anyway (reads work;
        writes raise NoPrimaryAvailable until a primary appears).
        """
        if self._closed:
            raise PoolClosed(f"group {self.name!r} is closed")
        if not self._opened:
            self._opened = True
            for member in self._members:
                await member.pool.open(wait=False)
            self._monitor.start()
        if wait:
            await self._wait_first_round(timeout)

    async def _wait_first_round(self, timeout: float | None) -> None:
        limit = timeout if timeout is not None else self.config.check_timeout + 5.0
        await self._monitor.wait_round(-math.inf, limit)
        if all(m.role is Role.UNKNOWN for m in self._members):
            reasons = "; ".join(f"{m.name}: {m.reason}" for m in self._members)
            await self.close(timeout=0)
            raise DatabaseUnavailable(f"group {self.name!r}: no member reachable ({reasons})")
        if self._topology.writer is None:
            log.warning(
                "group %r: opened without a primary: %s", self.name, self.stats().describe()
            )

    async def close(self, *, timeout: float | None = 10.0) -> None:
        """Stop the health checks, then close every member's pool (see ``Pool.close``)."""
        self._closed = True
        await self._monitor.stop()
        await asyncio.gather(*(m.pool.close(timeout=timeout) for m in self._members))

    async def __aenter__(self) -> PoolGroup:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __await__(self) -> Generator[Any, None, PoolGroup]:
        return self._open_and_return().__await__()

    async def _open_and_return(self) -> PoolGroup:
        await self.open()
        return self

    def is_ready(self) -> bool:
        """True when open, a primary is known and its pool is ready."""
        writer = self._topology.writer
        return self._opened and not self._closed and writer is not None and writer.pool.is_ready()

    async def refresh(self, timeout: float = 10.0) -> bool:
        """Re-check every member now; True if the round finished within ``timeout``."""
        return await self._monitor.wait_round(monotonic(), timeout)

    # -- routing -----------------------------------------------------------------------

    def classify(self, query: str) -> Verdict:
        """Where the one-shot helpers would send ``query`` by its content, and why."""
        return self._classifier.classify(query)

    def allow_functions(self, *names: str) -> None:
        """Treat these functions (``f`` or ``schema.f``) as read-only from now on."""
        self._classifier.allow_functions(names)

    @property
    def primary(self) -> Pool | None:
        """The current primary's pool, or None while none is known."""
        writer = self._topology.writer
        return None if writer is None else writer.pool

    @property
    def replicas(self) -> tuple[Pool, ...]:
        """The pools of the replicas in rotation now."""
        return tuple(m.pool for m in self._topology.readable)

    def _to_replica(self, query: str, read_only: bool | None) -> bool:
        if read_only is None:
            return self._classifier.classify(query).route is Route.REPLICA
        return read_only

    def _reader(self, tried: list[MemberState] | None) -> MemberState:
        """The member a read goes to (DESIGN principle 1: decided without I/O)."""
        topo = self._topology
        writer = topo.writer
        if writer is not None and tried and writer in tried:
            writer = None
        ryw = self._ryw
        floor = ryw.floor() if ryw is not None and writer is not None else None
        counters = self._counters
        if floor == math.inf and writer is not None:
            counters.ryw_reads += 1
            return self._count_read(writer)
        candidates: Sequence[MemberState] = topo.readable
        if tried or floor is not None:
            candidates = [m for m in candidates if m not in (tried or ()) and _has(m, floor)]
        if candidates:
            if ryw is not None and floor is not None and len(candidates) == len(topo.readable):
                ryw.caught_up()
            return self._count_read(self._balancer.pick(candidates))
        if writer is not None and floor is not None:
            counters.ryw_reads += 1
            return self._count_read(writer)
        if writer is not None and self.config.no_replica == "primary":
            counters.fallback_reads += 1
            return self._count_read(writer)
        raise self._no_reader()

    def _count_read(self, member: MemberState) -> MemberState:
        member.reads += 1
        if member is self._topology.writer:
            self._counters.primary_reads += 1
        else:
            self._counters.replica_reads += 1
        return member

    def _no_reader(self) -> DatabaseUnavailable:
        state = self.stats().describe()
        if self._topology.writer is None:
            return NoPrimaryAvailable(
                f"group {self.name!r}: no replica usable and no primary known ({state})"
            )
        return NoReplicaAvailable(f"group {self.name!r}: no replica usable ({state})")

    def _note_write(self) -> None:
        if self._ryw is not None:
            self._ryw.wrote()

    # -- reads and writes --------------------------------------------------------------

    async def _read(self, op: Op[T]) -> T:
        tried: list[MemberState] | None = None
        while True:
            member = self._reader(tried)
            member.in_flight += 1
            try:
                return await op(member.pool)
            except Exception as exc:
                tried = tried or []
                tried.append(member)
                elsewhere = self._read_failed(member, exc)
                if not elsewhere or len(tried) >= self.config.read_attempts:
                    raise
                self._counters.rerouted += 1
            finally:
                member.in_flight -= 1

    def _read_failed(self, member: MemberState, exc: BaseException) -> bool:
        """Learn from a failed read; True if it may be tried on another member."""
        if isinstance(exc, DatabaseUnavailable) or member.pool.driver.is_disconnect(exc):
            member.errors += 1
            self._topology.mark_failed(member, monotonic(), describe(exc))
            self._monitor.wake()
            return True
        return sqlstate(exc) == RECOVERY_CONFLICT_SQLSTATE and member.role is Role.REPLICA

    async def _write(self, op: Op[T]) -> T:
        member = await self._writer()
        try:
            return await self._on_writer(member, op)
        except Exception as exc:
            member = await self._writer_after(member, exc)
        self._counters.rerouted += 1
        return await self._on_writer(member, op)

    async def _on_writer(self, member: MemberState, op: Op[T]) -> T:
        member.in_flight += 1
        member.writes += 1
        self._counters.writes += 1
        try:
            return await op(member.pool)
        finally:
            member.in_flight -= 1
            self._note_write()

    async def _writer(self) -> MemberState:
        """The primary; waits up to ``wait_for_primary`` for one if none is known."""
        writer = self._topology.writer
        if writer is not None:
            return writer
        if self._closed:
            raise PoolClosed(f"group {self.name!r} is closed")
        if self.config.wait_for_primary > 0:
            writer = await self._await_writer(self.config.wait_for_primary, monotonic())
        if writer is None:
            self._monitor.wake()
            raise NoPrimaryAvailable(
                f"group {self.name!r}: no primary known ({self.stats().describe()})"
            )
        return writer

    async def _await_writer(self, timeout: float, after: float) -> MemberState | None:
        """Wait for a check round begun after ``after``, then for a primary, up to ``timeout``."""
        deadline = monotonic() + timeout
        await self._monitor.wait_round(after, timeout)
        while self._topology.writer is None and not self._closed:
            remaining = deadline - monotonic()
            if remaining <= 0:
                break
            await self._monitor.wait_round(monotonic(), remaining)
        return self._topology.writer

    async def _writer_after(self, member: MemberState, exc: Exception) -> MemberState:
        """A write failed: the primary to send it to again, or re-raise ``exc``."""
        if sqlstate(exc) == READ_ONLY_SQLSTATE:
            member.errors += 1
            self._demoted(member)
            wait = max(self.config.wait_for_primary, self.config.check_timeout + URGENT_GAP)
            new = await self._await_writer(wait, monotonic())
            if new is None or new is member:
                raise exc
            log.warning("group %r: write re-sent to the new primary %r", self.name, new.name)
            return new
        unsent = isinstance(exc, DatabaseUnavailable) or member.pool.driver.never_sent(exc)
        if unsent or member.pool.driver.is_disconnect(exc):
            member.errors += 1
            self._monitor.wake()
        if not unsent or self.config.wait_for_primary <= 0:
            raise exc
        new = await self._await_writer(self.config.wait_for_primary, monotonic())
        if new is None:
            raise NoPrimaryAvailable(f"group {self.name!r}: no primary to write to") from exc
        return new

    def _demoted(self, member: MemberState) -> None:
        if self._topology.drop_writer(member):
            log.warning(
                "group %r: %r refused a write as read-only; finding the new primary",
                self.name,
                member.name,
            )
        self._monitor.wake()

    async def _verify_role(self, member: MemberState, conn: Any) -> None:
        """``on_connect`` of the pools the group made: does the new session agree?"""
        driver = member.pool.driver
        in_recovery = bool(await driver.fetchval(conn, ROLE_SQL, (), 0, None))
        expected = {Role.PRIMARY: False, Role.REPLICA: True}.get(member.role)
        if expected is not None and expected != in_recovery:
            log.warning("group %r: %r changed role; re-checking", self.name, member.name)
            self._monitor.wake()

    # -- the everyday API ----------------------------------------------------------------

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, read_only: bool | None = None
    ) -> list[Any]:
        """Rows of ``query``; routed by content unless ``read_only`` says where."""
        if self._to_replica(query, read_only):
            return await self._read(lambda pool: pool.fetch(query, *args, timeout=timeout))
        return await self._write(lambda pool: pool.fetch(query, *args, timeout=timeout))

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, read_only: bool | None = None
    ) -> Any:
        if self._to_replica(query, read_only):
            return await self._read(lambda pool: pool.fetchrow(query, *args, timeout=timeout))
        return await self._write(lambda pool: pool.fetchrow(query, *args, timeout=timeout))

    async def fetchval(
        self,
        query: str,
        *args: Any,
        column: int = 0,
        timeout: float | None = None,
        read_only: bool | None = None,
    ) -> Any:
        def op(pool: Pool) -> Awaitable[Any]:
            return pool.fetchval(query, *args, column=column, timeout=timeout)

        if self._to_replica(query, read_only):
            return await self._read(op)
        return await self._write(op)

    async def execute(
        self, query: str, *args: Any, timeout: float | None = None, read_only: bool | None = None
    ) -> str:
        if self._to_replica(query, read_only):
            return await self._read(lambda pool: pool.execute(query, *args, timeout=timeout))
        return await self._write(lambda pool: pool.execute(query, *args, timeout=timeout))

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Always on the primary."""
        rows = args if isinstance(args, Sequence) else list(args)
        await self._write(lambda pool: pool.executemany(query, rows, timeout=timeout))

    def acquire(self, *, read_only: bool = False, timeout: float | None = None) -> GroupLease:
        """A connection to the primary, or with ``read_only`` to a replica (or fallback)."""
        return GroupLease(self, read_only, timeout)

    async def release(self, conn: Any) -> None:
        """Give back a connection obtained with ``conn = await group.acquire(...)``."""
        entry = self._detached.pop(id(conn), None)
        if entry is None:
            raise ValueError(f"{conn!r} was not lent by group {self.name!r}")
        member, read_only = entry
        try:
            await member.pool.release(conn)
        finally:
            member.in_flight -= 1
            if not read_only:
                self._note_write()

    @asynccontextmanager
    async def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> AsyncIterator[Any]:
        """``async with group.transaction(readonly=True) as conn``: BEGIN ... COMMIT.

        Read-only transactions run on a replica, except serializable ones (a hot
        standby refuses those), which run on the primary.
        """
        lease = self.acquire(read_only=readonly and not _serializable(isolation))
        async with lease as conn:
            tx = Transaction(lease.pool, conn, isolation, readonly, deferrable)
            await tx.begin()
            try:
                yield conn
            except BaseException as exc:
                await tx.rollback(exc)
                raise
            await tx.commit()

    async def run_transaction(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        retry: RetryPolicy | None = None,
        isolation: str | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> T:
        """``Pool.run_transaction`` across the group: each attempt is routed afresh, so a
        transaction that failed because the primary moved runs again on the new one."""

        async def attempt() -> T:
            async with self.transaction(
                isolation=isolation, readonly=readonly, deferrable=deferrable
            ) as conn:
                return await fn(conn)

        def retryable(exc: BaseException) -> bool:
            return sqlstate(exc) == READ_ONLY_SQLSTATE or is_retryable(exc, in_transaction=True)

        return await retry_call(attempt, retry or RetryPolicy(), retryable=retryable)

    # -- leases ------------------------------------------------------------------------

    async def _enter(
        self, read_only: bool, timeout: float | None, detached: bool = False
    ) -> tuple[MemberState, AcquireContext | None, Any]:
        if read_only:
            return await self._enter_read(timeout, detached)
        member = await self._writer()
        try:
            ctx, conn = await _open_lease(member, timeout, detached)
        except Exception as exc:
            member = await self._writer_after(member, exc)
            ctx, conn = await _open_lease(member, timeout, detached)
        member.writes += 1
        self._counters.writes += 1
        return member, ctx, conn

    async def _enter_read(
        self, timeout: float | None, detached: bool
    ) -> tuple[MemberState, AcquireContext | None, Any]:
        tried: list[MemberState] = []
        while True:
            member = self._reader(tried)
            try:
                ctx, conn = await _open_lease(member, timeout, detached)
            except Exception as exc:
                tried.append(member)
                elsewhere = self._read_failed(member, exc)
                if not elsewhere or len(tried) >= self.config.read_attempts:
                    raise
                self._counters.rerouted += 1
                continue
            return member, ctx, conn

    async def _exit(
        self, member: MemberState, ctx: AcquireContext, exc: BaseException | None, read_only: bool
    ) -> None:
        try:
            await ctx.__aexit__(None if exc is None else type(exc), exc, None)
        finally:
            member.in_flight -= 1
            if not read_only:
                self._note_write()
            if exc is not None:
                self._learn(member, exc)

    def _learn(self, member: MemberState, exc: BaseException) -> None:
        """An error escaped a lease's block: does it say something about the member?"""
        if sqlstate(exc) == READ_ONLY_SQLSTATE and member is self._topology.writer:
            member.errors += 1
            self._demoted(member)
        elif isinstance(exc, DatabaseUnavailable) or member.pool.driver.is_disconnect(exc):
            member.errors += 1
            self._topology.mark_failed(member, monotonic(), describe(exc))
            self._monitor.wake()

    async def _acquire_detached(self, read_only: bool, timeout: float | None) -> Any:
        member, _, conn = await self._enter(read_only, timeout, detached=True)
        self._detached[id(conn)] = (member, read_only)
        return conn

    # -- statistics --------------------------------------------------------------------

    def stats(self) -> GroupStats:
        """An immutable snapshot: every member's role, lag and rotation, and the counters."""
        now = monotonic()
        c = self._counters
        writer = self._topology.writer
        return GroupStats(
            name=self.name,
            primary=None if writer is None else writer.name,
            members=tuple(m.snapshot(now) for m in self._members),
            replica_reads=c.replica_reads,
            primary_reads=c.primary_reads,
            fallback_reads=c.fallback_reads,
            ryw_reads=c.ryw_reads,
            writes=c.writes,
            rerouted=c.rerouted,
            checks=self._topology.rounds,
            primary_changes=self._topology.primary_changes,
            cache_hits=self._classifier.hits,
            cache_misses=self._classifier.misses,
            cache_size=self._classifier.cached,
        )


async def _open_lease(
    member: MemberState, timeout: float | None, detached: bool
) -> tuple[AcquireContext | None, Any]:
    """Borrow from ``member``: as a context (released by ``_exit``) or detached."""
    if detached:
        conn = await member.pool.acquire(timeout=timeout)
        member.in_flight += 1
        return None, conn
    ctx = member.pool.acquire(timeout=timeout)
    conn = await ctx.__aenter__()
    member.in_flight += 1
    return ctx, conn


def _has(member: MemberState, floor: float | None) -> bool:
    """Has ``member`` replayed up to ``floor`` (read-your-writes by LSN)?"""
    if floor is None:
        return True
    return member.replay_lsn is not None and member.replay_lsn >= floor


def _serializable(isolation: str | None) -> bool:
    return isolation is not None and isolation.replace("_", " ").lower() == "serializable"


def create_group(
    primary: str | Pool | Member,
    replicas: Sequence[str | Pool | Member] = (),
    *,
    driver: str | Driver = "asyncpg",
    **kwargs: Any,
) -> PoolGroup:
    """A new group: ``async with create_group(...) as group`` or ``await create_group(...)``."""
    return PoolGroup(primary, replicas, driver=driver, **kwargs)
