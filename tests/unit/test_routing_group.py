"""A pool group over fake servers: routing, fallbacks, failover, read-your-writes.

Each fake server answers the group's health check and role check from a few fields a
test flips (role, WAL positions, replay age, up or down), records every statement it
ran, and refuses writes with SQLSTATE 25006 while it is a replica, as PostgreSQL does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from millpond import Pool
from millpond.drivers.memory import MemoryConnection, MemoryDriver
from millpond.errors import DatabaseUnavailable
from millpond.routing import Member, NoPrimaryAvailable, NoReplicaAvailable, PoolGroup
from millpond.routing.classify import Classifier, Route
from millpond.routing.health import PROBE_SQL, ROLE_SQL
from tests.helpers import run

_WRITES = Classifier()


def _writes(query: str) -> bool:
    """What the fake refuses on a replica: DML and sequences."""
    return query.split()[0].upper() in ("INSERT", "UPDATE", "DELETE") or "nextval" in query


class ReadOnlyTransaction(Exception):
    sqlstate = "25006"


class Server:
    """What a fake member pretends to be."""

    def __init__(self, name: str, *, replica: bool, lsn: int = 0x3000000) -> None:
        self.name = name
        self.replica = replica
        self.lsn = lsn
        self.replay_age: float | None = 0.0
        self.down = False
        self.fenced = False  # default_transaction_read_only on a primary
        self.queries: list[str] = []

    def probe(self) -> tuple[Any, ...]:
        lsn = f"{self.lsn >> 32:X}/{self.lsn & 0xFFFFFFFF:X}"
        if not self.replica:
            return (False, lsn, None, None, None, self.fenced)
        return (True, lsn, lsn, self.replay_age, False, True)

    def answer(self, query: str) -> Any:
        if query == PROBE_SQL:
            return self.probe()
        if query == ROLE_SQL:
            return self.replica
        self.queries.append(query)
        if (self.replica or self.fenced) and _writes(query):
            raise ReadOnlyTransaction("cannot execute INSERT in a read-only transaction")
        return self.name

    def ran(self, query: str) -> bool:
        return query in self.queries


class FakeDriver(MemoryDriver):
    """The memory driver, answering as ``server``."""

    def __init__(self, server: Server) -> None:
        super().__init__(None, {})
        self.server = server

    async def connect(self, timeout: float) -> MemoryConnection:
        if self.server.down:
            raise DatabaseUnavailable(f"{self.server.name} is down") from ConnectionRefusedError()
        return await super().connect(timeout)

    def _run(self, conn: MemoryConnection, query: str) -> Any:
        if self.server.down or not conn.alive:
            conn.alive = False
            raise ConnectionResetError(f"{self.server.name} went away")
        return self.server.answer(query)

    async def fetch(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> list[Any]:
        await asyncio.sleep(0)
        return [(self._run(conn, query),)]

    async def fetchrow(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> Any:
        await asyncio.sleep(0)
        value = self._run(conn, query)
        return value if isinstance(value, tuple) else (value,)

    async def fetchval(
        self,
        conn: MemoryConnection,
        query: str,
        args: Sequence[Any],
        column: int,
        timeout: float | None,
    ) -> Any:
        await asyncio.sleep(0)
        return self._run(conn, query)

    async def execute(
        self, conn: MemoryConnection, query: str, args: Sequence[Any], timeout: float | None
    ) -> str:
        await asyncio.sleep(0)
        self._run(conn, query)
        return "OK"


def make_group(servers: Sequence[Server], **settings: Any) -> PoolGroup:
    settings.setdefault("check_interval", 60.0)  # tests drive rounds with refresh()
    settings.setdefault("check_timeout", 1.0)
    members = [Member(f"fake://{s.name}", name=s.name, driver=FakeDriver(s)) for s in servers]
    return PoolGroup(members[0], members[1:], min_size=0, max_size=4, **settings)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    yield [Server("p", replica=False), Server("r1", replica=True), Server("r2", replica=True)]
    gc.collect()


READ = "SELECT * FROM t"
WRITE = "INSERT INTO t VALUES (1)"


def test_reads_go_to_replicas_and_writes_to_the_primary(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers) as group:
            assert await group.fetchval(READ) in ("r1", "r2")
            assert await group.fetch(READ) in ([("r1",)], [("r2",)])
            assert (await group.fetchrow(READ))[0] in ("r1", "r2")
            assert await group.execute("SHOW work_mem") == "OK"
            assert await group.execute(WRITE) == "OK"
            assert await group.fetchval("SELECT nextval('s')") == "p"
            assert await group.fetchval("SELECT * FROM t FOR UPDATE") == "p"
            await group.executemany("SELECT 1", [(1,), (2,)])
            stats = group.stats()
            assert stats.replica_reads == 4
            assert stats.writes == 4
            assert stats.primary == "p"
            assert stats.in_rotation == ("r1", "r2")

    run(main(), timeout=10)
    assert not any(
        _WRITES.route(q) is Route.PRIMARY for q in servers[1].queries + servers[2].queries
    )


def test_explicit_routing_overrides_classification(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers) as group:
            assert await group.fetchval(READ, read_only=False) == "p"
            assert await group.fetchval("SELECT my_report()", read_only=True) in ("r1", "r2")
            assert await group.fetchval("SELECT my_report()") == "p"
            group.allow_functions("my_report")
            assert await group.fetchval("SELECT my_report()") in ("r1", "r2")
            assert group.classify("SELECT 1").read_only

    run(main(), timeout=10)


def test_acquire_and_transaction_routing(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers) as group:
            async with group.acquire(read_only=True) as conn:
                assert conn in servers_conns(group, "r1", "r2")
            async with group.acquire() as conn:
                assert conn in servers_conns(group, "p")
            lease = group.acquire(read_only=True)
            async with lease:
                assert lease.member in ("r1", "r2")
            async with group.transaction(readonly=True) as conn:
                assert conn in servers_conns(group, "r1", "r2")
            async with group.transaction() as conn:
                assert conn in servers_conns(group, "p")
            async with group.transaction(readonly=True, isolation="serializable") as conn:
                assert conn in servers_conns(group, "p")  # a standby refuses serializable
            conn = await group.acquire(read_only=True)
            assert conn in servers_conns(group, "r1", "r2")
            await group.release(conn)
            with pytest.raises(ValueError, match="not lent"):
                await group.release(conn)
            assert all(m.in_flight == 0 for m in group.stats().members)

    run(main(), timeout=10)


def servers_conns(group: PoolGroup, *names: str) -> list[Any]:
    found = []
    for member in group._members:
        if member.name in names:
            found.extend(member.pool.driver.opened)  # type: ignore[attr-defined]
    return found


def test_no_replica_falls_back_to_the_primary_or_fails(servers: list[Server]) -> None:
    r1, r2 = servers[1:]
    r1.down = r2.down = True

    async def main() -> None:
        async with make_group(servers) as group:
            assert await group.fetchval(READ) == "p"
            assert group.stats().fallback_reads == 1
        async with make_group(servers, no_replica="fail") as group:
            with pytest.raises(NoReplicaAvailable):
                await group.fetchval(READ)
            assert await group.execute(WRITE) == "OK"

    run(main(), timeout=10)


def test_lagging_replica_leaves_rotation_and_comes_back(servers: list[Server]) -> None:
    p, r1, r2 = servers

    async def main() -> None:
        async with make_group(servers, max_lag=1.0) as group:
            p.lsn += 4096
            r2.lsn = p.lsn
            r1.replay_age = 5.0
            await group.refresh()
            member = group.stats().member("r1")
            assert not member.in_rotation
            assert member.reason == "lagging 5.0s (max 1s)"
            assert member.lag_bytes == 4096
            assert {await group.fetchval(READ) for _ in range(10)} == {"r2"}
            r1.lsn = p.lsn
            await group.refresh()
            assert group.stats().member("r1").in_rotation
            assert {await group.fetchval(READ) for _ in range(10)} == {"r1", "r2"}

    run(main(), timeout=10)


def test_unreachable_replica_read_is_retried_elsewhere(servers: list[Server]) -> None:
    r1 = servers[1]

    async def main() -> None:
        async with make_group(servers) as group:
            await asyncio.gather(*(group.fetchval(READ) for _ in range(8)))
            r1.down = True
            results = [await group.fetchval(READ) for _ in range(20)]
            assert set(results) == {"r2"}
            stats = group.stats()
            assert stats.rerouted >= 1
            assert not stats.member("r1").in_rotation
            r1.down = False
            await group.refresh()
            await group.refresh()
            assert group.stats().member("r1").in_rotation

    run(main(), timeout=10)


def test_write_refused_as_read_only_finds_the_new_primary(servers: list[Server]) -> None:
    p, r1 = servers[:2]

    async def main() -> None:
        async with make_group(servers) as group:
            assert group.stats().primary == "p"
            p.replica, r1.replica = True, False  # a failover the group has not seen yet
            assert await group.execute(WRITE) == "OK"
            assert r1.ran(WRITE)
            stats = group.stats()
            assert stats.primary == "r1"
            assert stats.primary_changes == 1
            assert stats.rerouted == 1
            assert stats.member("p").role == "replica"
            assert await group.fetchval(READ) in ("p", "r2")

    run(main(), timeout=10)


def test_fenced_old_primary_is_not_written_to(servers: list[Server]) -> None:
    p, r1 = servers[:2]

    async def main() -> None:
        async with make_group(servers) as group:
            r1.replica = False  # promoted, while the old primary still runs ...
            p.fenced = True  # ... but was made read-only
            assert await group.execute(WRITE) == "OK"
            assert r1.ran(WRITE)
            assert "read-only" in group.stats().member("p").reason

    run(main(), timeout=10)


def test_run_transaction_follows_a_failover(servers: list[Server]) -> None:
    p, r1 = servers[:2]

    async def main() -> None:
        async with make_group(servers) as group:
            p.replica, r1.replica = True, False
            calls = 0

            async def body(conn: Any) -> str:
                nonlocal calls
                calls += 1
                owner = next(s for s in servers if conn in servers_conns(group, s.name))
                return str(owner.answer(WRITE))

            assert await group.run_transaction(body) == "r1"
            assert calls == 2

    run(main(), timeout=10)


def test_no_primary(servers: list[Server]) -> None:
    p, _r1, _r2 = servers

    async def main() -> None:
        async with make_group(servers) as group:
            p.down = True
            await group.refresh()
            assert group.stats().primary is None
            with pytest.raises(NoPrimaryAvailable):
                await group.execute(WRITE)
            assert await group.fetchval(READ) in ("r1", "r2")  # reads go on
            assert not group.is_ready()

    run(main(), timeout=10)


def test_write_waits_for_a_primary(servers: list[Server]) -> None:
    p, r1 = servers[:2]

    async def main() -> None:
        async with make_group(servers, wait_for_primary=5.0) as group:
            p.down = True
            await group.refresh()

            async def promote_later() -> None:
                await asyncio.sleep(0.3)
                r1.replica = False

            promoter = asyncio.ensure_future(promote_later())
            assert await group.execute(WRITE) == "OK"
            await promoter
            assert r1.ran(WRITE)

    run(main(), timeout=10)


def test_write_to_a_dead_primary_is_resent_once_a_new_one_is_known(servers: list[Server]) -> None:
    p, r1 = servers[:2]

    async def main() -> None:
        async with make_group(servers, wait_for_primary=5.0) as group:
            p.down = True
            for conn in p_conns(group):
                conn.alive = False
            r1.replica = False
            assert await group.execute(WRITE) == "OK"  # nothing was sent to p: safe to resend
            assert r1.ran(WRITE)

    run(main(), timeout=10)


def p_conns(group: PoolGroup) -> list[MemoryConnection]:
    return servers_conns(group, "p")


def test_declared_roles_are_checked(servers: list[Server]) -> None:
    p, r1, r2 = servers

    async def main() -> None:
        # The replica is given as the primary, and the primary as a replica.
        async with make_group([r1, p, r2]) as group:
            stats = group.stats()
            assert stats.primary == "p"
            assert stats.member("r1").role == "replica"
            assert await group.execute(WRITE) == "OK"
            assert p.ran(WRITE)

    run(main(), timeout=10)


def test_read_your_writes_window(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers, read_your_writes=0.3) as group:
            assert await group.fetchval(READ) != "p"

            async def writer() -> list[str]:
                await group.execute(WRITE)
                return [await group.fetchval(READ) for _ in range(3)]

            assert await asyncio.create_task(writer()) == ["p"] * 3
            assert await group.fetchval(READ) != "p"  # another context did not write
            await group.execute(WRITE)
            assert await group.fetchval(READ) == "p"
            await asyncio.sleep(0.35)
            assert await group.fetchval(READ) != "p"
            assert group.stats().ryw_reads == 4

    run(main(), timeout=10)


def test_read_your_writes_by_lsn(servers: list[Server]) -> None:
    p, r1, r2 = servers

    async def main() -> None:
        async with make_group(servers, read_your_writes="lsn") as group:
            await group.execute(WRITE)
            p.lsn += 100
            assert await group.fetchval(READ) == "p"  # no check since the write yet
            await group.refresh()
            assert await group.fetchval(READ) == "p"  # replicas behind the write
            r2.lsn = p.lsn
            await group.refresh()
            assert {await group.fetchval(READ) for _ in range(5)} == {"r2"}
            r1.lsn = p.lsn
            await group.refresh()
            assert {await group.fetchval(READ) for _ in range(6)} == {"r1", "r2"}

    run(main(), timeout=10)


def test_weighted_round_robin_over_replicas(servers: list[Server]) -> None:
    r2 = servers[2]

    async def main() -> None:
        members = [Member(f"fake://{s.name}", name=s.name, driver=FakeDriver(s)) for s in servers]
        heavy = Member("fake://r2", name="r2", weight=3, driver=FakeDriver(r2))
        group = PoolGroup(members[0], [members[1], heavy], check_interval=60, min_size=0)
        async with group:
            seen = Counter([await group.fetchval(READ) for _ in range(40)])
            assert seen == {"r1": 10, "r2": 30}

    run(main(), timeout=10)


def test_least_in_use_spreads_concurrent_reads(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers, balance="least_in_use") as group:
            seen = Counter(await asyncio.gather(*(group.fetchval(READ) for _ in range(8))))
            assert seen == {"r1": 4, "r2": 4}

    run(main(), timeout=10)


def test_open_fails_when_no_member_answers(servers: list[Server]) -> None:
    for server in servers:
        server.down = True

    async def main() -> None:
        group = make_group(servers)
        with pytest.raises(DatabaseUnavailable, match="no member reachable"):
            await group.open()

    run(main(), timeout=10)


def test_ready_pools_can_be_members(servers: list[Server]) -> None:
    p, r1, _ = servers

    async def main() -> None:
        primary = Pool(driver=FakeDriver(p), min_size=0, name="main")
        replica = Pool(driver=FakeDriver(r1), min_size=0, name="copy")
        async with PoolGroup(primary, [replica], check_interval=60) as group:
            assert await group.fetchval(READ) == "r1"
            assert group.primary is primary
            assert group.replicas == (replica,)
        assert "closed" in repr(group)

    run(main(), timeout=10)


def test_stats_are_a_frozen_snapshot(servers: list[Server]) -> None:
    async def main() -> None:
        async with make_group(servers) as group:
            stats = group.stats()
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.writes = 3  # type: ignore[misc]
            assert stats.member("r1").pool.name.endswith(":r1")
            assert "p=primary/out (primary)" in stats.describe()
            with pytest.raises(KeyError):
                stats.member("nope")

    run(main(), timeout=10)


def test_close_leaves_no_background_tasks(servers: list[Server]) -> None:
    async def main() -> None:
        group = make_group(servers, check_interval=0.02)
        await group.open()
        await asyncio.sleep(0.1)
        assert group.stats().checks >= 2
        await group.close()
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current] == []

    run(main(), timeout=10)
