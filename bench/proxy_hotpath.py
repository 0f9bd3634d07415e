"""The proxy's own Python cost per transaction, without sockets.

Run:  python bench/proxy_hotpath.py [--transactions N] [--rounds R] [--profile | --bytecodes]

pgbench through the proxy measures everything at once: the kernel's TCP work (the same
for any pooler), PostgreSQL, pgbench, and the proxy's Python code. This isolates the
last: the real :class:`~millpond.proxy.server.Proxy`, client connections, server pool
and server connections, wired to fake transports that swallow writes. One transaction
is what ``pgbench -S`` sends in transaction mode: a Query from the client; the server's
RowDescription, DataRow, CommandComplete and ReadyForQuery(idle) back; the server
connection released. Cases:

- ``simple``: one client, one server connection (no waiting), which the idle client
  keeps between transactions (server affinity, on by default);
- ``simple released``: the same with ``server_affinity = 0``: the server connection goes
  back to the pool after every transaction and is taken again for the next;
- ``queued``: two clients on one server connection, so every transaction waits and is
  handed off (the pool-smaller-than-clients case, c=100 on 20);
- ``extended``: pgbench -M extended (Parse/Bind/Describe/Execute/Sync, unnamed);
- ``prepared``: pgbench -M prepared, asyncpg's statement cache (Bind of a named
  statement, which the proxy maps onto its server-side name);
- ``login``: pgbench -C, a new client connection per transaction (warm);
- ``cold``, ``cold released``, ``cold queued``: 20 (with and without server affinity)
  and 100 clients on 20 server connections with the CPU
  caches flushed before each callback, as the kernel's TCP work flushes them in a real
  run. Warm numbers are about half of what pgbench sees; the cold ones are close to it.

It prints microseconds per transaction (best of the rounds): the number to cut when the
proxy is slower than PgBouncer (whose user-space cost is ~1-2 us per transaction; the
kernel's is ~17 us on a 2-vCPU machine, see docs/proxy-benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import millpond
from millpond.proxy.backend import ServerConnection, ServerState
from millpond.proxy.config import config_from_args
from millpond.proxy.frontend import ClientConnection, ClientState
from millpond.proxy.pools import ServerPool
from millpond.proxy.protocol import messages as m
from millpond.proxy.server import Proxy

WELCOME = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY", "TimeZone": "UTC"}
READY = m.ready_for_query(m.TX_IDLE)
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"


class FakeTransport:
    """Swallows writes (counting them); never closes."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def select_response() -> bytes:
    """What PostgreSQL answers to pgbench -S: one int4 column, one row."""
    field = b"abalance\0" + struct.pack("!ihihih", 16399, 3, 23, 4, -1, 0)
    rows = _msg(b"T", struct.pack("!h", 1) + field)
    rows += _msg(b"D", struct.pack("!hi", 1, 1) + b"0")
    rows += _msg(b"C", b"SELECT 1\0")
    return rows + m.ready_for_query(m.TX_IDLE)


def extended_request() -> bytes:
    return m.parse("", SQL) + m.bind("", "", []) + m.describe(b"P", "") + m.execute("") + m.sync()


def extended_response() -> bytes:
    return _msg(b"1", b"") + _msg(b"2", b"") + select_response()


def prepared_request() -> bytes:
    """pgbench -M prepared, asyncpg's statement cache: Bind a named statement."""
    return m.bind("", "P_0", [b"48213"]) + m.execute("") + m.sync()


def prepared_response() -> bytes:
    return _msg(b"2", b"") + select_response()[select_response().index(b"D") :]


async def setup(
    clients: int, servers: int, affinity: bool = True
) -> tuple[Proxy, list[ClientConnection], ServerPool]:
    config = config_from_args(
        "127.0.0.1:0",
        "postgresql://bench@127.0.0.1:1/bench",
        pool_mode="transaction",
        auth_type="trust",
        fast_lane=False,  # the Python path's cost; the lane needs real sockets
    )
    proxy = Proxy(config)
    pool = proxy.pool_for("bench", "bench")
    pool.affinity = affinity  # server_affinity (on by default)

    async def connect(timeout: float) -> ServerConnection:
        conn = ServerConnection(pool.server_driver.target)
        conn.transport = FakeTransport()  # type: ignore[assignment]
        conn.state = ServerState.IDLE
        conn.params = dict(WELCOME)
        conn._refresh_sig()
        return conn

    pool.server_driver.connect = connect  # type: ignore[method-assign]
    pool.server_driver.welcome = dict(WELCOME)  # what the first real login records
    pool._resize(servers)
    slots = [await pool._lease(None) for _ in range(servers)]
    for slot in slots:
        pool.give(slot)
    conns = []
    for _ in range(clients):
        client = ClientConnection(proxy)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        client.user = client.database = "bench"
        client.pool = pool
        client.state = ClientState.LOGIN
        client.welcome(WELCOME)
        conns.append(client)
    return proxy, conns, pool


def run_case(
    name: str,
    clients: int,
    servers: int,
    request: bytes,
    response: bytes,
    n: int,
    prelude: tuple[bytes, bytes] | None = None,
    affinity: bool = True,
) -> Callable[[], float]:
    """A callable that runs ``n`` transactions and returns microseconds per transaction
    (``prelude``: a request and its answer exchanged once first, e.g. a Parse)."""
    loop = asyncio.get_event_loop()
    _proxy, conns, pool = loop.run_until_complete(setup(clients, servers, affinity))
    server_conns = [s.conn for s in pool._core.slots.values()]
    server: ServerConnection = server_conns[0]
    if prelude is not None:
        for client in conns:
            client.data_received(prelude[0])
            server.data_received(prelude[1])
    for client in conns[:1]:  # sanity: a transaction ends with the server back in the pool
        client.data_received(request)  # (or, with affinity, kept by its idle client)
        assert client.server is server, "the client did not get the server connection"
        server.data_received(response)
        if affinity:  # nobody waits here
            assert client.keeps, "the server was not kept"
            assert client.server is server, "the kept server is not the one it had"
        else:
            assert client.server is None, "the server connection was not released"

    def one_server() -> float:
        client = conns[0]
        start = time.perf_counter()
        for _ in range(n):
            client.data_received(request)
            server.data_received(response)
        return (time.perf_counter() - start) / n * 1e6

    def queued() -> float:
        a, b = conns[0], conns[1]
        a.data_received(request)  # a holds the server connection
        start = time.perf_counter()
        for _ in range(n // 2):
            b.data_received(request)  # b waits
            server.data_received(response)  # a done: handed to b
            a.data_received(request)  # a waits
            server.data_received(response)  # b done: handed to a
        elapsed = time.perf_counter() - start
        server.data_received(response)
        return elapsed / (n // 2 * 2) * 1e6

    return queued if clients > servers else one_server


def cold_case(
    request: bytes, response: bytes, clients: int, n: int, affinity: bool = True
) -> Callable[[], float]:
    """``clients`` clients on 20 server connections, the CPU caches flushed before each
    callback, as the kernel's TCP work between two callbacks flushes them in a real
    run: this is close to what pgbench sees (the warm numbers are about half of it).
    With more clients than servers, every transaction waits and is handed off."""
    from collections import deque

    loop = asyncio.get_event_loop()
    _proxy, conns, _pool = loop.run_until_complete(setup(clients, 20, affinity))
    junk = bytearray(8 << 20)
    touch = b"\x01" * len(junk[::64])

    def flush() -> None:
        junk[::64] = touch  # one write per cache line of a buffer larger than the caches

    active: deque[ClientConnection] = deque()  # linked clients, oldest first
    for client in conns:
        client.data_received(request)  # the first 20 get a server, the rest wait
        if client.server is not None:
            active.append(client)

    def cold() -> float:
        times = []  # per transaction; the median shrugs off interrupts and preemption
        clock = time.perf_counter
        for _ in range(n):
            client = active.popleft()
            server = client.server
            assert server is not None
            flush()
            start = clock()
            server.data_received(response)  # done: released (or kept), maybe handed off
            spent = clock() - start
            if server.client is not None and server.client is not client:
                active.append(server.client)
            flush()
            start = clock()
            client.data_received(request)  # the next transaction: a server, or a wait
            times.append(spent + clock() - start)
            if client.server is not None:
                active.append(client)
        return statistics.median(times) * 1e6

    return cold


def login_case(n: int) -> Callable[[], float]:
    """pgbench -C: a new client per transaction (SSLRequest refused, trust login,
    one query, Terminate, gone), warm. Microseconds per connection."""
    proxy, _conns, pool = asyncio.get_event_loop().run_until_complete(setup(0, 1))
    server: ServerConnection = next(iter(pool._core.slots.values())).conn
    startup = m.startup_message({"user": "bench", "database": "bench"})
    request, response, bye = m.query(SQL), select_response(), m.terminate()

    async def running() -> float:  # connection_made arms client_login_timeout's timer
        start = time.perf_counter()
        for _ in range(n):
            client = ClientConnection(proxy)
            client.connection_made(FakeTransport())  # type: ignore[arg-type]
            client.data_received(m.ssl_request())
            client.data_received(startup)
            client.data_received(request)
            server.data_received(response)
            client.data_received(bye)
            client.connection_lost(None)
        return (time.perf_counter() - start) / n * 1e6

    def logins() -> float:
        return asyncio.get_event_loop().run_until_complete(running())

    return logins


def count_bytecodes(case: Callable[[], float], n: int) -> tuple[float, float]:
    """Bytecodes executed and Python calls made in millpond's own code per transaction
    (``n`` per call of ``case``), with ``sys.settrace`` opcode events: unlike time, the
    count does not depend on the machine or its load, so it compares two versions of the
    code exactly (compiled helpers count as the one call that runs them)."""
    package = str(Path(millpond.__file__).parent)
    ops = calls = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal ops, calls
        if not frame.f_code.co_filename.startswith(package):
            return None  # the driver, the fake transports, asyncio: not ours
        if event == "call":
            calls += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            ops += 1
        return tracer

    case()  # warm up (first-call work is not per transaction)
    sys.settrace(tracer)
    try:
        case()
    finally:
        sys.settrace(None)
    return ops / n, calls / n


def bytecodes() -> None:
    """--bytecodes: the count per transaction for the warm cases."""
    n = 200
    cases = {
        "simple": run_case("simple", 1, 1, m.query(SQL), select_response(), n),
        "simple released": run_case(
            "simple", 1, 1, m.query(SQL), select_response(), n, affinity=False
        ),
        "queued": run_case("queued", 2, 1, m.query(SQL), select_response(), n),
        "extended": run_case("extended", 1, 1, extended_request(), extended_response(), n),
        "login": login_case(n),
    }
    for name, case in cases.items():
        ops, calls = count_bytecodes(case, n)
        print(f"{name:15s} {ops:6.0f} bytecodes, {calls:5.1f} Python calls per transaction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one round of each")
    parser.add_argument(
        "--bytecodes", action="store_true", help="count bytecodes per transaction instead"
    )
    args = parser.parse_args()
    asyncio.set_event_loop(asyncio.new_event_loop())
    if args.bytecodes:
        bytecodes()
        return
    n = args.transactions
    cases = {
        "simple": run_case("simple", 1, 1, m.query(SQL), select_response(), args.transactions),
        "simple released": run_case(
            "simple", 1, 1, m.query(SQL), select_response(), n, affinity=False
        ),
        "queued": run_case("queued", 2, 1, m.query(SQL), select_response(), args.transactions),
        "extended": run_case("extended", 1, 1, extended_request(), extended_response(), n),
    }
    cold = max(1, args.transactions // 50)
    cases["cold"] = cold_case(m.query(SQL), select_response(), 20, cold)
    cases["cold released"] = cold_case(m.query(SQL), select_response(), 20, cold, False)
    cases["cold queued"] = cold_case(m.query(SQL), select_response(), 100, cold)
    parse = (m.parse("P_0", SQL.replace("48213", "$1")) + m.sync(), _msg(b"1", b"") + READY)
    prepared = run_case("prepared", 1, 1, prepared_request(), prepared_response(), n, parse)
    cases["prepared"] = prepared
    cases["login"] = login_case(max(1, args.transactions // 10))
    for name, case in cases.items():
        case()  # warm up
        best = min(case() for _ in range(args.rounds))
        print(f"{name:15s} {best:6.2f} us/transaction")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(case)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
