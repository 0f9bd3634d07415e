"""Memory per idle client connection: millpond proxy and PgBouncer, side by side.

Run:  python bench/proxy_memory.py [--quick] [--connections N] [--only TARGET[,TARGET]]
                                   [--json PATH]

Starts a throwaway PostgreSQL, then, one pooler at a time (PgBouncer, then millpond
proxy, both from the same generated pgbouncer.ini, pool_mode = transaction), logs one
client in and reads the pooler's resident memory (VmRSS in /proc/PID/status), logs in
N more clients (default 10,000: startup packet, trust auth, up to ReadyForQuery) and
leaves them idle, reads VmRSS again, checks that a query still goes through while they
are held, and reports (after - before) / N in KB per connection. The clients are
minimal asyncio Protocols on uvloop in this one process, so they cost the pooler
nothing but their sockets. See docs/proxy-benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import machine, run_uvloop, table, verdict
from millpond.embedded import PostgresCluster
from proxy_bench import (
    DBNAME,
    USER,
    Proxy,
    find_pgbouncer,
    free_port,
    handle_sigterm,
    millpond_proxy,
    pgbouncer_proxy,
    raise_nofile_limit,
    service_account,
    work_dir,
    write_ini,
)

TARGETS = ("pgbouncer", "millpond")
KB_TARGET = 10.0  # issue 3: under 10 KB per idle client connection
POOL_SIZE = 20
HANDSHAKES_IN_FLIGHT = 100  # PgBouncer's listen_backlog is 128
LOGIN_TIMEOUT = 120.0


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608)  # protocol 3.0
    body += f"user\0{user}\0database\0{database}\0application_name\0memtest\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


STARTUP = startup_packet(USER, DBNAME)
QUERY = b"Q" + struct.pack("!i", 4 + len(b"SELECT 1\0")) + b"SELECT 1\0"
TERMINATE = b"X\0\0\0\4"


class Client(asyncio.Protocol):
    """One client connection: sends the startup packet, waits for ReadyForQuery, idles."""

    __slots__ = ("buf", "transport", "waiter")

    def __init__(self, waiter: asyncio.Future[None]) -> None:
        self.waiter: asyncio.Future[None] | None = waiter
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(STARTUP)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            return  # idle: nothing is expected
        buf = self.buf + data
        while len(buf) >= 5:
            kind, length = buf[0], int.from_bytes(buf[1:5], "big")
            if len(buf) < 1 + length:
                break
            if kind == ord("E"):
                self._done(ConnectionError(_error_text(buf[5 : 1 + length])))
                return
            buf = buf[1 + length :]
            if kind == ord("Z"):
                self._done(None)
                return
        self.buf = buf

    def query(self, sql_message: bytes) -> asyncio.Future[None]:
        """Send one message and return a future set at the next ReadyForQuery."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(sql_message)
        return self.waiter

    def _done(self, error: Exception | None) -> None:
        waiter, self.waiter, self.buf = self.waiter, None, b""
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._done(ConnectionError(f"closed by the proxy ({exc})"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(TERMINATE)
            self.transport.close()


def _error_text(payload: bytes) -> str:
    fields = {f[:1].decode(): f[1:].decode(errors="replace") for f in payload.split(b"\0") if f}
    return f"{fields.get('C', '?')} {fields.get('M', '?')}"


async def login(port: int, timeout: float = 30.0) -> Client:
    """One client, logged in (ReadyForQuery received) within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    _, client = await loop.create_connection(lambda: Client(waiter), "127.0.0.1", port)
    try:
        await asyncio.wait_for(waiter, timeout)
    except BaseException:
        client.close()
        raise
    return client


async def login_many(port: int, count: int) -> tuple[list[Client], list[str]]:
    """Log ``count`` clients in, at most HANDSHAKES_IN_FLIGHT at a time."""
    clients: list[Client] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)

    async def one() -> None:
        async with gate:
            try:
                clients.append(await login(port))
            except (OSError, ConnectionError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    async with asyncio.timeout(LOGIN_TIMEOUT), asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(one())
    return clients, errors


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """``field`` (VmRSS, or VmHWM: the peak) of ``pid`` and its child processes, in KB."""
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


async def measure(proxy: Proxy, count: int, settle: float) -> dict[str, Any]:
    """Hold ``count`` idle clients on ``proxy`` and measure its RSS before and after."""
    first = await login(proxy.port)  # the pool and its server parameters exist now
    await asyncio.sleep(settle)
    before = rss_kb(proxy.pid)
    started = time.perf_counter()
    clients, errors = await login_many(proxy.port, count)
    login_seconds = time.perf_counter() - started
    await asyncio.sleep(settle)
    after, peak = rss_kb(proxy.pid), rss_kb(proxy.pid, "VmHWM")
    query_ok = "yes"
    try:
        await asyncio.wait_for(first.query(QUERY), 10)
        if clients:
            await asyncio.wait_for(clients[-1].query(QUERY), 10)
    except (TimeoutError, ConnectionError) as exc:
        query_ok = f"no: {exc}"
    held = sum(1 for c in clients if c.transport is not None and not c.transport.is_closing())
    for client in [first, *clients]:
        client.close()
    await asyncio.sleep(0.2)
    return {
        "target": proxy.name,
        "wanted": count,
        "held": held,
        "login_errors": len(errors),
        "first_error": errors[0] if errors else "",
        "logins_per_s": len(clients) / login_seconds if login_seconds else float("nan"),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "rss_peak_kb": peak,
        "kb_per_conn": (after - before) / held if held else float("nan"),
        "query_while_held": query_ok,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter settling pauses")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--only", help="targets, comma-separated: " + ",".join(TARGETS))
    parser.add_argument("--json", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.targets = [t for t in TARGETS if not args.only or t in args.only.split(",")]
    if not args.targets:
        parser.error(f"--only takes some of {', '.join(TARGETS)}")
    args.settle = 0.5 if args.quick else 2.0
    return args


def report(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    headers = ["target", "held", "RSS before", "RSS after", "peak", "KB/conn", "target", "verdict"]
    headers += ["logins/s", "query ok", "note"]
    body = []
    for r in results:
        if "error" in r:
            body.append([r["target"], "-", "-", "-", "-", "-", f"< {KB_TARGET:g}", "n/a", "-", "-"])
            body[-1].append(r["error"])
            continue
        note = f"{r['login_errors']} logins failed: {r['first_error']}" if r["login_errors"] else ""
        good = verdict(r["kb_per_conn"], KB_TARGET, higher_is_better=False)
        body.append(
            [
                r["target"],
                f"{r['held']:,}",
                f"{r['rss_before_kb'] / 1024:.1f} MB",
                f"{r['rss_after_kb'] / 1024:.1f} MB",
                f"{r['rss_peak_kb'] / 1024:.1f} MB",
                f"{r['kb_per_conn']:.2f}",
                f"< {KB_TARGET:g}",
                good if r["target"] == "millpond" else "",
                f"{r['logins_per_s']:,.0f}",
                r["query_while_held"],
                note,
            ]
        )
    head = (
        f"date: {info['date']}; {info['cpus']} CPUs; {info['platform']}; "
        f"Python {info['python']}\nPostgreSQL {info['postgresql']}; {info['pgbouncer']}; "
        f"millpond {info['packages'].get('millpond')}; {info['connections']:,} idle clients, "
        f"pool_mode=transaction, default_pool_size={POOL_SIZE}"
    )
    return head + "\n\n" + table(headers, body)


async def run_target(proxy: Proxy, count: int, settle: float) -> dict[str, Any]:
    try:
        return await measure(proxy, count, settle)
    except (OSError, ConnectionError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}; proxy log: {proxy.log_tail(lines=2)}"
        return {"target": proxy.name, "error": error}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handle_sigterm()
    nofile = raise_nofile_limit()
    if nofile < args.connections + 200:
        print(
            f"RLIMIT_NOFILE is {nofile} even raised to the hard limit: too low for "
            f"{args.connections:,} connections (+200); raise `ulimit -Hn` (as root) or "
            "pass a smaller --connections",
            file=sys.stderr,
        )
        return 2
    try:
        with contextlib.ExitStack() as stack:
            return _run(args, stack)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaned up", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    pgbouncer, pgbouncer_version = None, "PgBouncer not run"
    if "pgbouncer" in args.targets:
        pgbouncer, pgbouncer_version = find_pgbouncer()
    print("starting PostgreSQL ...", file=sys.stderr)
    pg = stack.enter_context(PostgresCluster(max_connections=100))
    pg.create_database(DBNAME)
    scratch = stack.enter_context(work_dir("millpond-proxymem-"))
    max_client_conn = args.connections + 100
    results = []
    for name in args.targets:
        if name == "pgbouncer" and pgbouncer is None:
            results.append({"target": name, "error": pgbouncer_version})
            continue
        port = free_port()
        ini = write_ini(
            scratch,
            f"{name}.ini",
            listen_port=port,
            pg_port=pg.port,
            pool_size=POOL_SIZE,
            max_client_conn=max_client_conn,
        )
        if name == "pgbouncer":
            assert pgbouncer is not None
            proxy = pgbouncer_proxy(pgbouncer, ini, port, service_account())
        else:
            proxy = millpond_proxy(ini, port, pg.port, POOL_SIZE, max_client_conn)
        with proxy:
            if not proxy.start():
                results.append({"target": name, "error": f"not available ({proxy.error})"})
                continue
            print(f"{name}: logging in {args.connections:,} clients ...", file=sys.stderr)
            measure_it = functools.partial(run_target, proxy, args.connections, args.settle)
            results.append(run_uvloop(measure_it))
            if not proxy.alive():
                results[-1]["died"] = proxy.log_tail()
    info = machine(["millpond", "uvloop"])
    info.update(
        postgresql=pg.psql("SHOW server_version").strip(),
        pgbouncer=pgbouncer_version,
        connections=args.connections,
    )
    print(report(results, info))
    if args.json:
        payload = {"machine": info, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
