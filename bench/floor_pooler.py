"""The least a Python transaction pooler can do: the floor under millpond proxy's numbers.

``python bench/floor_pooler.py PG_PORT:PORT [--pool-size N]`` logs in to PostgreSQL
(trust, as ``postgres`` to the database ``bench``) ``N`` times, then listens on ``PORT``
and pools: it refuses SSL, answers every client's startup packet with the first server
login's welcome (no authentication, no parameters tracked), forwards each client read to
a free server connection or queues it, and at a ReadyForQuery that says idle hands the
server connection to the next queued client, all on uvloop Protocols.

It is not a pooler anyone should run: it checks nothing (no message framing beyond the
last six bytes of a read, no cancel, no errors, no limits, no statistics, one query per
client read), so it is only correct for pgbench's own scripts. That is the point: it is
what any pooler written in Python on uvloop spends at the least, the event loop's and
the kernel's share, with none of millpond's work. proxy_bench.py runs it as the target
``floor`` beside PgBouncer and millpond proxy, so a run shows how much of the distance to
PgBouncer is the language and how much is millpond's own code.

``--compiled`` runs the same pooler with its data path in C (bench/floor_relay.pyx, built
on first use with Cython's pyximport): logins the same, then one epoll set registered
with uvloop, one Python call per wake-up, a recv() and a send() in C per read. It is the
target ``cfloor``: what a compiled data path inside a Python process could reach.

``--lane`` runs the same pooler on millpond's own compiled lane (``millpond.proxy._lane``,
docs/proxy-data-path.md): logins the same, then each logged-in client and each server
connection enters the lane, which frames every message, runs the session tracker's
first look on every Query (``session_check``, as the proxy will), counts what each server
owes, keeps its clocks and runs the queue; a Terminate or an end of file ejects the
client back to Python, which closes it. It is the target ``lane``: the lane's cost
before it is wired into the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import socket
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any, cast

SSL_REQUEST = struct.pack("!II", 8, 80877103)
TERMINATE = b"X\x00\x00\x00\x04"


class Server(asyncio.Protocol):
    """A server connection: logs in once, then answers whichever client it serves."""

    def __init__(self, pool: Floor) -> None:
        self.pool = pool
        self.client: Client | None = None
        self.tail = b""  # the last bytes read: a ReadyForQuery may straddle two reads
        self.welcome = b""  # what the login got, up to its ReadyForQuery
        self.login: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        tail = (self.tail + data)[-6:]
        self.tail = tail
        client = self.client
        if client is None:  # the login: everything up to the first ReadyForQuery
            self.welcome += data
            if tail[:1] == b"Z" and not self.login.done():
                self.login.set_result(self.welcome)
            return
        client.transport.write(data)
        if tail[:1] == b"Z" and tail[5:] == b"I":  # transaction over: next client
            client.server = None
            self.pool.release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        print(f"floor: a server connection closed ({exc})", file=sys.stderr, flush=True)


class Client(asyncio.Protocol):
    """A client connection: one canned login, then each read goes to a server."""

    def __init__(self, pool: Floor) -> None:
        self.pool = pool
        self.server: Server | None = None
        self.started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.started:
            if data == SSL_REQUEST:
                self.transport.write(b"N")
            else:
                self.started = True
                self.transport.write(self.pool.welcome)
            return
        if data == TERMINATE:
            self.transport.close()
            return
        server = self.server
        if server is None:
            pool = self.pool
            if not pool.free:
                pool.waiting.append((self, data))
                return
            server = self.server = pool.free.pop()
            server.client = self
        server.transport.write(data)


class Floor:
    """The pool: free server connections and the clients waiting for one."""

    def __init__(self) -> None:
        self.free: list[Server] = []
        self.waiting: deque[tuple[Client, bytes]] = deque()
        self.welcome = b""

    def release(self, server: Server) -> None:
        while self.waiting:
            client, data = self.waiting.popleft()
            if client.transport.is_closing():
                continue
            server.client, client.server = client, server
            server.transport.write(data)
            return
        server.client = None
        self.free.append(server)


def startup_packet() -> bytes:
    body = b"\x00\x03\x00\x00user\x00postgres\x00database\x00bench\x00\x00"
    return struct.pack("!I", len(body) + 4) + body


def check_welcome(welcome: bytes) -> None:
    if welcome[:1] != b"R" or welcome[5:9] != b"\x00\x00\x00\x00":
        raise SystemExit(f"floor: the server wants a password or failed: {welcome!r}")


async def serve(pg_port: int, port: int, pool_size: int) -> None:
    loop = asyncio.get_running_loop()
    pool = Floor()
    startup = startup_packet()
    for _ in range(pool_size):
        _, server = await loop.create_connection(lambda: Server(pool), "127.0.0.1", pg_port)
        server.transport.write(startup)
        pool.welcome = await server.login
        check_welcome(pool.welcome)
        pool.free.append(server)
    listener = await loop.create_server(lambda: Client(pool), "127.0.0.1", port, backlog=4096)
    print(f"floor pooler listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await listener.serve_forever()


def build_relay() -> Any:
    """bench/floor_relay.pyx, compiled on first use (cached under ~/.cache)."""
    try:
        pyximport = importlib.import_module("pyximport")
    except ImportError:
        raise SystemExit("floor --compiled needs Cython: pip install Cython") from None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "millpond-bench"
    pyximport.install(build_dir=str(cache), language_level=3)
    sys.path.insert(0, str(Path(__file__).parent))
    return importlib.import_module("floor_relay")


def log_in(pg_port: int) -> tuple[socket.socket, bytes]:
    """One server connection, logged in with blocking calls; what it got, to ReadyForQuery."""
    sock = socket.create_connection(("127.0.0.1", pg_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(startup_packet())
    welcome = b""
    while welcome[-6:-5] != b"Z":
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"floor: the server closed during login: {welcome!r}")
        welcome += data
    check_welcome(welcome)
    sock.setblocking(False)
    return sock, welcome


def serve_compiled(pg_port: int, port: int, pool_size: int) -> None:
    import uvloop

    relay_module = build_relay()
    logins = [log_in(pg_port) for _ in range(pool_size)]
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    relay = relay_module.Relay(listener.fileno(), logins[0][1], [s.fileno() for s, _ in logins])
    loop = uvloop.new_event_loop()
    loop.add_reader(relay.fileno, relay.on_ready)
    print(f"compiled floor pooler listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    loop.run_forever()


class LaneClient(asyncio.Protocol):
    """A client: the canned login in Python, then into the lane until it leaves."""

    def __init__(self, lane: Any, welcome: bytes) -> None:
        self.lane, self.welcome = lane, welcome

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if data == SSL_REQUEST:
            self.transport.write(b"N")
            return
        self.transport.write(self.welcome)
        self.transport.pause_reading()
        self.lane.add_client(self, self.transport.get_extra_info("socket").fileno())


def lane_ejected(
    client: LaneClient | None,
    client_unread: bytes,
    client_owed: bytes,
    server: object,
    server_unread: bytes,
    server_owed: bytes,
    outstanding: int,
    reason: str,
) -> None:
    """A client that leaves (Terminate, end of file) is closed; anything else is a bug."""
    if client is not None:
        if client_owed:
            client.transport.write(client_owed)
        if not (reason == "eof" or client_unread.startswith(TERMINATE)):
            print(f"lane floor: client out ({reason}): {client_unread[:40]!r}", file=sys.stderr)
        client.transport.close()
    if server is not None:
        print(f"lane floor: a server left the lane ({reason})", file=sys.stderr, flush=True)


def serve_lane(pg_port: int, port: int, pool_size: int) -> None:
    import uvloop

    from millpond.proxy import _lane

    logins = [log_in(pg_port) for _ in range(pool_size)]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    lane = _lane.Lane(loop, lane_ejected, b"Q", b"123TDCInstNEZ", session_check=True)
    for sock, _ in logins:
        lane.add_server(sock, sock.fileno())
    welcome = logins[0][1]
    server = loop.run_until_complete(
        loop.create_server(lambda: LaneClient(lane, welcome), "127.0.0.1", port, backlog=4096)
    )
    print(f"lane floor pooler listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    loop.run_until_complete(server.serve_forever())


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ports", help="PG_PORT:PORT")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--compiled", action="store_true", help="the data path in C")
    parser.add_argument("--lane", action="store_true", help="millpond's compiled lane")
    args = parser.parse_args()
    pg_port, port = (int(p) for p in args.ports.split(":"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        if args.compiled:
            serve_compiled(pg_port, port, args.pool_size)
        elif args.lane:
            serve_lane(pg_port, port, args.pool_size)
        else:
            uvloop.run(serve(pg_port, port, args.pool_size))


if __name__ == "__main__":
    main()
