"""The ``millpond`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack

import millpond


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _demo(dsn: str, driver: str, tasks: int, seconds: float) -> None:
    placeholder = "$1" if driver == "asyncpg" else "%s"
    async with millpond.create_pool(dsn, driver=driver, min_size=4, max_size=10) as pool:
        print(f"pool ready: {pool!r}")
        version = await pool.fetchval("SHOW server_version")
        print(f"server version: {version}")
        await pool.execute("CREATE TABLE IF NOT EXISTS millpond_demo (id int PRIMARY KEY, n int)")
        await pool.execute("TRUNCATE millpond_demo")
        async with pool.transaction() as conn:
            if driver == "asyncpg":
                await conn.executemany(
                    "INSERT INTO millpond_demo VALUES ($1, 0)", [(i,) for i in range(100)]
                )
            else:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO millpond_demo VALUES (%s, 0)", [(i,) for i in range(100)]
                    )
        print("inserted 100 rows in one transaction")

        done = 0
        deadline = time.monotonic() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await pool.execute(
                    f"UPDATE millpond_demo SET n = n + 1 WHERE id = {placeholder}", k % 100
                )
                done += 1

        print(f"{tasks} tasks sharing {pool.config.max_size} connections for {seconds:g}s ...")
        await asyncio.gather(*(worker(k) for k in range(tasks)))
        total = await pool.fetchval("SELECT sum(n) FROM millpond_demo")
        print(f"{done} updates ({done / seconds:,.0f}/s); sum(n) in the table = {total}")
        s = pool.stats()
        print(f"stats: {s.describe()}")
        print(
            f"  acquires={s.acquires} waited={s.waits} timeouts={s.timeouts} "
            f"opened={s.connections_opened} resets={s.resets}"
        )
        print(
            f"  wait p50={s.wait_time.p50 * 1e3:.3f}ms p99={s.wait_time.p99 * 1e3:.3f}ms; "
            f"use p50={s.use_time.p50 * 1e3:.3f}ms p99={s.use_time.p99 * 1e3:.3f}ms"
        )
        await pool.execute("DROP TABLE millpond_demo")
        assert total == done, "every committed update must be counted"


def _cmd_demo(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        dsn = args.dsn or os.environ.get("DATABASE_URL")
        if not dsn:
            from millpond.embedded import PostgresCluster

            print("DATABASE_URL is not set: starting an embedded PostgreSQL ...")
            cluster = stack.enter_context(PostgresCluster())
            dsn = cluster.dsn()
            print(f"embedded PostgreSQL {cluster.version} at {dsn}")
        _event_loop_policy()
        asyncio.run(_demo(dsn, args.driver, args.tasks, args.seconds))
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from millpond.proxy.cli import run_proxy

    return run_proxy(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="millpond", description=millpond.__doc__)
    parser.add_argument("--version", action="version", version=millpond.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short demonstration of the library pool")
    demo.add_argument("--dsn", help="database URL (default: $DATABASE_URL, else embedded)")
    demo.add_argument("--driver", choices=["asyncpg", "psycopg"], default="asyncpg")
    demo.add_argument("--tasks", type=int, default=100)
    demo.add_argument("--seconds", type=float, default=3.0)
    demo.set_defaults(func=_cmd_demo)
    from millpond.proxy.cli import add_proxy_arguments

    proxy = sub.add_parser("proxy", help="run the PgBouncer-compatible pooling proxy")
    add_proxy_arguments(proxy)
    proxy.set_defaults(func=_cmd_proxy)
    from millpond.observe.cli import add_arguments as add_observe_arguments

    add_observe_arguments(sub)  # millpond top / size / advise
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
