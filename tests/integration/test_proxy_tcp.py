"""PgBouncer's tcp_* settings on the proxy's real sockets: the listener, the clients it
accepts (in C through the door, and in Python) and its server connections."""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg

from millpond.embedded import PostgresCluster
from millpond.proxy.config import config_from_args
from millpond.proxy.server import Proxy
from tests.helpers import run
from tests.integration.test_proxy_admin import BASE_SETTINGS, running_proxy
from tests.integration.test_proxy_door import QUIET, guest
from tests.integration.test_proxy_lane import simple, the_pool, value

TIMINGS = {
    "tcp_keepidle": "30",
    "tcp_keepintvl": "7",
    "tcp_keepcnt": "4",
    "tcp_user_timeout": "12000",
    "tcp_socket_buffer": "65536",
}


def options(fd: int) -> dict[str, int]:
    with socket.socket(fileno=os.dup(fd)) as sock:
        get = sock.getsockopt
        return {
            "keepalive": get(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": get(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": get(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": get(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout": get(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            "sndbuf": get(socket.SOL_SOCKET, socket.SO_SNDBUF),
            "rcvbuf": get(socket.SOL_SOCKET, socket.SO_RCVBUF),
        }


def tuned(fd: int, idle: int = 30) -> bool:
    got = options(fd)
    # the kernel doubles a requested buffer size (its bookkeeping overhead)
    return got == {
        "keepalive": 1,
        "idle": idle,
        "interval": 7,
        "count": 4,
        "user_timeout": 12000,
        "sndbuf": 2 * 65536,
        "rcvbuf": 2 * 65536,
    }


def listeners(proxy: Proxy) -> list[int]:
    return [sock.fileno() for server in proxy.servers for sock in server.sockets]


def server_fds(proxy: Proxy) -> list[int]:
    conns = [slot.conn for slot in the_pool(proxy)._core.slots.values() if slot.conn]
    return [conn.transport.get_extra_info("socket").fileno() for conn in conns]


def python_client_fds(proxy: Proxy) -> list[int]:
    return [c.transport.get_extra_info("socket").fileno() for c in proxy.clients]


def proxy_side(proxy: Proxy, conn: psycopg.AsyncConnection[Any]) -> int:
    """The proxy's socket for a client that Python serves."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        here = sock.getsockname()
    (fd,) = [
        c.transport.get_extra_info("socket").fileno()
        for c in proxy.clients
        if c.transport.get_extra_info("peername") == here
    ]
    return fd


def deferred(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)


def test_every_tcp_socket_gets_the_settings_as_pgbouncer_sets_them(
    pg_cluster: PostgresCluster,
) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster, **QUIET, **TIMINGS) as proxy:
            assert proxy.door is not None
            for fd in listeners(proxy):
                assert tuned(fd)
                assert deferred(fd)  # tcp_defer_accept: on by default, as PgBouncer's
            first = await simple(proxy)  # a first login is Python's
            assert await value(first, "SELECT 1") == 1
            (client_fd,) = python_client_fds(proxy)
            assert tuned(client_fd)  # inherited from the listener: no setsockopt of ours
            a_guest = await guest(proxy)  # the next ones are the door's, in C
            lane = the_pool(proxy).lane
            assert lane is not None
            assert lane.lane is not None
            guests = [side.fd for side in lane.lane.sides() if side.guest]
            assert guests
            assert all(tuned(fd) for fd in guests)
            assert await value(a_guest, "SELECT 2") == 2
            servers = server_fds(proxy)
            assert servers
            assert all(tuned(fd) for fd in servers)

            # RELOAD: new connections take the new value up; the pool is not reconnected
            before = set(servers)
            new = config_from_args(
                "127.0.0.1:0",
                pg_cluster.dsn(),
                **{**BASE_SETTINGS, **QUIET, **TIMINGS, "tcp_keepidle": "45"},
                tcp_defer_accept="0",
            )
            proxy.apply_config(new)
            assert set(server_fds(proxy)) == before
            assert all(tuned(fd, idle=45) for fd in listeners(proxy))
            assert not any(deferred(fd) for fd in listeners(proxy))
            later = await simple(proxy)
            assert await value(later, "SELECT 3") == 3
            assert tuned(proxy_side(proxy, later), idle=45)
            assert tuned(proxy_side(proxy, first))  # accepted before: unchanged
            for conn in (first, a_guest, later):
                await conn.close()

    run(main())


def test_keepalive_off(pg_cluster: PostgresCluster) -> None:
    async def main() -> None:
        settings = {"tcp_keepalive": "0", "tcp_defer_accept": "0"}
        async with running_proxy(pg_cluster, **settings) as proxy:
            conn = await simple(proxy)
            assert await value(conn, "SELECT 1") == 1
            fds = listeners(proxy) + python_client_fds(proxy) + server_fds(proxy)
            assert len(fds) >= 3
            assert all(options(fd)["keepalive"] == 0 for fd in fds)
            assert not any(deferred(fd) for fd in listeners(proxy))
            await conn.close()

    run(main())
