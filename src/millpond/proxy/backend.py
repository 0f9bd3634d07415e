"""Server connections: the proxy's side of each PostgreSQL connection.

A :class:`ServerConnection` is an asyncio Protocol. It logs in (startup, whatever
authentication the server asks for, ParameterStatus, BackendKeyData), then either
sits in its pool or is *linked* to one client, forwarding the server's bytes to it
untouched while watching only message headers for ReadyForQuery. Short internal
queries (the reset query, the check query, SETs that align a client's parameters)
run between clients with their results consumed here.

:class:`ServerDriver` adapts these connections to the pool core's driver interface,
so lifetimes, idle timeouts, health checks and statistics come from the pool core.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from millpond.drivers.base import Driver
from millpond.errors import DatabaseUnavailable, ProtocolError
from millpond.pool.core import Release
from millpond.proxy import tcp
from millpond.proxy.auth_server import ServerAuthenticator
from millpond.proxy.limits import Budget
from millpond.proxy.prepared import ServerStatements
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.codec import MessageReader
from millpond.proxy.protocol.parsers import (
    decode_backend_key_data,
    decode_data_row,
    decode_error_response,
    decode_parameter_status,
)
from millpond.proxy.tls import ServerTLS, connect_with_tls

if TYPE_CHECKING:
    from millpond.proxy.frontend import ClientConnection

log = logging.getLogger("millpond.proxy")

#: Parameters PgBouncer keeps in step between a client and whichever server serves it.
TRACKED_PARAMS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "standard_conforming_strings",
    "application_name",
)


class ServerState(enum.Enum):
    LOGIN = "login"
    IDLE = "idle"  # in the pool, or linked and between messages
    INTERNAL = "internal"  # running the proxy's own query
    CLOSED = "closed"


_LOGIN, _IDLE, _INTERNAL, _CLOSED = (
    ServerState.LOGIN, ServerState.IDLE, ServerState.INTERNAL, ServerState.CLOSED
)  # fmt: skip
_BROKEN, _DIRTY, _CLEAN = Release.BROKEN, Release.DIRTY, Release.CLEAN

#: seconds a closing server connection gets to go before its transport is aborted
CLOSE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """Where and as whom a pool's server connections log in."""

    host: str | None  # None: Unix socket in ``socket_dir``
    port: int
    database: str
    user: str
    password: str | None = field(repr=False)
    socket_dir: str = "/tmp"
    startup: tuple[tuple[str, str], ...] = ()
    connect_query: str | None = None
    max_prepared: int = 200
    tls: ServerTLS = field(default_factory=ServerTLS)
    #: the tcp_* settings (millpond.proxy.tcp): new connections take them up after a
    #: RELOAD, without one reconnecting the pool (hence not compared)
    socket_options: tuple[tcp.Option, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        where = self.host or f"{self.socket_dir}/.s.PGSQL.{self.port}"
        return f"{self.user}@{where}:{self.port}/{self.database}"


class ServerConnection(asyncio.Protocol):
    """One connection to PostgreSQL, owned by a pool, lent to one client at a time."""

    __slots__ = (
        "_auth", "_error", "_lost", "_on_internal_done", "_waiter", "applied", "backend_key",
        "backend_pid", "budgets", "cancels", "client", "lane", "lane_side", "needs_reset",
        "outstanding", "param_sig", "params", "reader", "rows", "state", "statements",
        "target", "transport", "tx_status"
    )  # fmt: skip

    def __init__(self, target: ServerTarget, scram_keys: tuple[bytes, bytes] | None = None) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.reader = MessageReader()
        self.state = _LOGIN
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key: bytes = b""
        self.client: ClientConnection | None = None
        self.outstanding = 0  # ReadyForQuery messages still owed to the client
        self.tx_status = m.TX_IDLE
        self.cancels = 0  # cancel requests in flight for this connection
        self.param_sig: tuple[str | None, ...] = ()
        self._auth = ServerAuthenticator(target.user, target.password, scram_keys=scram_keys)
        self._waiter: asyncio.Future[None] | None = None
        self._error: str | None = None
        self._on_internal_done: Callable[[], None] | None = None
        self.rows: list[tuple[bytes | None, ...]] = []  # DataRows of the internal query
        self.statements = ServerStatements(target.max_prepared)
        self.applied: dict[str, str] = {}  # settings clients SET here (transaction mode)
        self.needs_reset = False  # a pinned client left session state behind
        self.budgets: tuple[Budget, ...] = ()  # room taken in max_db/user_connections
        self.lane: Any = None  # the PoolLane it is lent to, and its side there
        self.lane_side: Any = None
        self._lost: asyncio.Future[None] | None = None  # done at connection_lost

    def __repr__(self) -> str:
        return (
            f"<ServerConnection pid={self.backend_pid} {self.state.value} {self.target.describe()}>"
        )

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._lost = asyncio.get_running_loop().create_future()
        params = [("user", self.target.user), ("database", self.target.database)]
        params.extend(self.target.startup)
        self.transport.write(m.startup_message(dict(params)))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        client = self.client
        if client is not None and self.state is _IDLE:
            try:
                whole = reader.whole(data)
                if whole is not None:  # the common case: whole messages, no copy
                    client.from_server(self, data, whole[0], whole[2])
                    return
                reader.feed(data)
                span = reader.read_span()
            except ProtocolError as exc:
                self.abort(f"server sent a bad message: {exc}")
                return
            if span is not None:
                client.from_server(self, span.data, span.types, span.ready_status)
            return
        reader.feed(data)
        try:
            self._inspect()
        except ProtocolError as exc:
            self.abort(f"server sent a bad message: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._finish_wait(ConnectionError(self._error or "server closed the connection"))
        client = self.client
        if client is not None:
            client.server_lost(self)

    # -- login, internal queries and unsolicited messages ---------------------------

    def unsolicited(self, data: bytes) -> None:
        """Messages the server sent on its own while idle for a client that kept it
        (server affinity): handled as if it sat in the pool."""
        reader = MessageReader()
        reader.feed(data)
        try:
            self._inspect(reader)
        except ProtocolError as exc:
            self.abort(f"server sent a bad message: {exc}")

    def _inspect(self, messages: MessageReader | None = None) -> None:
        for msg in self.reader if messages is None else messages:
            kind, payload = msg.type, msg.payload
            if kind == m.AUTHENTICATION and self.state is _LOGIN:
                self._authenticate(payload)
            elif kind == m.PARAMETER_STATUS:
                status = decode_parameter_status(payload)
                self.params[status.name] = status.value
                self._refresh_sig()
            elif kind == m.BACKEND_KEY_DATA:
                key = decode_backend_key_data(payload)
                self.backend_pid, self.backend_key = key.pid, key.secret
            elif kind == m.ERROR_RESPONSE:
                err = decode_error_response(payload)
                self._error = f"{err.severity} {err.code}: {err.message}"
                if self.state is not _INTERNAL or err.severity in ("FATAL", "PANIC"):
                    self.abort(self._error)
                    return
            elif kind == m.READY_FOR_QUERY:
                self.tx_status = bytes(payload[:1])
                self._ready()
            elif kind == m.DATA_ROW and self.state is _INTERNAL:
                self.rows.append(decode_data_row(payload).values)
            # NoticeResponse, CommandComplete, RowDescription, DataRow...: consumed.

    def _authenticate(self, payload: memoryview) -> None:
        try:
            reply = self._auth.feed(payload)
        except (ProtocolError, DatabaseUnavailable) as exc:
            self.abort(str(exc))
            return
        if isinstance(reply, bytes) and self.transport is not None:
            self.transport.write(reply)

    def _ready(self) -> None:
        if self.state is _LOGIN or self.state is _INTERNAL:
            failed, self._error = self._error, None
            self.state = _IDLE
            done, self._on_internal_done = self._on_internal_done, None
            self._finish_wait(RuntimeError(failed) if failed else None)
            if done is not None:
                done()

    def _finish_wait(self, error: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _refresh_sig(self) -> None:
        self.param_sig = tuple(self.params.get(name) for name in TRACKED_PARAMS)

    async def wait_ready(self) -> None:
        """Wait for the pending login or internal query to finish."""
        if self.state is _IDLE:
            return
        if self.state is _CLOSED:
            raise ConnectionError(self._error or "server connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def run_internal(self, sql: str, done: Callable[[], None] | None = None) -> None:
        """Send ``sql`` (simple protocol) and consume its results; ``done`` at ReadyForQuery."""
        self._send_internal(m.query(sql), done)

    def _send_internal(self, data: bytes, done: Callable[[], None] | None = None) -> None:
        assert self.transport is not None
        self.state = _INTERNAL
        self.rows = []
        self._on_internal_done = done
        self.transport.write(data)

    async def fetch(self, sql: str, *params: str) -> list[tuple[bytes | None, ...]]:
        """Run a parameterised query (extended protocol, no SQL quoting) and return its rows."""
        text = [p.encode() for p in params]
        self._send_internal(m.parse("", sql) + m.bind("", "", text) + m.execute("") + m.sync())
        await self.wait_ready()
        return self.rows

    async def query(self, sql: str) -> None:
        """Run an internal query and wait for it; raises if the server reported an error."""
        self.run_internal(sql)
        await self.wait_ready()

    # -- ending ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED or self.transport is None or self.transport.is_closing()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (a desync or a fatal error)."""
        self.leave_lane()
        if self.state is not _CLOSED:
            log.debug("closing server connection %r: %s", self, reason)
        self._error = self._error or reason
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()
        self._finish_wait(ConnectionError(reason))

    def leave_lane(self) -> None:
        if self.lane_side is not None and self.lane is not None:
            self.lane.leave(self.lane_side)

    def release_budgets(self) -> None:
        budgets, self.budgets = self.budgets, ()
        for budget in budgets:
            budget.give_back()

    async def closed_within(self, seconds: float) -> None:
        """Wait until the transport is gone (closing TLS waits for the server's
        close_notify, a round trip); abort it if that takes longer than ``seconds``."""
        lost = self._lost
        if lost is None or lost.done():
            return
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(lost)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def terminate(self) -> None:
        """Say goodbye politely (Terminate), then close."""
        self.leave_lane()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(m.terminate())
            self.transport.close()
        self.state = _CLOSED


async def open_server(
    target: ServerTarget, timeout: float, scram_keys: tuple[bytes, bytes] | None = None
) -> ServerConnection:
    """Connect and log in to PostgreSQL; DatabaseUnavailable on any failure
    (``scram_keys``: a client's SCRAM keys, for a server that wants SCRAM and a target
    that has only a SCRAM secret or nothing)."""
    loop = asyncio.get_running_loop()
    conn = ServerConnection(target, scram_keys)
    try:
        async with asyncio.timeout(timeout):
            if target.host is None:
                path = f"{target.socket_dir}/.s.PGSQL.{target.port}"
                await loop.create_unix_connection(lambda: conn, path)
            elif target.tls.sslmode in ("disable", "allow"):
                await loop.create_connection(lambda: conn, target.host, target.port)
            else:
                await connect_with_tls(conn, target.host, target.port, target.tls)
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None and target.socket_options:
                tcp.tune(sock, target.socket_options)
            await conn.wait_ready()
            if target.connect_query:
                await conn.query(target.connect_query)
    except (OSError, TimeoutError, ConnectionError, RuntimeError, ssl.SSLError) as exc:
        conn.abort("login failed")
        raise DatabaseUnavailable(f"server login to {target.describe()} failed: {exc}") from exc
    return conn


class ServerDriver(Driver):
    """The pool core's view of server connections for one (database, user) pool."""

    name = "proxy"

    def __init__(
        self,
        target: ServerTarget,
        *,
        reset_query: str,
        check_query: str,
        reset_always: bool,
        budgets: tuple[Budget, ...] = (),
    ) -> None:
        super().__init__(None, {})
        self.target = target
        #: the SCRAM keys of the last client that logged in as the server user, if any
        self.scram_keys: Callable[[], tuple[bytes, bytes] | None] | None = None
        self.budgets = budgets  # max_db_connections / max_user_connections
        self.reset_query = reset_query
        self.check_query = check_query
        self.reset_always = reset_always
        self.welcome: dict[str, str] | None = None  # parameters of the first login

    async def connect(self, timeout: float) -> ServerConnection:
        taken: list[Budget] = []
        try:
            for budget in self.budgets:
                try:
                    await budget.take(timeout)
                except TimeoutError:
                    raise DatabaseUnavailable(
                        f"no room for a server connection: {budget.name} is at its limit "
                        f"({budget.limit})"
                    ) from None
                taken.append(budget)
            keys = self.scram_keys() if self.scram_keys is not None else None
            conn = await open_server(self.target, timeout, keys)
        except BaseException:
            for budget in taken:
                budget.give_back()
            raise
        conn.budgets = tuple(taken)
        if self.welcome is None:
            self.welcome = dict(conn.params)
        return conn

    def verdict(self, conn: ServerConnection) -> Release:
        # ``closed``, spelt out: a property call here and in is_alive costs ~10% of the
        # proxy's Python per transaction (bench/proxy_hotpath.py).
        transport = conn.transport
        if (
            conn.state is not _IDLE  # closed, or logging in, or running our own query
            or transport is None
            or transport.is_closing()
            or conn.outstanding
            or conn.tx_status != m.TX_IDLE
            or conn.reader.buffered
            or conn.statements.pending
        ):
            return _BROKEN  # never hand on a connection mid-protocol
        if conn.needs_reset or (self.reset_always and self.reset_query):
            return _DIRTY
        return _CLEAN

    def is_alive(self, conn: ServerConnection) -> bool:
        transport = conn.transport  # ``not conn.closed``, spelt out (see verdict)
        return conn.state is not _CLOSED and transport is not None and not transport.is_closing()

    async def reset(self, conn: ServerConnection) -> None:
        await conn.query(self.reset_query or "DISCARD ALL")
        conn.statements.forget_all()  # DISCARD ALL dropped them
        conn.applied.clear()
        conn.needs_reset = False

    async def ping(self, conn: ServerConnection) -> None:
        if self.check_query:
            await conn.query(self.check_query)

    async def close(self, conn: ServerConnection) -> None:
        conn.terminate()
        conn.release_budgets()
        # gone before the pool forgets it: a proxy that stops leaves no TLS shutdown
        # half done, and a server that does not answer costs a second, not a slot
        await conn.closed_within(CLOSE_WAIT)

    def terminate(self, conn: ServerConnection) -> None:
        conn.abort("terminated by the pool")
        conn.release_budgets()

    def mark_dirty(self, conn: ServerConnection) -> None:
        pass

    def mark_clean(self, conn: ServerConnection) -> None:
        pass

    def _no_queries(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("proxy server connections are not for application queries")

    def fetch(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return self._no_queries()

    def fetchrow(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return self._no_queries()

    def fetchval(
        self, conn: Any, query: str, args: Sequence[Any], column: int, timeout: float | None
    ) -> Any:
        return self._no_queries()

    def execute(self, conn: Any, query: str, args: Sequence[Any], timeout: float | None) -> Any:
        return self._no_queries()

    def executemany(
        self, conn: Any, query: str, args: Iterable[Sequence[Any]], timeout: float | None
    ) -> Any:
        return self._no_queries()

    def transaction(
        self, conn: Any, *, isolation: str | None, readonly: bool, deferrable: bool
    ) -> AbstractAsyncContextManager[Any]:
        result: AbstractAsyncContextManager[Any] = self._no_queries()
        return result
