"""Snapshots of a running proxy, and their rendering as the admin console's SHOW results.

Each ``*_rows`` function reads the proxy's objects in one synchronous pass (the event
loop cannot run in between, so the picture is consistent) and returns an immutable
snapshot: a tuple of frozen rows. The admin console renders them with :data:`TABLES`;
metrics code can read the same rows (DESIGN principle 7).

Column names, order and types are PgBouncer 1.24's: ``pktbuf_write_RowDescription`` in
``src/admin.c`` (POOLS, CLIENTS, SERVERS, DATABASES, USERS, LISTS, MEM, STATE, CONFIG,
VERSION, PEERS, PEER_POOLS, DNS_*) and ``src/stats.c`` (STATS, STATS_TOTALS,
STATS_AVERAGES, TOTALS). Type letters are PgBouncer's: ``s`` text, ``i`` int4, ``q``
int8, ``N`` numeric, ``T`` a timestamp sent as text. What millpond cannot know (slab
memory, DNS caches, prepared statement counts) is 0 or empty, as PgBouncer shows it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from millpond.pool.state import SlotState
from millpond.proxy.config import ProxySettings
from millpond.proxy.frontend import ClientState
from millpond.proxy.protocol import messages as m

if TYPE_CHECKING:
    from millpond.proxy.frontend import ClientConnection
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy

ADMIN_DB = "pgbouncer"
Value = str | int | float | None
Row = tuple[Value, ...]

_OIDS = {"s": m.TEXT_OID, "T": m.TEXT_OID, "i": 23, "q": m.INT8_OID, "N": 1700}


@dataclass(frozen=True, slots=True)
class Table:
    """A SHOW result's shape: PgBouncer's type letters and column names."""

    kinds: str
    columns: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.columns):
            raise ValueError(f"{len(self.kinds)} type letters for {len(self.columns)} columns")

    def render(self, rows: Iterable[Sequence[Value]], tag: str = "SHOW") -> bytes:
        """RowDescription, a DataRow per row, CommandComplete."""
        parts = [m.row_description(self.columns, [_OIDS[k] for k in self.kinds])]
        parts.extend(
            m.data_row([_cell(v, k) for v, k in zip(row, self.kinds, strict=True)]) for row in rows
        )
        parts.append(m.command_complete(tag))
        return b"".join(parts)


def _cell(value: Value, kind: str) -> str | int | None:
    if value is None:
        return None
    if kind == "T":
        return format_time(float(value))
    if isinstance(value, float):
        return int(value) if kind in "iqN" else format_number(value)
    return value


def format_time(epoch: float) -> str:
    """PgBouncer's timestamp text: ``2025-01-31 12:00:00 UTC`` (local time and zone)."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _t(kinds: str, *columns: str) -> Table:
    return Table(kinds, columns)


STAT_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
    "bind_count",
)  # fmt: skip
_TOTAL_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "received", "sent", "xact_time",
    "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
)  # fmt: skip
_AVG_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "recv", "sent", "xact_time",
    "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count",
)  # fmt: skip
_SOCKET = (
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
)  # fmt: skip

#: Every SHOW result millpond renders, by the name after SHOW.
TABLES: dict[str, Table] = {
    # PgBouncer's columns in PgBouncer's order, then millpond's own (clients pinned to a
    # server connection by session state); exporters read columns by name.
    "pools": _t(
        "ssiiiiiiiiiiiiissi", "database", "user", "cl_active", "cl_waiting",
        "cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active", "sv_active_cancel",
        "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait",
        "maxwait_us", "pool_mode", "load_balance_hosts", "cl_pinned",
    ),
    "clients": _t("ssssssisiTTiiississii", *_SOCKET),
    "servers": _t("ssssssisiTTiiississii", *_SOCKET),
    "databases": _t(
        "ssissiiiissiiiiii", "name", "host", "port", "database", "force_user", "pool_size",
        "min_pool_size", "reserve_pool_size", "server_lifetime", "pool_mode",
        "load_balance_hosts", "max_connections", "current_connections",
        "max_client_connections", "current_client_connections", "paused", "disabled",
    ),
    "users": _t(
        "ssssiiii", "name", "pool_size", "reserve_pool_size", "pool_mode",
        "max_user_connections", "current_connections", "max_user_client_connections",
        "current_client_connections",
    ),
    "stats": _t(
        "s" + "N" * 22, "database", *(f"total_{n}" for n in _TOTAL_NAMES),
        *(f"avg_{n}" for n in _AVG_NAMES),
    ),
    "stats_totals": _t("s" + "N" * 11, "database", *STAT_NAMES),
    "stats_averages": _t(
        "s" + "N" * 11, "database", *STAT_NAMES[:8],
        *(f"avg_{n}" for n in STAT_NAMES[8:]),
    ),
    "totals": _t("sN", "name", "value"),
    "lists": _t("si", "list", "items"),
    "mem": _t("siiii", "name", "size", "used", "free", "memtotal"),
    "state": _t("ss", "key", "value"),
    "config": _t("ssss", "key", "value", "default", "changeable"),
    "version": _t("s", "version"),
    "peers": _t("isii", "peer_id", "host", "port", "pool_size"),
    "peer_pools": _t(
        "iiiii", "peer_id", "cl_active_cancel_req", "cl_waiting_cancel_req",
        "sv_active_cancel", "sv_login",
    ),
    "dns_hosts": _t("sqs", "hostname", "ttl", "addrs"),
    "dns_zones": _t("sqi", "zonename", "serial", "count"),
}  # fmt: skip

#: Settings PgBouncer reads only at startup (``changeable`` = no; SET refuses them).
NOT_CHANGEABLE = frozenset(
    {
        "listen_addr", "listen_port", "listen_backlog", "unix_socket_dir", "unix_socket_mode",
        "unix_socket_group", "user", "so_reuseport", "pidfile", "pkt_buf", "disable_pqexec",
        "job_name", "service_name", "resolv_conf", "peer_id", "stats_listen_addr",
        "stats_listen_port",
    }
)  # fmt: skip


# --------------------------------------------------------------------------- clients


def client_state(client: ClientConnection) -> str | None:
    """PgBouncer's name for a client's place in its pool; None while logging in or gone."""
    state = client.state
    if state is ClientState.WAITING:
        return "waiting"
    if state is ClientState.ACTIVE or (client.server is not None and state is ClientState.LOGIN):
        return "active"
    if state is ClientState.IDLE:
        return "idle" if client.server is None else "active"
    return None


def _pool_key(client: ClientConnection) -> tuple[str, str] | None:
    if client.admin is not None:
        return (ADMIN_DB, ADMIN_DB)
    pool = client.pool
    return (pool.database, pool.user) if pool is not None else None


def _addr(info: Any, port: int) -> tuple[str, int]:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return "unix", port


def _tls_info(transport: Any) -> str:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else ''}"


class Clock:
    """One moment, in both clocks: monotonic (the pool core's) and wall (for display)."""

    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = time.time()

    def wall_of(self, mono: float) -> float:
        return self.wall - (self.mono - mono)


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One row of SHOW CLIENTS or SHOW SERVERS."""

    type: str
    user: str
    database: str
    state: str
    addr: str
    port: int
    local_addr: str
    local_port: int
    connect_time: float | None  # epoch seconds
    request_time: float | None
    wait: float  # seconds
    close_needed: bool
    ptr: str
    link: str
    remote_pid: int
    tls: str
    application_name: str
    id: int

    def cells(self) -> Row:
        wait_us = round(self.wait * 1_000_000)
        return (
            self.type, self.user, self.database, "none", self.state, self.addr, self.port,
            self.local_addr, self.local_port, self.connect_time, self.request_time,
            wait_us // 1_000_000, wait_us % 1_000_000, int(self.close_needed), self.ptr,
            self.link, self.remote_pid, self.tls, self.application_name, 0, self.id,
        )  # fmt: skip


def _client_wait(client: ClientConnection, clock: Clock) -> float:
    handle = getattr(client, "_wait", None)
    if client.state is not ClientState.WAITING or handle is None:
        return 0.0
    return max(0.0, clock.mono - float(getattr(handle, "since", clock.mono)))


def _client_row(client: ClientConnection, state: str, port: int, clock: Clock) -> SocketRow:
    transport, server = client.transport, client.server
    local = transport.get_extra_info("sockname") if transport is not None else None
    connected = getattr(client, "connect_time", None)  # monotonic, once frontend keeps it
    requested = getattr(client, "request_time", None)
    return SocketRow(
        "C", client.user, client.database, state, *_addr(client.addr, port), *_addr(local, port),
        None if connected is None else clock.wall_of(float(connected)),
        None if requested is None else clock.wall_of(float(requested)),
        _client_wait(client, clock), False, hex(id(client)),
        hex(id(server)) if server is not None else "", 0, _tls_info(transport),
        client.params.get("application_name", ""), client.pid,
    )  # fmt: skip


_STATE_ORDER = {"active": 0, "idle": 0, "waiting": 1}


def client_rows(proxy: Proxy, clock: Clock | None = None) -> tuple[SocketRow, ...]:
    """SHOW CLIENTS: every logged-in client, by pool, active before waiting."""
    clock = clock or Clock()
    port = proxy.config.settings.listen_port
    found = []
    for client in proxy.clients:
        state, key = client_state(client), _pool_key(client)
        if state is not None and key is not None:
            found.append((key, _STATE_ORDER[state], client.pid, client, state))
    found.sort(key=lambda item: item[:3])
    return tuple(_client_row(client, state, port, clock) for *_, client, state in found)


# --------------------------------------------------------------------------- servers


def server_state(
    pool: ServerPool, slot: Any, pending: frozenset[int], check_delay: float | None, now: float
) -> str | None:
    """PgBouncer's name for a server connection's state; None when it is on its way out."""
    state = slot.state
    if state is SlotState.IN_USE:
        return "being_canceled" if id(slot.conn) in pending else "active"
    if state is SlotState.IDLE:
        used = check_delay is not None and now - slot.idle_since > check_delay
        return "used" if used else "idle"
    if state is SlotState.CHECKING or state is SlotState.RESETTING:
        return "tested"
    if state is SlotState.CONNECTING:
        return "new"
    return None


def _check_delay(proxy: Proxy) -> float | None:
    s = proxy.config.settings
    return s.server_check_delay if s.server_check_query else None


def _pending_release(proxy: Proxy) -> frozenset[int]:
    return frozenset(getattr(proxy, "_pending_release", {}))


def _slots(pool: ServerPool) -> list[Any]:
    return list(pool._core.slots.values())


def _server_row(pool: ServerPool, slot: Any, state: str, clock: Clock) -> SocketRow:
    conn, target = slot.conn, pool.server_driver.target
    transport = getattr(conn, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    client = getattr(conn, "client", None)
    pid = int(getattr(conn, "backend_pid", 0) or 0)
    return SocketRow(
        "S", target.user, pool.database, state, _addr(peer, target.port)[0], target.port,
        *_addr(local, 0), clock.wall_of(slot.created_at),
        clock.wall_of(slot.acquired_at or slot.created_at), 0.0, slot.retire is not None,
        hex(id(conn if conn is not None else slot)),
        hex(id(client)) if client is not None else "", pid, _tls_info(transport),
        client.params.get("application_name", "") if client is not None else "", pid,
    )  # fmt: skip


_SERVER_ORDER = ("active", "idle", "used", "tested", "new", "being_canceled")


def server_rows(proxy: Proxy, clock: Clock | None = None) -> tuple[SocketRow, ...]:
    """SHOW SERVERS: every server connection, by pool and PgBouncer's list order."""
    clock = clock or Clock()
    pending, delay = _pending_release(proxy), _check_delay(proxy)
    rows: list[SocketRow] = []
    for _key, pool in sorted(proxy.pools.items()):
        found = []
        for slot in _slots(pool):
            state = server_state(pool, slot, pending, delay, clock.mono)
            if state is not None:
                found.append((_SERVER_ORDER.index(state), slot.id, slot, state))
        found.sort(key=lambda item: item[:2])
        rows.extend(_server_row(pool, slot, state, clock) for *_, slot, state in found)
    return tuple(rows)


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True, slots=True)
class PoolRow:
    """One row of SHOW POOLS."""

    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_active_cancel: int
    sv_being_canceled: int
    sv_idle: int
    sv_used: int
    sv_tested: int
    sv_login: int
    maxwait: float  # seconds the oldest waiting client has waited
    pool_mode: str
    load_balance_hosts: str | None
    paused: bool
    cl_pinned: int = 0

    def cells(self) -> Row:
        wait_us = int(self.maxwait * 1_000_000)
        return (
            self.database, self.user, self.cl_active, self.cl_waiting, 0, 0, self.sv_active,
            self.sv_active_cancel, self.sv_being_canceled, self.sv_idle, self.sv_used,
            self.sv_tested, self.sv_login, wait_us // 1_000_000, wait_us % 1_000_000,
            self.pool_mode, self.load_balance_hosts, self.cl_pinned,
        )  # fmt: skip


def _client_counts(proxy: Proxy) -> dict[tuple[str, str], list[int]]:
    counts: dict[tuple[str, str], list[int]] = {}
    for client in proxy.clients:
        state, key = client_state(client), _pool_key(client)
        if state is not None and key is not None:
            counts.setdefault(key, [0, 0])[state == "waiting"] += 1
    return counts


def _oldest_wait(pool: ServerPool, now: float) -> float:
    for waiter in pool._core.waiters:
        if waiter.queued and not waiter.future.done():
            return max(0.0, now - waiter.since)
    return 0.0


def _load_balance(proxy: Proxy, database: str) -> str | None:
    db = proxy.config.database(database)
    return db.load_balance_hosts if db is not None and len(db.hosts) > 1 else None


def _pool_row(proxy: Proxy, pool: ServerPool, clients: list[int], now: float) -> PoolRow:
    pending, delay = _pending_release(proxy), _check_delay(proxy)
    states = [server_state(pool, slot, pending, delay, now) for slot in _slots(pool)]
    cancels = sum(int(getattr(slot.conn, "cancels", 0) or 0) for slot in _slots(pool))
    return PoolRow(
        pool.database, pool.user, clients[0], clients[1], states.count("active"), cancels,
        states.count("being_canceled"), states.count("idle"), states.count("used"),
        states.count("tested"), states.count("new"), _oldest_wait(pool, now), pool.mode,
        _load_balance(proxy, pool.database), pool.paused, pool.counters.pinned,
    )  # fmt: skip


def pool_rows(proxy: Proxy, clock: Clock | None = None) -> tuple[PoolRow, ...]:
    """SHOW POOLS: one row per (database, user), the admin console's own pool included."""
    now = (clock or Clock()).mono
    counts = _client_counts(proxy)
    admin = counts.get((ADMIN_DB, ADMIN_DB), [0, 0])
    rows = [PoolRow(ADMIN_DB, ADMIN_DB, admin[0], admin[1], 0, 0, 0, 0, 0, 0, 0, 0.0,
                    "statement", None, False)]  # fmt: skip
    for key, pool in proxy.pools.items():
        rows.append(_pool_row(proxy, pool, counts.get(key, [0, 0]), now))
    return tuple(sorted(rows, key=lambda row: (row.database, row.user)))


# --------------------------------------------------------------------------- databases, users


def _live_servers(pool: ServerPool) -> int:
    return sum(1 for slot in _slots(pool) if slot.state not in _GONE)


_GONE = frozenset({SlotState.CLOSING, SlotState.BROKEN, SlotState.CLOSED})


def database_names(proxy: Proxy) -> list[str]:
    """Configured databases, those the ``*`` fallback created pools for, and the console."""
    names = {name for name in proxy.config.databases if name != "*"}
    names.update(pool.database for pool in proxy.pools.values())
    names.add(ADMIN_DB)
    return sorted(names)


def _servers_by(proxy: Proxy, attr: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for pool in proxy.pools.values():
        counts[getattr(pool, attr)] += _live_servers(pool)
    return counts


def _clients_by(proxy: Proxy, attr: str) -> Counter[str]:
    return Counter(getattr(c, attr) for c in proxy.clients if client_state(c) is not None)


def database_rows(
    proxy: Proxy, paused: Iterable[str] = (), disabled: Iterable[str] = ()
) -> tuple[Row, ...]:
    """SHOW DATABASES (``paused``: the databases paused one by one, as PAUSE db does;
    ``disabled``: those DISABLE refuses new clients for)."""
    s, paused, disabled = proxy.config.settings, set(paused), set(disabled)
    servers, clients = _servers_by(proxy, "database"), _clients_by(proxy, "database")
    rows: list[Row] = []
    for name in database_names(proxy):
        db = proxy.config.database(name)
        if name == ADMIN_DB:
            rows.append((name, None, s.listen_port, name, name, 2, 0, 0, s.server_lifetime,
                         "statement", None, 0, 0, 0, clients[name], 0, 0))  # fmt: skip
        elif db is not None:
            rows.append((
                name, db.host, db.port, db.dbname or name, db.user,
                _pick(db.pool_size, s.default_pool_size), _pick(db.min_pool_size, s.min_pool_size),
                _pick(db.reserve_pool_size, s.reserve_pool_size),
                _pick(db.server_lifetime, s.server_lifetime), db.pool_mode,
                _load_balance(proxy, name), _pick(db.max_db_connections, s.max_db_connections),
                servers[name], _pick(db.max_db_client_connections, s.max_db_client_connections),
                clients[name], int(name in paused), int(name in disabled),
            ))  # fmt: skip
    return tuple(rows)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _size(value: int | None) -> str:
    return "" if value is None else f"{value:9d}"  # PgBouncer's "%9d"


def user_rows(proxy: Proxy) -> tuple[Row, ...]:
    """SHOW USERS: users of [users], the auth file, live pools, and the console's own."""
    config, s = proxy.config, proxy.config.settings
    names = set(config.users) | {ADMIN_DB} | {pool.user for pool in proxy.pools.values()}
    names.update(config.auth.entries if config.auth is not None else ())
    servers, clients = _servers_by(proxy, "user"), _clients_by(proxy, "user")
    rows: list[Row] = []
    for name in sorted(names):
        entry = config.users.get(name)

        def own(setting: str, entry: Any = entry) -> Any:
            return getattr(entry, setting) if entry is not None else None

        rows.append((
            name, _size(own("pool_size")), _size(own("reserve_pool_size")), own("pool_mode"),
            _pick(own("max_user_connections"), s.max_user_connections), servers[name],
            _pick(own("max_user_client_connections"), s.max_user_client_connections),
            clients[name],
        ))  # fmt: skip
    return tuple(rows)


# --------------------------------------------------------------------------- config, lists


def setting_text(value: object) -> str:
    """A setting as SHOW CONFIG prints it (booleans 0/1, lists comma-separated)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def config_rows(settings: ProxySettings) -> tuple[Row, ...]:
    """SHOW CONFIG: every [pgbouncer] setting, by name."""
    rows = []
    for f in sorted(fields(ProxySettings), key=lambda f: f.name):
        changeable = "no" if f.name in NOT_CHANGEABLE else "yes"
        rows.append((f.name, setting_text(getattr(settings, f.name)),
                     setting_text(f.default), changeable))  # fmt: skip
    return tuple(rows)


def list_rows(proxy: Proxy) -> tuple[Row, ...]:
    """SHOW LISTS: counts of the proxy's objects (pools and caches PgBouncer has: 0)."""
    login = sum(1 for c in proxy.clients if client_state(c) is None and c.state in _LOGGING_IN)
    servers = sum(_live_servers(pool) for pool in proxy.pools.values())
    return (
        ("databases", len(database_names(proxy))), ("users", len(user_rows(proxy))),
        ("peers", len(proxy.config.peers)), ("pools", len(proxy.pools) + 1),
        ("peer_pools", 0), ("free_clients", 0), ("used_clients", len(proxy.clients)),
        ("login_clients", login), ("free_servers", 0), ("used_servers", servers),
        ("dns_names", 0), ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0),
    )  # fmt: skip


_LOGGING_IN = frozenset({ClientState.STARTUP, ClientState.AUTH, ClientState.LOGIN})
