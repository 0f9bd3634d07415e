"""Failover through a pool group: the primary dies, a replica is promoted, writes resume.

Each test owns its primary and replica (they are destroyed). In the main test the
primary runs with ``synchronous_standby_names = '*'`` and the writes we count use
``synchronous_commit = on``, so a write the group acknowledged is on the replica before
the primary is killed (``pg_ctl stop -m immediate``, like a crash): after the
promotion every acknowledged row must be there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from millpond.embedded import PostgresCluster
from millpond.routing import PoolGroup
from tests.helpers import run
from tests.replicas import ReplicaCluster, start_replica

log = logging.getLogger(__name__)

INSERT = "INSERT INTO acked (id, writer) VALUES ($1, $2)"


@pytest.fixture
def pair() -> Iterator[tuple[PostgresCluster, ReplicaCluster]]:
    primary = PostgresCluster()
    made: list[PostgresCluster] = [primary]
    try:
        primary.start()
        primary.psql("CREATE TABLE acked (id int PRIMARY KEY, writer int)")
        replica = start_replica(primary)
        made.append(replica)
        yield primary, replica
    finally:
        for one in reversed(made):
            one.cleanup()


def make_synchronous(primary: PostgresCluster) -> None:
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.reload()
    deadline = time.monotonic() + 30
    sql = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
    while primary.psql(sql).strip() != "1":
        assert time.monotonic() < deadline, "the replica never became synchronous"
        time.sleep(0.05)


class Writers:
    """Tasks inserting unique ids; remembers which inserts the group acknowledged."""

    def __init__(self, group: PoolGroup, count: int) -> None:
        self.group = group
        self.ids = itertools.count(1)
        self.acked: set[int] = set()
        self.successes: list[float] = []
        self.errors: Counter[str] = Counter()
        self.tasks = [asyncio.create_task(self._write(n)) for n in range(count)]

    async def _write(self, writer: int) -> None:
        while True:
            row = next(self.ids)
            try:
                await self.group.execute(INSERT, row, writer)
            except Exception as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.02)
            else:
                self.acked.add(row)
                self.successes.append(time.monotonic())

    def first_success_after(self, moment: float) -> float | None:
        return next((t for t in self.successes if t > moment), None)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("wait_for_primary", [0.0, 5.0])
def test_failover_no_acknowledged_write_lost(
    pair: tuple[PostgresCluster, ReplicaCluster], wait_for_primary: float
) -> None:
    primary, replica = pair
    make_synchronous(primary)
    run(_failover(primary, replica, wait_for_primary), timeout=90)


async def _failover(primary: PostgresCluster, replica: ReplicaCluster, wait: float) -> None:
    group = PoolGroup(
        primary.dsn(),
        [replica.dsn()],
        check_interval=0.25,
        check_timeout=1.0,
        connect_timeout=1.0,
        min_size=2,
        max_size=8,
        wait_for_primary=wait,
        connect_kwargs={"server_settings": {"synchronous_commit": "on"}},
    )
    async with group:
        writers = Writers(group, 4)
        await asyncio.sleep(1.0)
        before = len(writers.acked)
        killed = time.monotonic()
        await asyncio.to_thread(primary.kill)
        await asyncio.sleep(0.5)
        promoting = time.monotonic()
        await asyncio.to_thread(replica.promote)
        promoted = time.monotonic()
        deadline = promoted + 10
        while writers.first_success_after(promoting) is None:
            assert time.monotonic() < deadline, f"no write succeeded: {group.stats().describe()}"
            await asyncio.sleep(0.01)
        resumed = writers.first_success_after(promoting) or 0.0
        await asyncio.sleep(1.0)
        await writers.stop()
        stats = group.stats()
        stored = {row[0] for row in await group.fetch("SELECT id FROM acked")}
    assert before > 0
    assert stats.primary == f"127.0.0.1:{replica.port}"
    assert stats.primary_changes == 1
    assert stats.member(f"127.0.0.1:{primary.port}").reason.startswith("unreachable")
    lost = writers.acked - stored
    assert not lost, f"{len(lost)} acknowledged writes lost"
    if wait:  # writes waited for the new primary: only those cut off by the kill failed
        assert set(writers.errors) <= {"ConnectionDoesNotExistError"}, writers.errors
    log.warning(
        "failover (wait_for_primary=%g): %d writes acknowledged (%d before the kill), all "
        "present after promotion; %d failed while no primary was up (%s); pg_ctl promote "
        "took %.2fs; first write succeeded %.2fs after promote began (%.2fs after it "
        "returned), %.2fs after the kill",
        wait,
        len(writers.acked),
        before,
        sum(writers.errors.values()),
        dict(writers.errors),
        promoted - promoting,
        resumed - promoting,
        resumed - promoted,
        resumed - killed,
    )


def test_write_refused_as_read_only_is_resent_to_the_new_primary(
    pair: tuple[PostgresCluster, ReplicaCluster],
) -> None:
    """The group has not noticed the failover yet (no check runs during the test): the
    old primary, fenced read-only, refuses the write with SQLSTATE 25006, and the group
    finds the new primary and sends the write there, without the caller seeing an error."""
    primary, replica = pair

    async def main() -> None:
        group = PoolGroup(primary.dsn(), [replica.dsn()], check_interval=300)
        async with group:
            await group.execute(INSERT, 1, 0)
            await asyncio.to_thread(replica.wait_caught_up)
            await asyncio.to_thread(replica.promote)
            await asyncio.to_thread(
                primary.psql,
                "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf()",
            )
            await asyncio.sleep(0.2)  # the reload reaches the sessions
            assert group.stats().primary == f"127.0.0.1:{primary.port}"
            started = time.monotonic()
            await group.execute(INSERT, 2, 0)
            took = time.monotonic() - started
            stats = group.stats()
            assert stats.primary == f"127.0.0.1:{replica.port}"
            assert stats.rerouted == 1
            assert "read-only" in stats.member(f"127.0.0.1:{primary.port}").reason
        ids = replica.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM acked").strip()
        assert ids == "1,2"
        log.warning("write refused as read-only (25006) re-sent to the new primary in %.3fs", took)

    run(main(), timeout=60)
