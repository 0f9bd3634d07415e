"""The door (src/millpond/proxy/door.py): connections accepted in C, repeat logins
answered there, guests in the lane with no Python object until one is needed.

Each test runs a proxy in this process with the door on (trust, no per-login logging)
and looks inside: that the door really welcomed who it should, and that every way a
guest becomes Python's (a SET, the extended protocol, a cancel, the admin console, a
timeout, max_client_conn, PAUSE, RELOAD, dying mid-transaction) leaves it working and
nobody else touched.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from millpond.proxy.server import Proxy
from tests.helpers import run
from tests.integration.test_proxy_admin import console, running_proxy, show
from tests.integration.test_proxy_lane import simple, the_pool, value

QUIET = {"log_connections": "0", "log_disconnections": "0"}  # the door's condition


@asynccontextmanager
async def door_proxy(pg_cluster: PostgresCluster, **overrides: Any) -> AsyncIterator[Proxy]:
    async with running_proxy(pg_cluster, **{**QUIET, **overrides}) as proxy:
        assert proxy.door is not None, "the door should be on with these settings"
        yield proxy


def welcomed(proxy: Proxy) -> int:
    assert proxy.door is not None
    return int(proxy.door.door.welcomed)


async def guest(proxy: Proxy) -> psycopg.AsyncConnection[Any]:
    """A connection the door lets in (the first one of its kind teaches it)."""
    before = welcomed(proxy)
    conn = await simple(proxy)
    if welcomed(proxy) == before:  # the first: Python's login, learned
        await conn.close()
        conn = await simple(proxy)
    assert welcomed(proxy) == before + 1 or (before == 0 and welcomed(proxy) == 1)
    return conn


def test_repeat_logins_are_welcomed_by_the_door_and_counted(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            for n in range(30):  # as pgbench -C: connect, one query, leave
                conn = await simple(proxy)
                assert await value(conn, "SELECT %s::int + 1", n) == n + 1
                await conn.close()
            assert welcomed(proxy) >= 29  # all but the first
            assert proxy.door is not None
            for _ in range(50):  # the door closed each one itself: no Python client left
                if not proxy.clients and proxy.door.guests == 0:
                    break
                await asyncio.sleep(0.02)
            assert not proxy.clients
            assert proxy.door.guests == 0
            proxy.release_kept()  # folds the door's logins
            assert proxy.login_stats.logins == 30
            assert the_pool(proxy).lane is not None

    run(main())


def test_a_guest_that_sets_something_becomes_a_client_and_keeps_it(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            a, b = await guest(proxy), await guest(proxy)
            assert not proxy.clients  # both are guests: no Python object
            await a.execute("SET statement_timeout = '4321ms'")
            assert len(proxy.clients) == 1  # a was adopted
            for _ in range(10):
                assert await value(a, "SHOW statement_timeout") == "4321ms"
                assert await value(b, "SHOW statement_timeout") == "0"
            await a.close()
            await b.close()

    run(main())


def test_extended_protocol_guests_are_served_by_the_python_path(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster) as proxy:
            url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
            for n in range(5):
                conn = await asyncpg.connect(url, statement_cache_size=0)
                assert await conn.fetchval("SELECT $1::int * 2", n) == 2 * n
                async with conn.transaction():
                    assert await conn.fetchval("SELECT $1::text", "x") == "x"
                await conn.close()
            assert welcomed(proxy) >= 3

    run(main())


def test_guests_sockets_have_tcp_nodelay(pg_cluster: PostgresCluster) -> None:
    """The door sets TCP_NODELAY on its listening socket once and its accepted sockets
    inherit it (a small reply must not wait for an ACK), with and without an
    SSLRequest before the login."""

    async def main() -> None:
        async with door_proxy(pg_cluster) as proxy:
            conns = [await guest(proxy)]
            conns.append(await simple(proxy, sslmode="disable"))
            conns.append(await simple(proxy, sslmode="prefer"))
            lane = the_pool(proxy).lane
            assert lane is not None
            assert lane.lane is not None
            sides = [side for side in lane.lane.sides() if side.guest]
            assert len(sides) == 3
            for side in sides:
                with socket.socket(fileno=os.dup(side.fd)) as sock:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for conn in conns:
                assert await value(conn, "SELECT 1") == 1
                await conn.close()

    run(main())


def test_a_cancel_reaches_a_guest_query(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            a = await guest(proxy)
            task = asyncio.ensure_future(a.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.3)
            assert not proxy.clients  # still a guest, linked in the lane
            await a.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(task, 10)
            assert await value(a, "SELECT 3") == 3
            await a.close()

    run(main())


def test_the_admin_console_sees_guests_and_they_go_on(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            guests = [await guest(proxy) for _ in range(4)]
            admin = await console(proxy)
            rows = [r for r in await show(admin, "CLIENTS") if r["database"] == "postgres"]
            assert len(rows) == 4
            assert len({r["port"] for r in rows}) == 4
            assert all(r["addr"] == "127.0.0.1" for r in rows)
            for n, conn in enumerate(guests):
                assert await value(conn, "SELECT %s::int", n) == n
                await conn.close()
            await admin.close()

    run(main())


def test_max_client_conn_counts_guests(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, max_client_conn="3") as proxy:
            first = await guest(proxy)
            more = [await simple(proxy) for _ in range(2)]
            assert welcomed(proxy) >= 2
            with pytest.raises(psycopg.OperationalError, match="no more connections allowed"):
                await simple(proxy)
            await more[0].close()
            await asyncio.sleep(0.1)
            again = await simple(proxy)  # room again
            assert await value(again, "SELECT 1") == 1
            for conn in (first, more[1], again):
                await conn.close()

    run(main())


def test_a_guest_dying_mid_transaction_leaves_no_trace(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="1") as proxy:
            a = await guest(proxy)
            await a.execute("BEGIN")
            await a.execute("CREATE TABLE door_dead (x int)")
            pid = await value(a, "SELECT pg_backend_pid()")
            a.pgconn.finish()  # the socket closes under the lane, mid-transaction
            await a.close()
            b = await simple(proxy)
            for _ in range(3):
                assert await value(b, "SELECT pg_backend_pid()") != pid
                assert await value(b, "SELECT to_regclass('door_dead')") is None
            await b.close()

    run(main())


def test_pause_reload_and_resume_with_guests(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            a = await guest(proxy)
            admin = await console(proxy)
            await admin.execute("PAUSE")
            assert proxy.door is not None
            assert not proxy.door.door.logins  # the lane closed: nothing to welcome with
            task = asyncio.ensure_future(value(a, "SELECT 7"))
            await asyncio.sleep(0.3)
            assert not task.done()  # paused: it waits
            await admin.execute("RESUME")
            assert await asyncio.wait_for(task, 10) == 7
            b = await simple(proxy)  # learned again
            await b.close()
            c = await simple(proxy)
            assert await value(c, "SELECT 8") == 8
            assert proxy.reload() is False  # no file: nothing reloaded, nothing broken
            for conn in (a, c):
                await conn.close()
            await admin.close()

    run(main())


def test_client_idle_timeout_closes_an_idle_guest(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, client_idle_timeout="1") as proxy:
            a = await guest(proxy)
            assert await value(a, "SELECT 1") == 1
            await asyncio.sleep(2.5)
            with pytest.raises(psycopg.OperationalError):
                await value(a, "SELECT 1")
            await a.close()

    run(main())


def test_a_silent_or_partial_login_is_timed_out_and_others_are_served(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster, client_login_timeout="1") as proxy:
            learned = await guest(proxy)
            loop = asyncio.get_running_loop()
            silent = socket.create_connection(("127.0.0.1", proxy.port))
            partial = socket.create_connection(("127.0.0.1", proxy.port))
            partial.sendall(struct.pack("!ii", 40, 196608)[:6])  # half a header
            silent.setblocking(False)
            partial.setblocking(False)
            assert await value(learned, "SELECT 1") == 1  # meanwhile, others are served
            for sock in (silent, partial):
                answer = await asyncio.wait_for(_read_all(loop, sock), 5)
                assert b"client_login_timeout" in answer
                sock.close()
            assert await value(learned, "SELECT 2") == 2
            await learned.close()

    run(main())


def test_garbage_and_cancel_packets_go_to_the_python_path(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster) as proxy:
            learned = await guest(proxy)
            loop = asyncio.get_running_loop()
            for junk in (
                struct.pack("!i", 3) + b"xxxx",  # a length too short
                struct.pack("!i", 1 << 30) + b"\0" * 8,  # too long
                struct.pack("!ii", 8, 1234),  # an unknown request code
                struct.pack("!iiii", 16, 80877102, 1, 2),  # a cancel for no one
            ):
                sock = socket.create_connection(("127.0.0.1", proxy.port))
                sock.setblocking(False)
                await loop.sock_sendall(sock, junk)
                answer = await asyncio.wait_for(_read_all(loop, sock), 5)
                assert answer == b"" or answer[:1] == b"E"  # an error, or just closed
                sock.close()
            assert await value(learned, "SELECT 1") == 1
            await learned.close()

    run(main())


async def _read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = await loop.sock_recv(sock, 4096)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def test_other_startup_parameters_are_logins_of_their_own(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        async with door_proxy(pg_cluster) as proxy:
            for name in ("one", "two", "one", "two"):
                conn = await simple(proxy, application_name=name)
                assert await value(conn, "SHOW application_name") == name
                await conn.close()

    run(main())


def test_the_door_is_off_where_it_cannot_answer(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        for settings in (
            {},  # log_connections = 1 (PgBouncer's default): each login is logged
            {**QUIET, "auth_type": "md5"},
            {**QUIET, "fast_lane": "0"},
            {**QUIET, "application_name_add_host": "1"},
        ):
            async with running_proxy(pg_cluster, **settings) as proxy:
                assert proxy.door is None

    run(main())


def test_unix_socket_guests(pg_cluster: PostgresCluster, tmp_path: Any) -> None:
    async def main() -> None:
        with socket.socket() as probe:  # a free port: the socket file is named after it
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        async with door_proxy(
            pg_cluster, unix_socket_dir=str(tmp_path), listen_port=str(port)
        ) as proxy:
            for n in range(4):
                conn = await psycopg.AsyncConnection.connect(
                    host=str(tmp_path),
                    port=port,
                    dbname="postgres",
                    user="postgres",
                    autocommit=True,
                )
                cur = await conn.execute("SELECT %s::int", (n,), prepare=False)
                assert (await cur.fetchone()) == (n,)
                await conn.close()
            assert welcomed(proxy) >= 1

    run(main())


def test_the_metrics_count_guests_by_state(pg_cluster: PostgresCluster) -> None:
    from millpond.observe.snapshot import ProxySource

    async def main() -> None:
        async with door_proxy(pg_cluster, default_pool_size="2") as proxy:
            idle = [await guest(proxy) for _ in range(3)]
            busy = await guest(proxy)
            task = asyncio.ensure_future(busy.execute("SELECT pg_sleep(0.5)"))
            await asyncio.sleep(0.2)
            view = ProxySource(proxy).view()
            assert not proxy.clients  # counted from the lane, without adopting anyone
            clients = view.proxy.clients if view.proxy is not None else {}
            assert (clients["idle"], clients["active"]) == (3, 1)
            await task
            for conn in (*idle, busy):
                await conn.close()

    run(main())
