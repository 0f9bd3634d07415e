"""The admin console of ``millpond proxy`` (database ``pgbouncer``), driven by real clients.

Each test starts a proxy in this process against the session's PostgreSQL and talks to
its console with psycopg (simple protocol, autocommit), psql and asyncpg, while asyncpg
clients put a known load on the ``postgres`` database through the same proxy. The
expected columns are PgBouncer 1.24's, copied from its ``src/admin.c`` and ``src/stats.c``
(``pktbuf_write_RowDescription``), independently of the proxy's own tables.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import dict_row

from millpond.embedded import PostgresCluster
from millpond.proxy.admin import parse_command, split_statements
from millpond.proxy.config import config_from_args, load_config
from millpond.proxy.server import Proxy
from tests.helpers import run

_SOCKET = [
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
]  # fmt: skip
_STATS_NAMES = [
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time",
]  # fmt: skip
PGBOUNCER_COLUMNS: dict[str, list[str]] = {
    "POOLS": [
        "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
        "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled",
        "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
        "load_balance_hosts",
        "cl_pinned",  # millpond's addition, after all of PgBouncer's columns
    ],
    "CLIENTS": _SOCKET,
    "SERVERS": _SOCKET,
    "DATABASES": [
        "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
        "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
        "max_connections", "current_connections", "max_client_connections",
        "current_client_connections", "paused", "disabled",
    ],
    "USERS": [
        "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
        "current_connections", "max_user_client_connections", "current_client_connections",
    ],
    "STATS": [
        "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
        "total_received", "total_sent", "total_xact_time", "total_query_time",
        "total_wait_time", "total_client_parse_count", "total_server_parse_count",
        "total_bind_count", "avg_server_assignment_count", "avg_xact_count",
        "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
        "avg_wait_time", "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
    ],
    "STATS_TOTALS": [
        "database", *_STATS_NAMES, "client_parse_count", "server_parse_count", "bind_count",
    ],
    "STATS_AVERAGES": [
        "database", *_STATS_NAMES, "avg_client_parse_count", "avg_server_parse_count",
        "avg_bind_count",
    ],
    "TOTALS": ["name", "value"],
    "CONFIG": ["key", "value", "default", "changeable"],
    "LISTS": ["list", "items"],
    "VERSION": ["version"],
    "MEM": ["name", "size", "used", "free", "memtotal"],
    "STATE": ["key", "value"],
    "PEERS": ["peer_id", "host", "port", "pool_size"],
    "PEER_POOLS": [
        "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
        "sv_login",
    ],
    "DNS_HOSTS": ["hostname", "ttl", "addrs"],
    "DNS_ZONES": ["zonename", "serial", "count"],
}  # fmt: skip
LISTS = [
    "databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
    "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
    "dns_pending",
]  # fmt: skip

ADMIN, STATS_USER = "postgres", "statsuser"


# -- helpers --------------------------------------------------------------------------


#: what running_proxy sets unless told otherwise
BASE_SETTINGS: dict[str, Any] = {
    "auth_type": "trust",
    "unix_socket_dir": "",
    "admin_users": ADMIN,
    "stats_users": STATS_USER,
    "pool_mode": "transaction",
}


@asynccontextmanager
async def running_proxy(pg_cluster: PostgresCluster, **overrides: Any) -> AsyncIterator[Proxy]:
    settings = {**BASE_SETTINGS, **overrides}
    proxy = Proxy(config_from_args("127.0.0.1:0", pg_cluster.dsn(), **settings))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.shutdown(timeout=1)


async def console(proxy: Proxy, user: str = ADMIN) -> psycopg.AsyncConnection[dict[str, Any]]:
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1",
        port=proxy.port,
        dbname="pgbouncer",
        user=user,
        autocommit=True,
        row_factory=dict_row,
    )


async def show(conn: psycopg.AsyncConnection[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    cur = await conn.execute(f"SHOW {what}")
    return await cur.fetchall()


async def client(proxy: Proxy, **kwargs: Any) -> asyncpg.Connection:
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    return await asyncpg.connect(url, statement_cache_size=0, **kwargs)


def pool_row(rows: list[dict[str, Any]], database: str = "postgres") -> dict[str, Any]:
    user = "pgbouncer" if database == "pgbouncer" else ADMIN
    return next(row for row in rows if row["database"] == database and row["user"] == user)


async def psql(pg_cluster: PostgresCluster, proxy: Proxy, *args: str, user: str = ADMIN) -> Any:
    binary = shutil.which("psql") or str(pg_cluster.bin_dir / "psql")
    url = f"postgresql://{user}@127.0.0.1:{proxy.port}/pgbouncer"
    process = await asyncio.create_subprocess_exec(
        binary, url, "-X", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def refused_with(
    admin: psycopg.AsyncConnection[dict[str, Any]], errors: dict[str, str]
) -> None:
    """Each command gets PgBouncer's error: SQLSTATE 08P01 and exactly this message."""
    for command, message in errors.items():
        with pytest.raises(psycopg.errors.ProtocolViolation) as info:
            await admin.execute(command)
        assert info.value.diag.message_primary == message
        assert info.value.sqlstate == "08P01"


async def closed_by_proxy(conn: asyncpg.Connection) -> None:
    for _ in range(100):
        if conn.is_closed():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the proxy did not close the connection")


async def not_done_after(task: asyncio.Future[Any], seconds: float = 0.3) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


# -- parsing (no network) ---------------------------------------------------------------


def test_parse_commands_like_pgbouncer() -> None:
    assert parse_command("show POOLS") == ("show", "POOLS", None)
    assert parse_command("  PAUSE  mydb ") == ("pause", "mydb", None)
    assert parse_command('kill "odd-name"""') == ("kill", 'odd-name"', None)
    assert parse_command("SET server_check_query = 'select ''x'''") == (
        "set", "server_check_query", "select 'x'",
    )  # fmt: skip
    assert parse_command("set max_client_conn to 200") == ("set", "max_client_conn", "200")
    with pytest.raises(ValueError, match="select"):
        parse_command("select * from pools")
    assert split_statements("SHOW POOLS; SHOW STATS;") == ["SHOW POOLS", " SHOW STATS"]
    assert split_statements("SET a = 'x;y'; SHOW x") == ["SET a = 'x;y'", " SHOW x"]
    assert split_statements(" ; ;") == []


# -- SHOW -------------------------------------------------------------------------------


def test_every_show_has_pgbouncers_columns(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            warm = await client(proxy)
            await warm.fetchval("SELECT 1")
            admin = await console(proxy)
            for what, expected in PGBOUNCER_COLUMNS.items():
                cur = await admin.execute(f"SHOW {what}")
                assert cur.description is not None
                assert [d.name for d in cur.description] == expected, what
                assert cur.statusmessage == "SHOW"
            lists = await show(admin, "LISTS")
            assert [row["list"] for row in lists] == LISTS
            version = await show(admin, "VERSION")
            assert version[0]["version"].startswith("millpond ")
            assert "PgBouncer-compatible" in version[0]["version"]
            await admin.close()
            await warm.close()

    run(main())


def test_show_reflects_a_known_load(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            named = await client(proxy, server_settings={"application_name": "admin-test"})
            idle = await client(proxy)
            in_tx = await client(proxy)
            for conn in (named, idle, in_tx):
                assert await conn.fetchval("SELECT 1") == 1
            tx = in_tx.transaction()
            await tx.start()
            backend_pid = await in_tx.fetchval("SELECT pg_backend_pid()")
            admin = await console(proxy)

            pool = pool_row(await show(admin, "POOLS"))
            assert pool["pool_mode"] == "transaction"
            assert pool["cl_active"] == 3  # PgBouncer: linked or idle, not waiting
            assert pool["cl_waiting"] == 0
            assert pool["sv_active"] == 1
            assert pool["sv_login"] == 0
            assert pool["maxwait"] == 0
            assert pool_row(await show(admin, "POOLS"), "pgbouncer")["cl_active"] == 1  # admin

            clients = [c for c in await show(admin, "CLIENTS") if c["database"] == "postgres"]
            assert len(clients) == 3
            assert sorted(c["state"] for c in clients) == ["active", "idle", "idle"]
            active = next(c for c in clients if c["state"] == "active")
            assert active["link"]
            assert (active["type"], active["user"]) == ("C", ADMIN)
            assert {c["application_name"] for c in clients} >= {"admin-test"}
            assert all(c["addr"] == "127.0.0.1" and c["local_port"] == proxy.port for c in clients)

            servers = await show(admin, "SERVERS")
            busy = [s for s in servers if s["state"] == "active"]
            assert len(busy) == 1
            assert busy[0]["remote_pid"] == backend_pid
            assert busy[0]["link"] == active["ptr"]
            assert (busy[0]["port"], busy[0]["database"]) == (pg_cluster.port, "postgres")

            databases = {row["name"]: row for row in await show(admin, "DATABASES")}
            assert databases["postgres"]["current_client_connections"] == 3
            assert databases["postgres"]["current_connections"] >= 1
            assert databases["postgres"]["paused"] == 0
            assert databases["pgbouncer"]["pool_mode"] == "statement"

            stats = {row["database"]: row for row in await show(admin, "STATS")}
            assert stats["postgres"]["total_xact_count"] >= 3
            assert stats["postgres"]["total_query_count"] >= 4
            assert stats["postgres"]["total_received"] > 0
            assert stats["postgres"]["total_sent"] > 0
            totals = {row["database"]: row for row in await show(admin, "STATS_TOTALS")}
            assert totals["postgres"]["xact_count"] == stats["postgres"]["total_xact_count"]

            lists = {row["list"]: row["items"] for row in await show(admin, "LISTS")}
            assert lists["pools"] == 2  # postgres/postgres and the console's own
            assert lists["used_clients"] == 4
            assert lists["used_servers"] >= 1

            users = {row["name"]: row for row in await show(admin, "USERS")}
            assert users[ADMIN]["current_client_connections"] >= 3

            await tx.commit()
            pool = pool_row(await show(admin, "POOLS"))
            assert pool["sv_active"] == 0
            assert pool["sv_idle"] + pool["sv_used"] >= 1
            for conn in (named, idle, in_tx):
                await conn.close()
            await admin.close()

    run(main())


def test_stats_averages_follow_stats_period(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, stats_period=1) as proxy:
            admin = await console(proxy)  # the first console login starts the sampling
            conn = await client(proxy)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.5
            while loop.time() < deadline:
                await conn.fetchval("SELECT 1")
                await asyncio.sleep(0.01)
            averages = {row["database"]: row for row in await show(admin, "STATS_AVERAGES")}
            assert averages["postgres"]["query_count"] > 0
            assert averages["postgres"]["xact_count"] > 0
            totals = dict((await (await admin.execute("SHOW TOTALS")).fetchall())[0].items())
            assert totals["name"] == "total_server_assignment_count"
            await conn.close()
            await admin.close()

    run(main())


def test_psql_shows_and_asyncpg_simple_protocol(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            code, out, err = await psql(pg_cluster, proxy, "-A", "-F", ",", "-c", "SHOW POOLS")
            assert code == 0, err
            header = out.splitlines()[0]
            assert header.split(",") == PGBOUNCER_COLUMNS["POOLS"]
            code, out, err = await psql(pg_cluster, proxy, "-A", "-t", "-c", "show version;")
            assert code == 0, err
            assert out.strip().startswith("millpond ")

            conn = await asyncpg.connect(
                f"postgresql://{ADMIN}@127.0.0.1:{proxy.port}/pgbouncer", statement_cache_size=0
            )
            assert await conn.execute("SHOW POOLS") == "SHOW"
            with pytest.raises(asyncpg.PostgresError, match="extended query protocol"):
                await conn.fetch("SHOW POOLS")  # Parse/Bind: PgBouncer refuses, then closes
            conn.terminate()

    run(main())


# -- access ------------------------------------------------------------------------------


def test_users_not_listed_are_refused(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            with pytest.raises(psycopg.OperationalError, match="not allowed"):
                await console(proxy, user="someone_else")
            code, _, err = await psql(pg_cluster, proxy, "-c", "SHOW POOLS", user="intruder")
            assert code != 0
            assert "FATAL:  not allowed" in err
            admin = await console(proxy)  # the refusals hurt no one
            assert await show(admin, "STATE")
            await admin.close()

    run(main())


def test_stats_users_may_show_but_not_control(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            viewer = await console(proxy, user=STATS_USER)
            assert pool_row(await show(viewer, "POOLS"), "pgbouncer")["pool_mode"] == "statement"
            for command in ("PAUSE", "RESUME", "RECONNECT", "KILL postgres", "RELOAD",
                            "SET max_client_conn = 5", "SHUTDOWN", "WAIT_CLOSE"):  # fmt: skip
                with pytest.raises(psycopg.errors.ProtocolViolation, match="admin access needed"):
                    await viewer.execute(command)
            assert proxy.config.settings.max_client_conn == 100
            assert not proxy.paused
            assert getattr(proxy, "shutting_down", None) is None
            await viewer.execute("SET extra_float_digits = 3")  # faked for drivers, as PgBouncer
            assert (await show(viewer, "STATE"))[1] == {"key": "paused", "value": "no"}
            await viewer.close()

    run(main())


def test_any_auth_lets_everyone_see_stats(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, auth_type="any") as proxy:
            anyone = await console(proxy, user="anyone")
            assert await show(anyone, "POOLS")
            with pytest.raises(psycopg.errors.ProtocolViolation, match="admin access needed"):
                await anyone.execute("PAUSE")
            await anyone.close()

    run(main())


# -- process control ---------------------------------------------------------------------


def test_pause_waits_for_transactions_and_resume_releases_queries(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            in_tx = await client(proxy)
            later = await client(proxy)
            tx = in_tx.transaction()
            await tx.start()
            await in_tx.fetchval("SELECT 1")

            pause = asyncio.ensure_future(admin.execute("PAUSE"))
            assert await not_done_after(pause)  # a transaction still holds a server
            await tx.commit()
            assert (await pause).statusmessage == "PAUSE"

            other = await console(proxy)
            assert {r["key"]: r["value"] for r in await show(other, "STATE")}["paused"] == "yes"
            with pytest.raises(psycopg.errors.ProtocolViolation, match="already suspended"):
                await other.execute("PAUSE")
            query = asyncio.ensure_future(later.fetchval("SELECT 42"))
            assert await not_done_after(query)  # held while paused
            assert pool_row(await show(other, "POOLS"))["cl_waiting"] == 1
            assert pool_row(await show(other, "POOLS"))["sv_idle"] == 0  # PAUSE closed them

            assert (await admin.execute("RESUME")).statusmessage == "RESUME"
            assert await asyncio.wait_for(query, 10) == 42
            with pytest.raises(psycopg.errors.ProtocolViolation, match="not paused/suspended"):
                await admin.execute("RESUME")
            for conn in (in_tx, later):
                await conn.close()
            for console_conn in (admin, other):
                await console_conn.close()

    run(main())


def test_pause_one_database_and_errors(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            conn = await client(proxy)
            await conn.fetchval("SELECT 1")
            assert (await admin.execute("PAUSE postgres")).statusmessage == "PAUSE"
            databases = {row["name"]: row for row in await show(admin, "DATABASES")}
            assert databases["postgres"]["paused"] == 1
            assert databases["pgbouncer"]["paused"] == 0
            query = asyncio.ensure_future(conn.fetchval("SELECT 7"))
            assert await not_done_after(query)
            await admin.execute("RESUME postgres")
            assert await asyncio.wait_for(query, 10) == 7
            errors = {
                "RESUME postgres": "database postgres is not paused",
                "PAUSE pgbouncer": "cannot pause admin db: pgbouncer",
                "KILL pgbouncer": "cannot kill admin db: pgbouncer",
                "RECONNECT pgbouncer": "cannot reconnect admin db: pgbouncer",
                "RESUME": "pooler is not paused/suspended",
                "SHOW NONSENSE": "invalid command 'SHOW NONSENSE', use SHOW HELP;",
                "BEGIN": "invalid command 'BEGIN', use SHOW HELP;",
                "KILL_CLIENT 1": "client not found",
                "RESUME nosuch": "no such database: nosuch",
                "SUSPEND": "SUSPEND is not supported by millpond",
            }
            await refused_with(admin, errors)
            await conn.close()
            await admin.close()

    run(main())


def test_parked_clients_that_leave_are_forgotten_and_resume_serves_the_rest(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            conns = [await client(proxy) for _ in range(3)]
            assert (await admin.execute("PAUSE postgres")).statusmessage == "PAUSE"
            queries = [
                asyncio.ensure_future(conn.fetchval(f"SELECT {i}")) for i, conn in enumerate(conns)
            ]
            assert await not_done_after(asyncio.gather(*queries))
            # in arrival order (RESUME serves them so)
            assert list(proxy.parked) == sorted(proxy.parked, key=lambda c: c.request_time)
            assert len(proxy.parked) == 3
            conns[1].terminate()  # leaves while parked
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await queries[1]
            for _ in range(100):
                if len(proxy.parked) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(proxy.parked) == 2  # the one that left is not kept, nor resumed
            await admin.execute("RESUME postgres")
            assert await asyncio.wait_for(asyncio.gather(queries[0], queries[2]), 10) == [0, 2]
            assert not proxy.parked
            for conn in (conns[0], conns[2]):
                await conn.close()
            await admin.close()

    run(main())


def test_disable_refuses_new_logins_and_enable_lets_them_in(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            connected = await client(proxy)
            assert (await admin.execute("DISABLE postgres")).statusmessage == "DISABLE"
            databases = {row["name"]: row for row in await show(admin, "DATABASES")}
            assert databases["postgres"]["disabled"] == 1
            assert databases["pgbouncer"]["disabled"] == 0
            with pytest.raises(
                asyncpg.ProtocolViolationError, match='database "postgres" is disabled'
            ):
                await client(proxy)
            assert await connected.fetchval("SELECT 6 * 7") == 42  # connected clients go on
            assert (await admin.execute("ENABLE postgres")).statusmessage == "ENABLE"
            databases = {row["name"]: row for row in await show(admin, "DATABASES")}
            assert databases["postgres"]["disabled"] == 0
            again = await client(proxy)
            assert await again.fetchval("SELECT 1") == 1
            errors = {
                "DISABLE": "a database is required",
                "ENABLE": "a database is required",
                "DISABLE pgbouncer": "cannot disable admin db: pgbouncer",
                "ENABLE pgbouncer": "cannot enable admin db: pgbouncer",
            }
            await refused_with(admin, errors)
            viewer = await console(proxy, STATS_USER)
            with pytest.raises(psycopg.errors.ProtocolViolation, match="admin access needed"):
                await viewer.execute("DISABLE postgres")
            for conn in (connected, again):
                await conn.close()
            for console_conn in (admin, viewer):
                await console_conn.close()

    run(main())


def test_several_commands_in_one_query(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            cur = await admin.execute("SHOW VERSION; SET max_client_conn = 77; SHOW STATE;")
            assert cur.statusmessage == "SHOW"
            assert [d.name for d in cur.description or ()] == ["version"]
            assert cur.nextset()
            assert cur.statusmessage == "SET max_client_conn=77"
            assert cur.nextset()
            assert [row["key"] for row in await cur.fetchall()] == ["active", "paused", "suspended"]
            assert proxy.config.settings.max_client_conn == 77
            with pytest.raises(psycopg.errors.ProtocolViolation, match="SET failed"):
                await admin.execute("SET max_client_conn = 1; SET bogus = 1; SET pool_mode = x")
            assert proxy.config.settings.max_client_conn == 1  # the first ran, the last did not
            await admin.close()

    run(main())


def test_set_changes_show_config(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)

            async def config() -> dict[str, dict[str, Any]]:
                return {row["key"]: row for row in await show(admin, "CONFIG")}

            before = await config()
            assert before["max_client_conn"] == {
                "key": "max_client_conn", "value": "100", "default": "100", "changeable": "yes",
            }  # fmt: skip
            assert before["listen_port"]["changeable"] == "no"
            assert before["pool_mode"]["value"] == "transaction"
            assert list(before) == sorted(before)

            cur = await admin.execute("SET max_client_conn = 150")
            assert cur.statusmessage == "SET max_client_conn=150"
            await admin.execute("SET server_check_query = 'select 2'")
            await admin.execute("set pool_mode to session")
            after = await config()
            assert after["max_client_conn"]["value"] == "150"
            assert after["max_client_conn"]["default"] == "100"
            assert after["server_check_query"]["value"] == "select 2"
            assert after["pool_mode"]["value"] == "session"
            assert proxy.config.settings.max_client_conn == 150

            for command in ("SET max_client_conn = many", "SET no_such_setting = 1",
                            "SET listen_port = 7000", "SET pool_mode = sometimes"):  # fmt: skip
                with pytest.raises(psycopg.errors.ProtocolViolation) as info:
                    await admin.execute(command)
                assert info.value.diag.message_primary == "SET failed"
                assert info.value.diag.message_detail  # which setting, and why
            port = str(proxy.config.settings.listen_port)
            assert (await config())["listen_port"]["value"] == port
            await admin.close()

    run(main())


def test_reload_reads_the_file_again(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    ini = tmp_path / "pgbouncer.ini"

    def write(max_client_conn: str) -> None:
        ini.write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={pg_cluster.port} dbname=postgres user=postgres\n"
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 0\nunix_socket_dir =\n"
            f"auth_type = trust\nadmin_users = {ADMIN}\nmax_client_conn = {max_client_conn}\n"
        )

    async def main() -> None:
        write("100")
        proxy = Proxy(load_config(ini))
        await proxy.start()
        try:
            admin = await console(proxy)
            write("250")
            assert (await admin.execute("RELOAD")).statusmessage == "RELOAD"
            assert proxy.config.settings.max_client_conn == 250
            write("lots")
            with pytest.raises(psycopg.Error) as info:
                await admin.execute("RELOAD")
            assert info.value.sqlstate == "F0000"
            assert "RELOAD failed, see logs" in str(info.value)
            assert proxy.config.settings.max_client_conn == 250  # the old settings stay
            await admin.close()
        finally:
            await proxy.shutdown(timeout=1)

    run(main())


def test_reconnect_and_wait_close(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, pool_mode="session") as proxy:
            admin = await console(proxy)
            conn = await client(proxy)
            first_pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert (await admin.execute("RECONNECT postgres")).statusmessage == "RECONNECT"
            servers = [s for s in await show(admin, "SERVERS") if s["remote_pid"] == first_pid]
            assert servers[0]["close_needed"] == 1
            wait = asyncio.ensure_future(admin.execute("WAIT_CLOSE postgres"))
            assert await not_done_after(wait)  # the session still holds its server
            await conn.close()
            assert (await asyncio.wait_for(wait, 10)).statusmessage == "WAIT_CLOSE"
            again = await client(proxy)
            assert await again.fetchval("SELECT pg_backend_pid()") != first_pid
            await again.close()
            await admin.close()

    run(main())


def test_kill_drops_the_databases_connections(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            conn = await client(proxy)
            await conn.fetchval("SELECT 1")
            assert (await admin.execute("KILL postgres")).statusmessage == "KILL"
            await closed_by_proxy(conn)
            databases = {row["name"]: row for row in await show(admin, "DATABASES")}
            assert databases["postgres"]["paused"] == 1
            assert databases["postgres"]["current_client_connections"] == 0
            assert not [p for p in await show(admin, "POOLS") if p["database"] == "postgres"]
            await admin.execute("RESUME postgres")
            fresh = await client(proxy)
            assert await fresh.fetchval("SELECT 5") == 5
            await fresh.close()
            conn.terminate()
            await admin.close()

    run(main())


def test_kill_client_by_id(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            victim = await client(proxy, server_settings={"application_name": "victim"})
            rows = await show(admin, "CLIENTS")
            target = next(r for r in rows if r["application_name"] == "victim")
            cur = await admin.execute(f"KILL_CLIENT {target['id']}")
            assert cur.statusmessage == "KILL_CLIENT"
            await closed_by_proxy(victim)
            assert not [r for r in await show(admin, "CLIENTS") if r["id"] == target["id"]]
            await admin.close()

    run(main())


def test_shutdown_from_the_console(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            admin = await console(proxy)
            with pytest.raises(psycopg.OperationalError):
                await admin.execute("SHUTDOWN")  # no answer: the process goes away
            await asyncio.wait_for(proxy.wait_closed(), 10)
            await admin.close()

    run(main())
