"""A seeded random workload through the proxy, checked against a model of what it must return.

Each client owns rows of one table and keeps its own model of them. It runs reads,
writes, transactions that commit or roll back, errors inside transactions, prepared
statements (asyncpg's statement cache), per-client session settings, computed values
and cancelled queries. Every value the proxy returns is compared with the model: a
mismatch is a wrong result, the one thing a pooler must never produce. Optionally a
killer terminates random server backends meanwhile; a client whose connection dies
reconnects and re-reads its rows (the outcome of the interrupted operation is unknown,
so the model is re-synchronised from the database, never guessed).

Run standalone: ``python -m tests.e2e.differential --ops 1000000`` (starts its own
PostgreSQL and proxy); the test suite runs a smaller version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

ROWS = 8
CONN_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InternalClientError,  # asyncpg's own state after a cancel raced a kill
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.ProtocolViolationError,
    ConnectionError,
    OSError,
)


@dataclass
class Report:
    ops: int = 0
    mismatches: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    seconds: float = 0.0


class Client:
    def __init__(self, ident: int, url: str, seed: int, report: Report) -> None:
        self.ident = ident
        self.url = url
        self.rng = random.Random(seed * 1_000_003 + ident)
        self.report = report
        self.model = dict.fromkeys(range(ROWS), 0)
        self.tenant = f"t{ident}"
        self.conn: asyncpg.Connection | None = None

    def mismatch(self, what: str, got: object, want: object) -> None:
        self.report.mismatches.append(f"client {self.ident}: {what}: got {got!r}, want {want!r}")

    async def connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url, timeout=30)
        await conn.execute(f"SET myapp.tenant = '{self.tenant}'")
        rows = await conn.fetch("SELECT k, v FROM diff_kv WHERE client = $1", self.ident)
        self.model = {r["k"]: r["v"] for r in rows}
        return conn

    async def run(self, ops: int) -> None:
        done = 0
        while done < ops:
            if self.conn is None or self.conn.is_closed():
                try:
                    self.conn = await self.connect()
                except CONN_ERRORS:
                    await asyncio.sleep(0.05)
                    continue
            op = self.rng.choice(OPS)
            try:
                await op(self, self.conn)
                self.report.outcomes[op.__name__] += 1
            except CONN_ERRORS as exc:
                self.report.outcomes[f"connection lost ({type(exc).__name__})"] += 1
                self.conn.terminate()
                self.conn = None  # reconnect and re-read: the outcome is unknown
            done += 1
            self.report.ops += 1
        if self.conn is not None:
            await self.conn.close()

    # -- operations ----------------------------------------------------------------

    async def read(self, conn: asyncpg.Connection) -> None:
        k = self.rng.randrange(ROWS)
        got = await conn.fetchval(
            "SELECT v FROM diff_kv WHERE client = $1 AND k = $2", self.ident, k
        )
        if got != self.model[k]:
            self.mismatch(f"read k={k}", got, self.model[k])

    async def write(self, conn: asyncpg.Connection) -> None:
        k, v = self.rng.randrange(ROWS), self.rng.randrange(1_000_000)
        status = await conn.execute(
            "UPDATE diff_kv SET v = $3 WHERE client = $1 AND k = $2", self.ident, k, v
        )
        if status != "UPDATE 1":
            self.mismatch("write status", status, "UPDATE 1")
        self.model[k] = v

    async def transaction(self, conn: asyncpg.Connection) -> None:
        changes = {self.rng.randrange(ROWS): self.rng.randrange(1_000_000) for _ in range(3)}
        commit = self.rng.random() < 0.7
        tr = conn.transaction()
        await tr.start()
        for k, v in changes.items():
            await conn.execute(
                "UPDATE diff_kv SET v = $3 WHERE client = $1 AND k = $2", self.ident, k, v
            )
        got = await conn.fetchval("SELECT sum(v) FROM diff_kv WHERE client = $1", self.ident)
        want = sum({**self.model, **changes}.values())
        if got != want:
            self.mismatch("sum inside transaction", got, want)
        if commit:
            await tr.commit()
            self.model.update(changes)
        else:
            await tr.rollback()

    async def error_in_transaction(self, conn: asyncpg.Connection) -> None:
        try:
            async with conn.transaction():
                await conn.execute("UPDATE diff_kv SET v = -1 WHERE client = $1", self.ident)
                await conn.fetchval("SELECT 1 / $1::int", 0)
        except asyncpg.DivisionByZeroError:
            pass
        else:
            self.mismatch("division by zero", "no error", "DivisionByZeroError")

    async def compute(self, conn: asyncpg.Connection) -> None:
        a, b = self.rng.randrange(10_000), self.rng.randrange(10_000)
        got = await conn.fetchval("SELECT $1::bigint * $2::bigint", a, b)
        if got != a * b:
            self.mismatch("product", got, a * b)

    async def prepared(self, conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("SELECT $1::text || ':' || $2::int")
        n = self.rng.randrange(1000)
        got = await stmt.fetchval(self.tenant, n)
        if got != f"{self.tenant}:{n}":
            self.mismatch("prepared", got, f"{self.tenant}:{n}")

    async def session_setting(self, conn: asyncpg.Connection) -> None:
        got = await conn.fetchval("SELECT current_setting('myapp.tenant', true)")
        if got != self.tenant:
            self.mismatch("session setting", got, self.tenant)

    async def cancelled(self, conn: asyncpg.Connection) -> None:
        with contextlib.suppress(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(0.2)", timeout=0.02)


OPS = [
    Client.read, Client.read, Client.read, Client.write, Client.write, Client.transaction,
    Client.error_in_transaction, Client.compute, Client.compute, Client.prepared,
    Client.session_setting, Client.cancelled,
]  # fmt: skip


async def setup(dsn: str, clients: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS diff_kv; "
            "CREATE TABLE diff_kv (client int, k int, v bigint, PRIMARY KEY (client, k))"
        )
        await conn.execute(
            "INSERT INTO diff_kv SELECT c, k, 0 FROM generate_series(0, $1::int - 1) c, "
            "generate_series(0, $2::int - 1) k",
            clients,
            ROWS,
        )
    finally:
        await conn.close()


async def killer(
    dsn: str, database: str, report: Report, stop: asyncio.Event, every: float
) -> None:
    """Terminate a random server backend of the proxy every ``every`` seconds."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            await asyncio.sleep(every)
            killed = await conn.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "ORDER BY random() LIMIT 1",
                database,
            )
            report.kills += bool(killed)
    finally:
        await conn.close()


async def run_differential(
    url: str,
    dsn: str,
    database: str,
    *,
    clients: int,
    ops: int,
    seed: int,
    kill_every: float | None,
) -> Report:
    await setup(dsn, clients)
    report = Report()
    stop = asyncio.Event()
    started = time.monotonic()
    kill_task = (
        asyncio.create_task(killer(dsn, database, report, stop, kill_every)) if kill_every else None
    )
    per_client = max(1, ops // clients)
    await asyncio.gather(*(Client(i, url, seed, report).run(per_client) for i in range(clients)))
    stop.set()
    if kill_task is not None:
        await kill_task
    report.seconds = time.monotonic() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-every", type=float, default=0.5)
    args = parser.parse_args()
    from millpond.embedded import PostgresCluster
    from millpond.proxy.config import config_from_args
    from millpond.proxy.server import Proxy

    async def go(dsn: str) -> Report:
        cfg = config_from_args(
            "127.0.0.1:0", dsn, auth_type="trust", unix_socket_dir="", pool_mode="transaction",
            default_pool_size=args.pool_size, max_client_conn=args.clients + 50,
        )  # fmt: skip
        proxy = Proxy(cfg)
        await proxy.start()
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        try:
            return await run_differential(
                url, dsn, "postgres", clients=args.clients, ops=args.ops, seed=args.seed,
                kill_every=args.kill_every or None,
            )  # fmt: skip
        finally:
            await proxy.shutdown("immediate")

    with PostgresCluster() as cluster:
        import uvloop

        report = uvloop.run(go(cluster.dsn()))
    print(
        f"{report.ops} operations in {report.seconds:.0f}s ({report.ops / report.seconds:.0f}/s), "
        f"{report.kills} server backends killed, {len(report.mismatches)} mismatches"
    )
    for name, n in sorted(report.outcomes.items()):
        print(f"  {name}: {n}")
    for line in report.mismatches[:20]:
        print("  MISMATCH", line)


if __name__ == "__main__":
    main()
