"""Network faults through tests/faults.py, killed backends, serialization failures.

Each test that touches a server runs on its own throwaway cluster, on both drivers.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import pytest

import millpond
from millpond import DatabaseUnavailable, PoolTimeout, RetryPolicy
from millpond.drivers import get_driver
from millpond.resilience.timeouts import CANCEL_GRACE
from tests.faults import FaultRelay
from tests.helpers import ClusterFactory, run

DRIVERS = ["asyncpg", "psycopg"]


def app_kwargs(driver: str, app: str) -> dict[str, Any]:
    if driver == "asyncpg":
        return {"server_settings": {"application_name": app}}
    return {"application_name": app}


#: Timers may fire a clock tick early (uvloop's clock has millisecond resolution).
TICK = 0.01
#: Room for a loaded machine; a timeout that does not fire would take 10 s or forever.
SLACK = 1.0


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


# -- the relay itself ---------------------------------------------------------------------


def test_relay_modes() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1000):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def nothing_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await reader.read(10)
        except TimeoutError:
            return True
        return False

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with FaultRelay("127.0.0.1", port) as relay:
            assert (
                relay.dsn("postgresql://u:p@db:5432/x")
                == f"postgresql://u:p@127.0.0.1:{relay.port}/x"
            )
            r, w = await asyncio.open_connection(relay.host, relay.port)
            w.write(b"a")
            assert await r.read(10) == b"a"
            relay.slow(100)
            with Timer() as t:
                w.write(b"b")
                assert await r.read(10) == b"b"
            assert t.elapsed >= 0.2 - TICK  # 100 ms each way
            relay.drop()
            w.write(b"c")
            assert await nothing_within(r, 0.2)
            relay.set_pass()
            w.write(b"d")
            assert await r.read(10) == b"d"  # "c" is gone for good
            relay.blackhole()
            w.write(b"e")
            assert await nothing_within(r, 0.2)
            r2, w2 = await asyncio.open_connection(relay.host, relay.port)  # accepted...
            w2.write(b"f")
            assert await nothing_within(r2, 0.1)  # ...but never forwarded
            relay.set_pass()
            assert await r.read(10) == b"e"  # held bytes flow again
            assert await r2.read(10) == b"f"
            relay.reset()
            with pytest.raises(ConnectionResetError):
                await r.read(10)
            r3, _ = await asyncio.open_connection(relay.host, relay.port)
            with pytest.raises(ConnectionResetError):
                await r3.read(10)
            assert relay.accepted == 3
            assert relay.active == 0
            for writer in (w, w2):
                writer.close()
        server.close()
        await server.wait_closed()

    run(main(), timeout=20)


# -- timeouts fire as configured -----------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_timeouts_fire_through_a_faulty_network(own_cluster: ClusterFactory, driver: str) -> None:
    cluster = own_cluster()

    async def main() -> None:
        async with FaultRelay(cluster.host, cluster.port) as relay:
            dsn = relay.dsn(cluster.dsn())

            took: dict[str, float] = {}
            get_driver(driver, dsn, {})  # import the driver now: not part of the timings
            relay.blackhole()  # the login never gets an answer: connect_timeout
            with Timer() as t, pytest.raises(DatabaseUnavailable) as info:
                await millpond.create_pool(dsn, driver=driver, min_size=1, connect_timeout=0.3)
            took["connect_timeout=0.3"] = t.elapsed
            assert 0.3 - TICK <= t.elapsed < 0.3 + SLACK
            assert isinstance(info.value.__cause__, TimeoutError)

            pool = await millpond.create_pool(
                dsn,
                driver=driver,
                min_size=0,
                max_size=2,
                connect_timeout=5,
                acquire_timeout=0.3,
                reset_timeout=1,
                breaker_threshold=0,
            )
            with Timer() as t, pytest.raises(PoolTimeout):  # connects hang: acquire_timeout
                await pool.fetchval("SELECT 1")
            took["acquire_timeout=0.3"] = t.elapsed
            assert 0.3 - TICK <= t.elapsed < 0.3 + SLACK
            relay.set_pass()  # the hanging connect gets through, or a retry of it does
            async with asyncio.timeout(10):  # on a loaded machine, more than one 0.3s wait
                while True:
                    try:
                        assert await pool.fetchval("SELECT 1") == 1
                        break
                    except PoolTimeout:
                        continue

            relay.drop()  # an established connection goes silent: the query timeout
            with Timer() as t, pytest.raises(TimeoutError):
                await pool.fetchval("SELECT 1", timeout=0.3)
            took["drop: timeout=0.3"] = t.elapsed
            assert 0.3 - TICK <= t.elapsed < 0.3 + CANCEL_GRACE + SLACK
            relay.set_pass()
            async with asyncio.timeout(5):  # the pool gets going again by itself
                assert await pool.fetchval("SELECT 2") == 2

            relay.blackhole()
            with Timer() as t, pytest.raises(TimeoutError):
                await pool.fetchval("SELECT 3", timeout=0.3)
            took["blackhole: timeout=0.3"] = t.elapsed
            assert t.elapsed < 0.3 + CANCEL_GRACE + SLACK
            with Timer() as t:
                await pool.close(timeout=1)  # nothing hangs, even with lent-out debris
            took["close(timeout=1)"] = t.elapsed
            assert t.elapsed < 1 + 1 + SLACK
            print(f"\n[{driver} network] " + ", ".join(f"{k}: {v:.3f}s" for k, v in took.items()))

    run(main(), timeout=40)


@pytest.mark.parametrize("driver", DRIVERS)
def test_reset_and_delay(own_cluster: ClusterFactory, driver: str) -> None:
    cluster = own_cluster()

    async def main() -> None:
        async with (
            FaultRelay(cluster.host, cluster.port) as relay,
            millpond.create_pool(
                relay.dsn(cluster.dsn()),
                driver=driver,
                min_size=3,
                max_size=3,
                validate_idle_after=None,
                reconnect_delay=0.05,
                reconnect_delay_max=0.2,
            ) as pool,
        ):
            relay.slow(100)  # slow but correct; a shorter timeout fires
            with Timer() as t:
                assert await pool.fetchval("SELECT 1") == 1
            assert t.elapsed >= 0.2 - TICK
            with pytest.raises(TimeoutError):
                await pool.fetchval("SELECT pg_sleep(0)", timeout=0.1)
            relay.set_pass()
            await asyncio.sleep(0.5)  # let a reset after the cancelled query finish
            closed_before = pool.stats().connections_closed_total

            query = asyncio.ensure_future(pool.fetchval("SELECT pg_sleep(5)"))
            await asyncio.sleep(0.2)
            with Timer() as t:
                relay.reset()  # RST: the query fails at once, as a lost connection
                with pytest.raises(Exception) as info:  # noqa: PT011 - the driver's own
                    await query
            assert t.elapsed < SLACK
            assert pool.driver.is_disconnect(info.value), info.value
            print(f"\n[{driver} reset] in-flight query failed {t.elapsed * 1000:.1f} ms after RST")
            relay.set_pass()
            got = await asyncio.gather(*(pool.fetchval("SELECT 7") for _ in range(10)))
            assert got == [7] * 10  # nobody after the fault sees an error
            s = pool.stats()
            assert s.connections_closed_total - closed_before == 3
            assert s.connections_closed["stale"] + s.connections_closed["broken"] >= 3

    run(main(), timeout=40)


# -- killed backends under load ----------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_terminated_backends_under_load(own_cluster: ClusterFactory, driver: str) -> None:
    """pg_terminate_backend on random pooled backends: nobody gets a dead connection."""
    cluster = own_cluster()
    app = f"victims-{driver}"

    def pid_of(conn: Any) -> int:
        pid: int = conn.get_server_pid() if driver == "asyncpg" else conn.info.backend_pid
        return pid

    async def main() -> None:
        killer = await asyncpg.connect(cluster.dsn())
        kills: dict[int, float] = {}
        ops: list[tuple[float, int, BaseException | None]] = []
        stop = asyncio.Event()
        async with millpond.create_pool(
            cluster.dsn(),
            driver=driver,
            min_size=8,
            max_size=8,
            reconnect_delay=0.01,
            reconnect_delay_max=0.1,
            connect_kwargs=app_kwargs(driver, app),
        ) as pool:
            busy = 0  # workers inside acquire() or holding a connection
            gate = asyncio.Event()  # cleared while a kill must find every connection idle
            gate.set()
            all_idle = asyncio.Event()  # set when busy drops to 0
            idle_kills = 0

            async def worker() -> None:
                nonlocal busy
                while not stop.is_set():
                    await gate.wait()
                    busy += 1
                    try:
                        async with pool.acquire() as conn:
                            acquired, pid = time.monotonic(), pid_of(conn)
                            try:
                                await conn.execute("SELECT pg_sleep(0.002)")
                            except Exception as exc:
                                ops.append((acquired, pid, exc))
                                raise
                            ops.append((acquired, pid, None))
                    except Exception:
                        pass
                    finally:
                        busy -= 1
                        if not busy:
                            all_idle.set()
                    await asyncio.sleep(0.001)  # some connections sit idle now and then

            async def terminator() -> None:
                # Every other kill waits until all connections are back in the pool, so
                # the pool surely meets backends that died while idle; the rest land on
                # whatever the load is doing (mostly queries in flight).
                nonlocal idle_kills
                rng = random.Random(7)
                for i in range(25):
                    await asyncio.sleep(0.04)
                    quiet = i % 2 == 0
                    if quiet:
                        gate.clear()
                        all_idle.clear()
                        if busy:
                            await all_idle.wait()
                    rows = await killer.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app
                    )
                    pid = rng.choice(rows)["pid"]
                    # Waits until the backend is gone (PostgreSQL 14+).
                    if await killer.fetchval("SELECT pg_terminate_backend($1, 5000)", pid):
                        kills[pid] = time.monotonic()
                        idle_kills += 1 if quiet else 0
                    gate.set()

            workers = [asyncio.ensure_future(worker()) for _ in range(7)]
            await terminator()
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*workers)
            await killer.close()

            dead_on_acquire = [
                (pid, exc) for at, pid, exc in ops if exc and pid in kills and at > kills[pid]
            ]
            assert dead_on_acquire == []
            errors = [exc for _, _, exc in ops if exc is not None]
            # At most one error per backend killed under load; none for those killed idle.
            assert idle_kills >= 10
            assert len(errors) <= len(kills) - idle_kills
            assert all(pool.driver.is_disconnect(exc) for exc in errors), errors
            assert len(kills) >= 20
            assert len(ops) - len(errors) > 300
            assert await pool.fetchval("SELECT 1") == 1
            print(
                f"\n[{driver} terminate] {len(kills)} backends killed under load, "
                f"{len(errors)} errors (in flight), {idle_kills} killed while all were idle, "
                f"{len(ops)} operations, none dead on acquire"
            )

    run(main(), timeout=60)


# -- serialization failures ----------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_serializable_transfers_converge(own_cluster: ClusterFactory, driver: str) -> None:
    """Concurrent read-modify-write transfers at SERIALIZABLE: retried until correct."""
    cluster = own_cluster(settings={"deadlock_timeout": "50ms"})
    p1, p2 = ("$1", "$2") if driver == "asyncpg" else ("%s", "%s")

    async def value(conn: Any, sql: str, *args: Any) -> Any:
        if driver == "asyncpg":
            return await conn.fetchval(sql, *args)
        cur = await conn.execute(sql, args)
        return (await cur.fetchone())[0]

    async def execute(conn: Any, sql: str, *args: Any) -> None:
        await (conn.execute(sql, *args) if driver == "asyncpg" else conn.execute(sql, args))

    async def main() -> None:
        async with millpond.create_pool(
            cluster.dsn(), driver=driver, min_size=10, max_size=10
        ) as pool:
            await pool.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL)")
            await pool.execute("INSERT INTO acct SELECT g, 1000 FROM generate_series(1, 5) g")
            rng = random.Random(3)
            transfers = []
            while len(transfers) < 100:
                a, b = rng.randrange(1, 6), rng.randrange(1, 6)
                if a != b:
                    transfers.append((a, b, rng.randrange(1, 50)))
            policy = RetryPolicy(attempts=200, base=0.002, cap=0.05, deadline=60)

            async def transfer(a: int, b: int, amount: int) -> None:
                async def fn(conn: Any) -> None:
                    # In id order, so transfers conflict (40001) rather than deadlock.
                    for account, delta in sorted(((a, -amount), (b, amount))):
                        balance = await value(
                            conn, f"SELECT balance FROM acct WHERE id = {p1}", account
                        )
                        await asyncio.sleep(0.001)  # others read the same rows meanwhile
                        sql = f"UPDATE acct SET balance = {p1} WHERE id = {p2}"
                        await execute(conn, sql, balance + delta, account)

                await pool.run_transaction(fn, retry=policy, isolation="serializable")

            await asyncio.gather(*(transfer(*t) for t in transfers))
            expected = dict.fromkeys(range(1, 6), 1000)
            for a, b, amount in transfers:
                expected[a] -= amount
                expected[b] += amount
            rows = await pool.fetch("SELECT id, balance FROM acct")
            assert {r[0]: r[1] for r in rows} == expected
            s = pool.stats()
            assert s.retries > 0  # conflicts happened, and were retried
            assert s.retry_giveups == 0
            print(f"\n[{driver} serializable] {len(transfers)} transfers, {s.retries} retries")

    run(main(), timeout=90)
