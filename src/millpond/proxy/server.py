"""The proxy process: listeners, the pool registry, logins, cancels and shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from dataclasses import dataclass
from time import monotonic
from typing import Any, cast

from millpond.errors import ConfigError, DatabaseUnavailable
from millpond.pool.janitor import Janitor
from millpond.pool.state import Slot
from millpond.proxy import door as door_module
from millpond.proxy import login, tcp
from millpond.proxy.auth import error_no_such_user
from millpond.proxy.backend import TRACKED_PARAMS, ServerDriver
from millpond.proxy.config import (
    DatabaseEntry,
    ProxyConfig,
    ProxySettings,
    UserEntry,
    load_config,
)
from millpond.proxy.frontend import ClientConnection, ClientState
from millpond.proxy.lane import AVAILABLE as LANE_BUILT
from millpond.proxy.lane import PoolLane, due
from millpond.proxy.limits import Budget, Budgets
from millpond.proxy.pools import (
    DirectWaiter,
    ServerPool,
    pool_mode,
    pool_settings,
    server_target,
)
from millpond.proxy.prepared import Registry
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.codec import CancelRequest, StartupMessage
from millpond.proxy.tls import client_context, negotiate_client_tls, tls_required

log = logging.getLogger("millpond.proxy")

ADMIN_DB = "pgbouncer"


@dataclass(slots=True)
class LoginStats:
    logins: int = 0
    login_failures: int = 0


class Proxy:
    """One running ``millpond proxy``."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.pools: dict[tuple[str, str], ServerPool] = {}
        self.clients: set[ClientConnection] = set()
        self.by_key: dict[tuple[int, bytes], ClientConnection] = {}
        #: clients that asked for a server while their pool was paused, in arrival order
        #: (a dict: parking, leaving and resuming 10,000 of them stay O(1) each)
        self.parked: dict[ClientConnection, None] = {}
        self.janitor = Janitor("proxy", self._sweep, 0.5)
        self.login_stats = LoginStats()
        self.servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []
        self.paused = False
        self.paused_databases: set[str] = set()
        self.disabled_databases: set[str] = set()  # DISABLE: no new client logins
        #: per user, the keys of its last SCRAM login against a stored SCRAM secret: the
        #: server login as that user when the proxy holds no password (pass-through)
        self.scram_keys: dict[str, tuple[bytes, bytes]] = {}
        self.stats_server: Any = None
        self.stats_logger: Any = None
        self.budgets = Budgets()  # max_db_connections / max_user_connections
        self.registry = Registry()  # server-side names of prepared statements
        self.looked_up: dict[str, str] = {}  # secrets found by auth_query, by user
        self._pending_release: dict[int, tuple[ServerPool, Slot]] = {}
        self._stopped = asyncio.Event()
        self._shutdown_now = asyncio.Event()
        self._shutdown_task: asyncio.Task[Any] | None = None
        self.shutting_down: str | None = None
        self.client_tls = client_context(config.settings)
        #: the listening sockets' compiled acceptor, when logins may be answered in C
        self.door: door_module.ProxyDoor | None = None

    # -- listening ------------------------------------------------------------------

    async def start(self) -> None:
        from millpond.proxy.admin_actions import start_stats

        self.janitor.start()
        start_stats(self)
        loop = asyncio.get_running_loop()
        s = self.config.settings
        if door_module.wanted(s, self.client_tls):
            self.door = door_module.ProxyDoor(self)
            self.door.set_limit(s.max_client_conn, 0)
        hosts = [h for h in s.listen_addr if h]
        for host in hosts:
            bind = None if host == "*" else host
            if self.door is not None:
                listening = self.door.listen_tcp(
                    bind, s.listen_port, s.listen_backlog, s.so_reuseport
                )
                self.servers.append(cast(asyncio.AbstractServer, listening))
                for sock in listening.sockets:
                    self.addresses.append("{}:{}".format(*sock.getsockname()[:2]))
                continue
            server = await loop.create_server(
                lambda: ClientConnection(self),
                bind,
                s.listen_port,
                backlog=s.listen_backlog,
                reuse_address=True,
                reuse_port=s.so_reuseport or None,
            )
            self.servers.append(server)
            for sock in getattr(server, "sockets", ()):
                self.addresses.append("{}:{}".format(*sock.getsockname()[:2]))
        self._tune_listeners(s)
        if s.unix_socket_dir:
            path = _stale_socket_removed(s.unix_socket_dir, s.listen_port)
            unix: asyncio.AbstractServer
            if self.door is not None:
                unix = cast(asyncio.AbstractServer, self.door.listen_unix(path, s.listen_backlog))
            else:
                unix = await loop.create_unix_server(
                    lambda: ClientConnection(self), path, backlog=s.listen_backlog
                )
            os.chmod(path, s.unix_socket_mode)
            self.servers.append(unix)
            self.addresses.append(path)
        _write_pidfile(s.pidfile)
        from millpond.observe import start_stats_logger, start_stats_server

        self.stats_server = await start_stats_server(self)  # /metrics, /healthz, dashboard
        self.stats_logger = start_stats_logger(self)  # PgBouncer's log_stats / stats_period

    def _tune_listeners(self, s: ProxySettings) -> None:
        """PgBouncer's tcp_* settings on the listening TCP sockets (at start and RELOAD):
        the connections they accept from then on inherit them (millpond.proxy.tcp)."""
        for server in self.servers:
            for sock in getattr(server, "sockets", ()):
                tcp.tune_listener(sock, s)

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with listen_port = 0)."""
        for server in self.servers:
            for sock in getattr(server, "sockets", ()):
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        return self.config.settings.listen_port

    def install_signal_handlers(self) -> None:
        """PgBouncer's signals: HUP reload, INT safe shutdown, TERM super-safe, QUIT now."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGINT, self._start_shutdown, "safe")
        loop.add_signal_handler(signal.SIGTERM, self._start_shutdown, "super-safe")
        loop.add_signal_handler(signal.SIGQUIT, self._start_shutdown, "immediate")

    def start_shutdown(self, mode: str) -> None:
        """Begin a shutdown in the background (signals, the admin SHUTDOWN)."""
        self._start_shutdown(mode)

    def _start_shutdown(self, mode: str) -> None:
        if self.shutting_down is not None:
            mode = "immediate"  # a second signal means: now
        log.warning("%s shutdown requested", mode)
        self.shutting_down = mode
        if mode == "immediate":
            self._shutdown_now.set()
        if self._shutdown_task is None:
            self._shutdown_task = self.janitor.spawn(self.shutdown(mode), "shutdown")

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    def _busy(self, mode: str) -> bool:
        if mode == "super-safe":
            return any(c.admin is None for c in self.clients)
        return any(c.state is ClientState.ACTIVE for c in self.clients)

    async def shutdown(self, mode: str = "safe", *, timeout: float | None = None) -> None:
        """Stop listening, wait as the mode says, then close everything.

        "safe" (SIGINT, SHUTDOWN): wait until every server connection is released;
        "super-safe" (SIGTERM): wait until every client has disconnected;
        "immediate" (SIGQUIT, or a second signal): close at once.
        """
        self.shutting_down = mode
        self.release_kept()
        self.leave_lanes()
        if self.door is not None:
            self.door.close()  # guests still logging in go; those in lanes came out above
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = float("inf") if timeout is None else loop.time() + timeout
        while self._busy(mode) and loop.time() < deadline:  # a brief poll, only while stopping
            if mode == "immediate" or self._shutdown_now.is_set():
                break
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.fail("08P01", "pooler is shutting down")
        await asyncio.gather(*(pool.close(timeout=2) for pool in self.pools.values()))
        _remove_pidfile(self.config.settings.pidfile)
        self._stopped.set()
        await self.janitor.stop()
        if self.stats_logger is not None:
            await self.stats_logger.stop()
        if self.stats_server is not None:  # readable until the very end of a drain
            await self.stats_server.close()

    def release_kept(self) -> None:
        """Kept servers (server affinity) back to their pools, so that every pool's
        state is what it would be without affinity: for SHOW, metrics, pause, shutdown."""
        for pool in self.pools.values():
            pool.release_kept()
            if pool.lane is not None:
                pool.lane.fold()  # its counters, for SHOW STATS and the metrics
        if self.door is not None:
            self.door.fold()  # the logins it welcomed

    def leave_lanes(self) -> None:
        """Every client and server out of the compiled lanes (admin commands, pause,
        shutdown): the Python path's state is then the whole truth."""
        for pool in self.pools.values():
            if pool.lane is not None:
                pool.lane.close()

    def _sweep(self) -> None:
        """PgBouncer's timeouts and the reserve pool, checked twice a second."""
        self.release_kept()  # affinity lasts half a second at most: timeouts see the rest
        now = monotonic()
        s = self.config.settings
        if self.door is not None:
            self.door.sweep(s, now)
        for pool in self.pools.values():
            if pool.lane is not None:
                pool.lane.sweep(now)
            if pool._core.waiters:
                pool.use_reserve(now)
            else:
                pool.drop_reserve()
        for client in list(self.clients):
            side = client.lane_side
            if side is not None:  # the lane's clocks say whether a timeout may be due
                assert client.pool is not None
                if not due(side, s, client.pool, now):
                    continue
                client.leave_lane()  # then the Python path's checks decide
            if client._wait is not None and client.pool is not None:
                limit = client.pool.config.acquire_timeout  # query_wait_timeout
                if now - client._wait.since > limit:
                    client.wait_expired()
                    continue
            reason = _timed_out(client, s, now)
            if reason is not None:
                log.info("closing %r: %s", client, reason)
                client.fail("08P01", reason)

    # -- clients ----------------------------------------------------------------------

    def client_opened(self, client: ClientConnection) -> None:
        self.clients.add(client)
        if self.door is not None:
            self.door.set_limit(self.config.settings.max_client_conn, len(self.clients))

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if self.door is not None:
            self.door.set_limit(self.config.settings.max_client_conn, len(self.clients))
        self.by_key.pop((client.pid, client.key), None)
        self.parked.pop(client, None)
        if self.config.settings.log_disconnections and client.user:
            log.info("closing: %s@%s from %s", client.user, client.database, client.addr)

    def login(self, client: ClientConnection, packet: StartupMessage) -> None:
        s = self.config.settings
        client.user, client.database = packet.user, packet.database
        if not client.tls and tls_required(s):
            client.fail("08P01", "SSL required")
            return
        guests = self.door.guests if self.door is not None else 0  # clients in C
        if s.max_client_conn and len(self.clients) + guests > s.max_client_conn:
            client.fail("08P01", "no more connections allowed (max_client_conn)")
            return
        tracked = _tracked(s.track_extra_parameters)
        for name, value in packet.params.items():
            if name in ("user", "database") or name in s.ignore_startup_parameters:
                continue
            if name not in tracked:
                client.fail("08P01", f"unsupported startup parameter: {name}")
                return
            client.params[name] = value
        if s.application_name_add_host and isinstance(client.addr, tuple):
            base = client.params.get("application_name", "")
            client.params["application_name"] = f"{base} - {client.addr[0]}({client.addr[1]})"
        target = login.auth_query_target(self.config, client)
        if target is None:
            client.start_auth(login.for_client(self.config, client))
        else:
            client.state = ClientState.AUTH
            self.janitor.spawn(self._auth_query(client, *target), f"auth-query-{client.user}")

    async def _auth_query(self, client: ClientConnection, database: str, auth_user: str) -> None:
        """Fetch the user's secret with auth_query, as auth_user, then authenticate."""
        db = self.config.database(client.database)
        query = (db.auth_query if db is not None else None) or self.config.settings.auth_query
        try:
            pool = self.pool_for(database, auth_user)
            async with pool.acquire() as server:
                rows = await server.fetch(query, client.user)
        except Exception as exc:
            log.error("auth_query for %r failed: %s", client.user, exc)
            client.fail("08P01", "bouncer config error")
            return
        if not rows or rows[0][1] is None:
            client.transport_write(error_no_such_user())
            client.close()
            return
        secret = rows[0][1].decode()
        self.looked_up[client.user] = secret
        if client.state is ClientState.AUTH:
            client.start_auth(login.for_client(self.config, client, looked_up=secret))

    def authenticated(self, client: ClientConnection) -> None:
        self.login_stats.logins += 1
        self.by_key[(client.pid, client.key)] = client
        if self.config.settings.log_connections:
            log.info("login: %s@%s from %s", client.user, client.database, client.addr)
        if client.database == ADMIN_DB:
            from millpond.proxy.admin import AdminSession

            session = AdminSession(self, client)
            if session.role is None:
                return  # refused: the session already sent PgBouncer's error
            client.admin = session
            client.state = ClientState.LOGIN
            client.welcome(dict(_ADMIN_PARAMS))
            return
        if self.config.database(client.database) is None:
            # PgBouncer says so only after a successful login, revealing nothing before.
            client.fail("08P01", f"no such database: {client.database}")
            return
        if client.database in self.disabled_databases:
            client.fail("08P01", f'database "{client.database}" is disabled')
            return
        pool = self.pool_for(client.database, client.user)
        client.pool = pool
        client.state = ClientState.LOGIN
        welcome = pool.server_driver.welcome
        if welcome is not None:
            client.welcome(welcome)
            return
        slot = pool.take()
        if slot is not None:
            self._welcome_with(client, pool, slot)
        else:
            handle = pool.wait(
                DirectWaiter(
                    lambda slot: self._welcome_with(client, pool, slot),
                    lambda exc: client.fail("08P01", f"could not connect to server: {exc}"),
                )
            )
            if client.state is ClientState.LOGIN:
                client._wait = handle

    def _welcome_with(self, client: ClientConnection, pool: ServerPool, slot: Slot) -> None:
        client._wait = None
        params = dict(slot.conn.params)
        pool.give(slot)
        if client.state is ClientState.LOGIN:
            client.welcome(params)

    def stats_login_failed(self, client: ClientConnection) -> None:
        self.login_stats.login_failures += 1
        if self.config.settings.log_pooler_errors:
            log.warning("login failed: %s@%s from %s", client.user, client.database, client.addr)

    def park(self, client: ClientConnection) -> None:
        self.parked.setdefault(client, None)

    def negotiate_tls(self, client: ClientConnection, ssl: bool) -> None:
        negotiate_client_tls(self, client, ssl)

    # -- pools ------------------------------------------------------------------------

    def pool_for(self, database: str, user: str) -> ServerPool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is not None:
            return pool
        config = self.config
        db = config.database(database)
        if db is None:
            raise DatabaseUnavailable(f"no such database: {database}")
        user_entry = config.users.get(user)
        secret = self._server_secret(db, user)
        mode = pool_mode(config, db, user_entry)
        s = config.settings
        driver = ServerDriver(
            server_target(config, db, user, secret),
            reset_query=s.server_reset_query,
            check_query=s.server_check_query,
            reset_always=mode == "session" or s.server_reset_query_always,
            budgets=self._budgets_for(db, database, user),
        )
        if not db.user or db.user == user:  # the server login is the client's own user
            driver.scram_keys = lambda: self.scram_keys.get(user)
        pool = ServerPool(
            database=database,
            user=user,
            mode=mode,
            driver=driver,
            **pool_settings(config, db, user_entry),
        )
        pool.paused = self.paused or database in self.paused_databases
        _set_policies(pool, db, s, self)
        pool.reserve = _reserve_size(db, user_entry, s.reserve_pool_size)
        pool.reserve_timeout = s.reserve_pool_timeout
        pool.start()
        self.pools[key] = pool
        return pool

    def _budgets_for(self, db: DatabaseEntry, database: str, user: str) -> tuple[Budget, ...]:
        s = self.config.settings
        entry = self.config.users.get(user)
        db_limit = (
            db.max_db_connections if db.max_db_connections is not None else s.max_db_connections
        )
        user_limit = s.max_user_connections
        if entry is not None and entry.max_user_connections is not None:
            user_limit = entry.max_user_connections
        return self.budgets.for_pool(database, db_limit, db.user or user, user_limit)

    def _server_secret(self, db: DatabaseEntry, user: str) -> str | None:
        """The auth file's secret for the server login (used when the entry has none)."""
        auth = self.config.auth
        entry = auth.get(db.user or user) if auth is not None else None
        if entry is not None:
            return entry.secret
        return self.looked_up.get(db.user or user)

    # -- cancel requests ------------------------------------------------------------

    def cancel(self, request: CancelRequest) -> None:
        client = self.by_key.get((request.pid, request.secret))
        if client is None and self.door is not None:
            guest = self.door.find(request.pid, request.secret)
            side = guest.side if guest is not None else None
            if guest is not None and side is not None and side.active:  # out of its lane:
                guest.login.lane.eject(side)  # a client like any other
                client = self.by_key.get((request.pid, request.secret))
        if client is not None:
            client.leave_lane()  # its server, if it has one, is then client.server
        if client is None or client.server is None or client.keeps:
            return  # nothing running for that key: like PostgreSQL, say nothing
        server = client.server
        server.cancels += 1
        self.janitor.spawn(self._send_cancel(server), f"cancel-{server.backend_pid}")

    async def _send_cancel(self, server: Any) -> None:
        target = server.target
        try:
            async with asyncio.timeout(self.config.settings.cancel_wait_timeout or 10):
                if target.host is None:
                    path = f"{target.socket_dir}/.s.PGSQL.{target.port}"
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                writer.write(m.cancel_request(server.backend_pid, server.backend_key))
                await reader.read()  # the server closes once it has taken the request
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("cancel request to %s failed: %s", target.describe(), exc)
        finally:
            self._cancel_done(server)

    def _cancel_done(self, server: Any) -> None:
        """One cancel request for ``server`` is over; the last one frees it if held back."""
        server.cancels -= 1
        if not server.cancels:
            pending = self._pending_release.pop(id(server), None)
            if pending is not None:
                pending[0].give(pending[1])

    def release_after_cancel(self, pool: ServerPool, slot: Slot) -> None:
        """Hold a server back until its cancel requests are done, so they hit no one else."""
        self._pending_release[id(slot.conn)] = (pool, slot)

    # -- reload and admin actions -----------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP, RELOAD); a bad file keeps the old settings."""
        source = self.config.source
        if source is None:
            log.warning("reload: running without a config file; nothing to reload")
            return False
        try:
            new = load_config(source)
            tls = client_context(new.settings)
        except (ConfigError, OSError) as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return False
        self.apply_config(new, tls)
        log.info("configuration reloaded from %s", source)
        return True

    def apply_config(self, new: ProxyConfig, tls: Any = None) -> None:
        self.config = new
        self.client_tls = tls
        self._tune_listeners(new.settings)
        if self.door is not None:
            self.door.forget()  # logins are learned again under the new settings
            self.door.door.refuse_ssl = tls is None  # else SSLRequests are Python's
            self.door.set_limit(new.settings.max_client_conn, len(self.clients))
        for (database, user), pool in list(self.pools.items()):
            db = new.database(database)
            if db is None:
                pool.reconnect()
                continue
            secret = self._server_secret(db, user)
            target = server_target(new, db, user, secret)
            changed = target != pool.server_driver.target  # (socket options aside)
            pool.server_driver.target = target
            if changed:
                pool.reconnect()
            pool.reconfigure(
                pool_mode(new, db, new.users.get(user)), pool_settings(new, db, new.users.get(user))
            )
            _set_policies(pool, db, new.settings, self)

    def reconnect(self, database: str | None = None) -> None:
        for (db, _user), pool in self.pools.items():
            if database is None or db == database:
                pool.reconnect()

    def pause(self) -> None:
        self.paused = True
        for pool in self.pools.values():
            pool.paused = True
        self.release_kept()
        self.leave_lanes()

    def resume(self) -> None:
        self.paused = False
        for pool in self.pools.values():
            pool.paused = False
        parked, self.parked = self.parked, {}
        for client in parked:
            client.resume_from_pause()


@functools.lru_cache(maxsize=8)
def _tracked(extra: tuple[str, ...]) -> frozenset[str]:
    """The startup parameters a client may set: PgBouncer's tracked ones and
    track_extra_parameters (cached: the setting changes only on RELOAD)."""
    return frozenset(TRACKED_PARAMS) | frozenset(extra)


def _set_policies(pool: ServerPool, db: DatabaseEntry, s: ProxySettings, proxy: Proxy) -> None:
    """The pool's millpond-only behaviours, from the settings (at creation and reload)."""
    pool.session_pinning = db.session_pinning or s.session_pinning
    # the lane and affinity skip the release and the take: not where those run a query
    queryless = not s.server_reset_query_always and s.server_check_delay > 0
    lane = (
        s.fast_lane
        and LANE_BUILT
        and queryless
        and pool.mode == "transaction"
        and pool.server_driver.target.tls.sslmode in ("disable", "allow", "prefer")
    )
    if not lane and pool.lane is not None:
        pool.lane.close()
        pool.lane = None
    elif lane and pool.lane is None:
        pool.lane = PoolLane(proxy, pool)
    pool.affinity = (
        pool.lane is None  # the lane does better: no client keeps a server there
        and s.server_affinity
        and queryless
        and pool.mode != "session"
    )  # a reload's ServerPool.reconfigure gave every kept server back already


def _reserve_size(db: DatabaseEntry, user: UserEntry | None, default: int) -> int:
    if db.reserve_pool_size is not None:
        return db.reserve_pool_size
    if user is not None and user.reserve_pool_size is not None:
        return user.reserve_pool_size
    return default


def _timed_out(client: ClientConnection, s: ProxySettings, now: float) -> str | None:
    if not client.welcomed:
        limit = s.client_login_timeout
        return "client_login_timeout" if limit and now - client.connect_time > limit else None
    server = client.server
    idle_for = now - client.last_active
    if client.state is ClientState.IDLE:
        limit = s.client_idle_timeout
        return "client_idle_timeout" if limit and idle_for > limit else None
    if client.state is not ClientState.ACTIVE or server is None:
        return None
    if server.outstanding:
        limit = s.query_timeout
        return "query_timeout" if limit and now - client.busy_since > limit else None
    limit = s.idle_transaction_timeout
    if server.tx_status != m.TX_IDLE and limit and idle_for > limit:
        return "idle transaction timeout"
    return None


def _stale_socket_removed(directory: str, port: int) -> str:
    path = os.path.join(directory, f".s.PGSQL.{port}")
    if os.path.exists(path):
        os.unlink(path)
    return path


def _write_pidfile(path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")


def _remove_pidfile(path: str | None) -> None:
    if path and os.path.exists(path):
        os.unlink(path)


_ADMIN_PARAMS = (
    ("server_version", "16.0 (millpond)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("application_name", ""),
)
