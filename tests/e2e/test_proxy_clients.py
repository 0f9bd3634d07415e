"""Real clients through ``millpond proxy``: psql, pgbench, asyncpg, psycopg."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import struct
import time

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory, ProxyProcess, pg_tool, run_tool
from tests.helpers import run


def psql(cluster: PostgresCluster, url: str, sql: str, **kw: object) -> str:
    args = [pg_tool(cluster, "psql"), url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]
    return run_tool(args, **kw).stdout.strip()  # type: ignore[arg-type]


def test_psql_queries_and_transactions(pg_cluster: PostgresCluster, tx_proxy: ProxyProcess) -> None:
    url = tx_proxy.url()
    assert psql(pg_cluster, url, "SELECT 40 + 2") == "42"
    out = psql(
        pg_cluster,
        url,
        "DROP TABLE IF EXISTS e2e_t; CREATE TABLE e2e_t (a int); "
        "BEGIN; INSERT INTO e2e_t VALUES (1), (2); COMMIT; SELECT sum(a) FROM e2e_t",
    )
    assert out.splitlines()[-1] == "3"
    # An error inside a transaction, then ROLLBACK, in one psql session.
    script = (
        "BEGIN;\nINSERT INTO e2e_t VALUES (10);\nSELECT 1/0;\nROLLBACK;\n"
        "SELECT count(*) FROM e2e_t;\n"
    )
    result = run_tool([pg_tool(pg_cluster, "psql"), url, "-X", "-A", "-t"], stdin=script)
    assert "division by zero" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "2"


def test_copy_in_and_out_and_large_results(
    pg_cluster: PostgresCluster, tx_proxy: ProxyProcess
) -> None:
    url = tx_proxy.url()
    psql(pg_cluster, url, "DROP TABLE IF EXISTS e2e_copy; CREATE TABLE e2e_copy (a int, b text)")
    rows = "".join(f"{i}\tvalue {i}\n" for i in range(20_000))
    run_tool([pg_tool(pg_cluster, "psql"), url, "-X", "-c", "COPY e2e_copy FROM STDIN"], stdin=rows)
    assert psql(pg_cluster, url, "SELECT count(*), sum(a) FROM e2e_copy") == "20000|199990000"
    out = run_tool([pg_tool(pg_cluster, "psql"), url, "-X", "-c", "COPY e2e_copy TO STDOUT"]).stdout
    assert out == rows
    big = psql(
        pg_cluster, url, "SELECT string_agg(md5(i::text), '') FROM generate_series(1, 50000) i"
    )
    assert len(big) == 32 * 50_000


@pytest.mark.parametrize("mode", ["session", "transaction", "statement"])
def test_pgbench_in_each_mode(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory, mode: str
) -> None:
    proxy = proxy_factory(pool_mode=mode, default_pool_size="4")
    url = proxy.url()
    pgbench = pg_tool(pg_cluster, "pgbench")
    run_tool([pgbench, "-i", "-s", "1", "-q", pg_cluster.dsn()], timeout=120)
    for extra in (["-M", "simple"], ["-M", "extended"], ["-C"]):
        result = run_tool([pgbench, "-S", "-c", "12", "-j", "2", "-t", "150", *extra, url])
        assert "number of failed transactions: 0" in result.stdout, result.stdout
        assert re.search(r"number of transactions actually processed: 1800/1800", result.stdout)


def test_asyncpg_many_clients_few_servers(
    pg_cluster: PostgresCluster, tx_proxy: ProxyProcess
) -> None:
    async def main() -> None:
        async def client(i: int) -> list[int]:
            conn = await asyncpg.connect(tx_proxy.url(), statement_cache_size=0)
            try:
                out = []
                for j in range(20):
                    out.append(await conn.fetchval("SELECT $1::int * 1000 + $2::int", i, j))
                async with conn.transaction():
                    out.append(await conn.fetchval("SELECT $1::int", -i))
                return out
            finally:
                await conn.close()

        results = await asyncio.gather(*(client(i) for i in range(100)))
        for i, got in enumerate(results):
            assert got == [i * 1000 + j for j in range(20)] + [-i]

    run(main())


def test_psycopg_through_proxy(pg_cluster: PostgresCluster, tx_proxy: ProxyProcess) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(
            tx_proxy.url(), prepare_threshold=None, autocommit=True
        ) as conn:
            cur = await conn.execute("SELECT %s::text || %s::text", ("mill", "pond"))
            assert await cur.fetchone() == ("millpond",)
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE IF NOT EXISTS nothing (a int)")
            cur = await conn.execute("SELECT generate_series(1, 1000)")
            assert len(await cur.fetchall()) == 1000

    run(main())


def test_cancel_reaches_the_right_server(
    pg_cluster: PostgresCluster, tx_proxy: ProxyProcess
) -> None:
    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(tx_proxy.url(), autocommit=True)
        other = await psycopg.AsyncConnection.connect(tx_proxy.url(), autocommit=True)
        try:
            sleeper = asyncio.create_task(conn.execute("SELECT pg_sleep(5)"))
            await asyncio.sleep(0.5)
            busy = asyncio.create_task(other.execute("SELECT pg_sleep(1), 'other survived'"))
            await asyncio.sleep(0.1)
            conn.cancel()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await sleeper
            cur = await busy
            assert (await cur.fetchone())[1] == "other survived"  # type: ignore[index]
            cur = await conn.execute("SELECT 'still usable'")
            assert await cur.fetchone() == ("still usable",)
        finally:
            await conn.close()
            await other.close()

    run(main())


def test_client_dying_mid_transaction_leaks_nothing(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        setup = await asyncpg.connect(pg_cluster.dsn())
        await setup.execute("DROP TABLE IF EXISTS e2e_die; CREATE TABLE e2e_die (a int)")
        await setup.close()
        victim = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        await victim.execute("BEGIN; INSERT INTO e2e_die VALUES (1)")
        victim.terminate()  # the socket just goes away, mid-transaction
        await asyncio.sleep(0.2)
        survivor = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        try:
            assert await survivor.fetchval("SELECT count(*) FROM e2e_die") == 0
            assert await survivor.fetchval("SELECT txid_current_if_assigned()") is None
        finally:
            await survivor.close()

    run(main())


def test_statement_mode_refuses_transactions(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pool_mode="statement")
    result = run_tool(
        [pg_tool(pg_cluster, "psql"), proxy.url(), "-X", "-c", "BEGIN", "-c", "SELECT 1"],
        check=False,
    )
    assert "transaction blocks not allowed in statement pooling mode" in result.stderr
    assert psql(pg_cluster, proxy.url(), "SELECT 5") == "5"


def test_parameters_follow_each_client_on_shared_servers(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(default_pool_size="1")

    async def main() -> None:
        a = await asyncpg.connect(
            proxy.url(), statement_cache_size=0, server_settings={"application_name": "alpha"}
        )
        b = await asyncpg.connect(
            proxy.url(), statement_cache_size=0, server_settings={"application_name": "beta"}
        )
        try:
            for _ in range(3):
                assert await a.fetchval("SHOW application_name") == "alpha"
                assert await b.fetchval("SHOW application_name") == "beta"
            await a.execute("SET application_name = 'gamma'")
            assert await b.fetchval("SHOW application_name") == "beta"
            assert await a.fetchval("SHOW application_name") == "gamma"
            assert await a.fetchval("SELECT pg_backend_pid()") == await b.fetchval(
                "SELECT pg_backend_pid()"
            )
        finally:
            await a.close()
            await b.close()

    run(main())


def test_session_mode_resets_between_clients(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pool_mode="session", default_pool_size="1")

    async def main() -> None:
        a = await asyncpg.connect(proxy.url())
        await a.execute("SET search_path = nowhere")
        await a.execute("CREATE TEMP TABLE mine (a int)")
        assert await a.fetchval("SHOW search_path") == "nowhere"
        pid = await a.fetchval("SELECT pg_backend_pid()")
        await a.close()
        b = await asyncpg.connect(proxy.url())
        try:
            assert await b.fetchval("SELECT pg_backend_pid()") == pid
            assert await b.fetchval("SHOW search_path") == '"$user", public'
            assert await b.fetchval("SELECT to_regclass('pg_temp.mine')") is None
        finally:
            await b.close()

    run(main())


def test_garbage_clients_do_not_disturb_others(
    pg_cluster: PostgresCluster, tx_proxy: ProxyProcess
) -> None:
    payloads = [
        b"\x00\x00\x00\x03",  # length too small
        struct.pack("!II", 99999999, 196608),  # huge startup length
        struct.pack("!II", 8, 1234),  # unknown protocol
        struct.pack("!II", 16, 196608) + b"user\x00x",  # truncated params
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", tx_proxy.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.settimeout(5)
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                data = b""
            assert data == b"" or data[:1] == b"E"
    assert psql(pg_cluster, tx_proxy.url(), "SELECT 'fine'") == "fine"


def test_sigint_lets_the_running_transaction_finish(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    """SIGINT, PgBouncer's safe shutdown: transactions in flight finish, then exit."""
    proxy = proxy_factory()

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(0.5), 'finished'", column=1))
        await asyncio.sleep(0.1)
        proxy.signal(signal.SIGINT)
        assert await query == "finished"
        await asyncio.sleep(1)
        assert proxy.process.poll() is not None

    run(main())


def test_sigterm_waits_for_clients_to_leave(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    """SIGTERM, PgBouncer's super-safe shutdown: no new clients; existing ones stay served."""
    proxy = proxy_factory()

    async def main() -> None:
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        proxy.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(proxy.url(), timeout=2)
        assert await conn.fetchval("SELECT 'still served'") == "still served"
        assert proxy.process.poll() is None
        await conn.close()
        await asyncio.sleep(1)
        assert proxy.process.poll() is not None

    run(main())


def wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in the proxy log"
        time.sleep(0.05)


def test_sighup_reloads_the_config(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(pool_mode="session")
    text = proxy.ini.read_text().replace("pool_mode = session", "pool_mode = statement")
    proxy.ini.write_text(text)
    proxy.signal(signal.SIGHUP)
    wait_for_log(proxy, "configuration reloaded")
    result = run_tool(
        [pg_tool(pg_cluster, "psql"), proxy.url(), "-X", "-c", "BEGIN", "-c", "SELECT 1"],
        check=False,
    )
    assert "transaction blocks not allowed" in result.stderr
    # A broken file is refused and the running configuration stays.
    proxy.ini.write_text(text.replace("pool_mode = statement", "pool_mode = sometimes"))
    proxy.signal(signal.SIGHUP)
    wait_for_log(proxy, "reload failed")
    assert psql(pg_cluster, proxy.url(), "SELECT 'alive'") == "alive"
