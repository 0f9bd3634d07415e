"""The admin console: the virtual database ``pgbouncer``, as in PgBouncer.

A client that logs in to database ``pgbouncer`` gets an :class:`AdminSession`. It reads
simple-protocol queries from the client's message buffer and answers them itself:
SHOW commands (rendered from snapshots, see :mod:`millpond.proxy.admin_show`), process
control (PAUSE, RESUME, RECONNECT, KILL, KILL_CLIENT, RELOAD, SHUTDOWN, WAIT_CLOSE) and
SET. Commands, arguments, error texts and SQLSTATEs are PgBouncer's (``src/admin.c``):
users in ``admin_users`` may run everything, users in ``stats_users`` (everyone, when
``auth_type`` is ``any``) only SHOW, and anyone else is refused at login with
``not allowed``. One extension: a query may hold several commands separated by ``;``
(PgBouncer takes one); they run in order and the first error stops the rest, as in
PostgreSQL.

PAUSE and WAIT_CLOSE answer when the servers they wait for are released; until then
the session reads no further commands (PgBouncer's ``wait_for_response``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from millpond import __version__
from millpond.errors import ConfigError, ProtocolError
from millpond.proxy import admin_show as show
from millpond.proxy import admin_stats as stats
from millpond.proxy.admin_actions import (
    admin_state,
    apply_config,
    busy_servers,
    closing_servers,
    kill_database,
    pause_database,
    paused_databases,
    pools_of,
    reconnect_pool,
    resume_databases,
    start_shutdown,
    start_stats,
)
from millpond.proxy.config import load_config, parse_setting
from millpond.proxy.frontend import ClientState
from millpond.proxy.login import peer_uid
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import decode_query
from millpond.proxy.tls import client_context

if TYPE_CHECKING:
    from millpond.proxy.frontend import ClientConnection
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.proxy")

VERSION = f"millpond {__version__} (PgBouncer-compatible)"
_POLL = 0.05  # seconds between checks while PAUSE / WAIT_CLOSE wait

# PgBouncer's command grammar (admin.c): CMD [ARG] and SET KEY (=|TO) VALUE.
_WS0, _WS1 = r"[ \t\n\r]*", r"[ \t\n\r]+"
_WORD = r'("(?:[^"]|"")*"|[0-9a-z_]+)'
_STRING = r"('(?:[^']|'')*')"
_CMD = re.compile(rf"{_WS0}{_WORD}(?:{_WS1}{_WORD})?{_WS0}", re.IGNORECASE)
_SET = re.compile(rf"{_WS0}set{_WS1}{_WORD}{_WS0}(?:=|to){_WS0}(?:{_STRING}|{_WORD}){_WS0}",
                  re.IGNORECASE)  # fmt: skip
_STATEMENT = re.compile(r"""(?:'(?:[^']|'')*(?:'|$)|"(?:[^"]|"")*(?:"|$)|[^;'"])+|;""")

#: Parameters some drivers SHOW or SET on any connection: PgBouncer fakes them.
FAKE_PARAMS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}
_HELP = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION"
    "\n\tSHOW PEERS|PEER_POOLS\n\tSHOW LISTS|MEM|STATE\n\tSHOW DNS_HOSTS|DNS_ZONES"
    "\n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n\tSET key = arg\n\tRELOAD"
    "\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n\tENABLE <db>\n\tRECONNECT [<db>]"
    "\n\tKILL [<db>]"
    "\n\tKILL_CLIENT <client_id>\n\tSHUTDOWN\n\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS"
    "\n\tWAIT_CLOSE [<db>]"
)
_SHUTDOWN_MODES = {"": "immediate", "wait_for_servers": "safe", "wait_for_clients": "super-safe"}


class Role(enum.Enum):
    ADMIN = "admin"  # admin_users: every command
    STATS = "stats"  # stats_users: SHOW only


class AdminError(Exception):
    """A command failed: sent as an ERROR, the session goes on."""

    def __init__(self, message: str, code: str = "08P01", detail: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.detail = message, code, detail

    def response(self) -> bytes:
        return m.error_response("ERROR", self.code, self.message, detail=self.detail)


@dataclass(frozen=True, slots=True)
class Deferred:
    """A command that answers later (PAUSE, WAIT_CLOSE): awaited on the proxy's janitor."""

    wait: Callable[[], Awaitable[bytes]]


class _Hold(enum.Enum):
    HOLD = "hold"  # SHUTDOWN: no answer; the connection ends with the process


Result = bytes | Deferred | _Hold


# --------------------------------------------------------------------------- who may do what


def _same_unix_user(client: ClientConnection) -> bool:
    """PgBouncer's rule: user ``pgbouncer`` over the Unix socket as the proxy's own uid."""
    return client.user == "pgbouncer" and peer_uid(client) == os.getuid()


def admin_role(proxy: Proxy, client: ClientConnection) -> Role | None:
    """The client's rights on the console; None: refused (PgBouncer's ``not allowed``)."""
    s = proxy.config.settings
    if client.user in s.admin_users or _same_unix_user(client):
        return Role.ADMIN
    if client.user in s.stats_users or s.auth_type == "any":
        return Role.STATS
    return None


# --------------------------------------------------------------------------- parsing


def split_statements(text: str) -> list[str]:
    """The commands in a query string: split at ``;`` outside quotes, empty ones dropped."""
    return [s for s in _STATEMENT.findall(text) if s != ";" and s.strip(" \t\n\r")]


def _unquote(word: str | None, quote: str) -> str:
    if not word:
        return ""
    if word[0] == quote:
        return word[1:-1].replace(quote * 2, quote)
    return word


def parse_command(text: str) -> tuple[str, str, str | None]:
    """``(command, arg, None)`` or ``("set", key, value)``; ValueError when it is neither."""
    match = _CMD.fullmatch(text)
    if match is not None:
        return _unquote(match[1], '"').lower(), _unquote(match[2], '"'), None
    match = _SET.fullmatch(text)
    if match is not None:
        value = _unquote(match[2], "'") if match[2] is not None else _unquote(match[3], '"')
        return "set", _unquote(match[1], '"'), value
    raise ValueError(text)


def _syntax_error(text: str) -> AdminError:
    return AdminError(f"invalid command '{text}', use SHOW HELP;")


def _ready(tag: str) -> bytes:
    return m.command_complete(tag)


# --------------------------------------------------------------------------- the session


class AdminSession:
    """One client of the admin console."""

    def __init__(self, proxy: Proxy, client: ClientConnection) -> None:
        self.proxy = proxy
        self.client = client
        self.role = admin_role(proxy, client)
        self.shared = admin_state(proxy)
        self._queue: deque[str] = deque()
        self._text = ""
        self._single = True
        self._busy = False
        if self.role is None:
            log.warning("admin console: %s from %s not allowed", client.user, client.addr)
            self._busy = True
            client.fail("08P01", "not allowed")
            return
        start_stats(proxy)

    def __repr__(self) -> str:
        role = self.role.value if self.role else "refused"
        return f"<AdminSession {self.client.user} {role}{' busy' if self._busy else ''}>"

    # -- reading -----------------------------------------------------------------------

    def data_ready(self, client: ClientConnection) -> None:
        """Complete messages may be buffered in ``client.reader``: handle them in order."""
        while not self._busy and client.state is not ClientState.CLOSED:
            msg = client.reader.next_message()
            if msg is None:
                return
            if msg.type == m.QUERY:
                self.shared.commands += 1
                self.execute(decode_query(msg.payload).text)
            elif msg.type == m.TERMINATE:
                client.close()
            else:
                self._bad_packet(msg.type)

    def _bad_packet(self, kind: bytes) -> None:
        if kind in (m.PARSE, m.BIND, m.EXECUTE):
            text = "extended query protocol not supported by admin console"
        else:
            text = f"unsupported packet type for admin console: {kind[0]}"
        self._write(AdminError(text).response() + m.ready_for_query(m.TX_IDLE))
        self.client.fail("08P01", "bad packet")

    def _write(self, data: bytes) -> None:
        transport = self.client.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # -- running commands --------------------------------------------------------------

    def execute(self, text: str) -> None:
        """Run every command in one Query message, then say ReadyForQuery."""
        self._text = text
        self.proxy.release_kept()  # SHOW, PAUSE, KILL... see the pools as PgBouncer would
        self.proxy.leave_lanes()  # and act on the Python path's state, the whole truth
        self._queue = deque(split_statements(text))
        self._single = len(self._queue) == 1
        if not self._queue:
            self._write(m.empty_query_response() + m.ready_for_query(m.TX_IDLE))
            return
        self._continue()

    def _continue(self) -> None:
        out: list[bytes] = []
        while self._queue:
            statement = self._queue.popleft()
            try:
                result = self.command(statement)
            except AdminError as exc:
                log.info("admin console error for %s: %s", self.client.user, exc.message)
                out.append(exc.response())
                self._queue.clear()
                break
            except Exception as exc:  # a bug must not take the console (or the proxy) down
                log.exception("admin console: %r failed", statement)
                out.append(AdminError(f"internal error: {exc}", code="XX000").response())
                self._queue.clear()
                break
            if isinstance(result, bytes):
                out.append(result)
                continue
            self._write(b"".join(out))
            self._busy = True
            if isinstance(result, Deferred):
                self.proxy.janitor.spawn(self._finish(result), "admin-wait")
            return
        out.append(m.ready_for_query(m.TX_IDLE))
        self._write(b"".join(out))

    async def _finish(self, deferred: Deferred) -> None:
        try:
            data = await deferred.wait()
        except AdminError as exc:
            data = exc.response()
            self._queue.clear()
        if self.client.state is ClientState.CLOSED:
            return
        self._write(data)
        self._busy = False
        self._continue()
        try:
            self.data_ready(self.client)  # what arrived meanwhile
        except ProtocolError as exc:
            self.client.fail("08P01", f"protocol violation: {exc}")

    def command(self, statement: str) -> Result:
        """Run one command; AdminError for PgBouncer's errors."""
        shown = self._text if self._single else statement
        try:
            name, arg, value = parse_command(statement)
        except ValueError:
            raise _syntax_error(shown) from None
        if value is not None:
            return self.set(arg, value)
        handler = _COMMANDS.get(name)
        if handler is None and name not in _UNSUPPORTED:
            raise _syntax_error(shown)
        if name not in ("show", "select") and self.role is not Role.ADMIN:
            raise AdminError("admin access needed")
        if handler is None:
            raise AdminError(f"{name.upper()} is not supported by millpond")
        return handler(self, arg)

    # -- SHOW ------------------------------------------------------------------------------

    def show(self, arg: str) -> Result:
        what = arg.lower()
        if what in FAKE_PARAMS:
            return show.Table("s", (what,)).render([(FAKE_PARAMS[what],)])
        if what == "help":
            notice = m.notice_response("NOTICE", "00000", "Console usage", detail=_HELP)
            return notice + _ready("SHOW")
        if what in ("fds", "sockets", "active_sockets"):
            if self.role is not Role.ADMIN:
                raise AdminError("admin access needed")
            raise AdminError(f"SHOW {what.upper()} is not supported by millpond")
        rows = self._rows(what)
        if rows is None:
            raise _syntax_error(f"SHOW {arg}" if arg else "SHOW")
        return show.TABLES[what].render(rows)

    def _rows(self, what: str) -> Any:
        proxy, clock = self.proxy, show.Clock()
        if what == "pools":
            return [row.cells() for row in show.pool_rows(proxy, clock)]
        if what in ("clients", "servers"):
            build = show.client_rows if what == "clients" else show.server_rows
            return [row.cells() for row in build(proxy, clock)]
        if what in ("stats", "stats_totals", "stats_averages", "totals"):
            return _stats_cells(what, stats.stats_rows(
                proxy, self.shared.admin_totals(), self.shared.history))  # fmt: skip
        simple: dict[str, Callable[[], Any]] = {
            "databases": lambda: show.database_rows(
                proxy, paused_databases(proxy), proxy.disabled_databases
            ),
            "users": lambda: show.user_rows(proxy),
            "config": lambda: show.config_rows(proxy.config.settings),
            "lists": lambda: show.list_rows(proxy),
            "version": lambda: [(VERSION,)],
            "state": lambda: _state_rows(proxy),
            "peers": lambda: [
                (p.peer_id, p.host, p.port, p.pool_size or 0) for p in proxy.config.peers.values()
            ],
            "mem": list,
            "peer_pools": list,
            "dns_hosts": list,
            "dns_zones": list,
        }
        build_simple = simple.get(what)
        return None if build_simple is None else build_simple()

    # -- SET -------------------------------------------------------------------------------

    def set(self, key: str, value: str) -> Result:
        if key.lower() in FAKE_PARAMS:
            return m.notice_response("NOTICE", "00000", "SET ignored") + _ready("SET")
        if self.role is not Role.ADMIN:
            raise AdminError("admin access needed")
        name = key.lower()
        if name in show.NOT_CHANGEABLE:
            raise AdminError("SET failed", detail=f"{name} cannot be changed while running")
        old = self.proxy.config
        try:
            settings = dataclasses.replace(old.settings, **{name: parse_setting(name, value)})
        except ConfigError as exc:
            raise AdminError("SET failed", detail=str(exc)) from None
        notice, tls = b"", getattr(self.proxy, "client_tls", None)
        if "_tls_" in name or "_tls13_" in name:
            try:
                tls = client_context(settings)
            except (ConfigError, OSError) as exc:
                log.warning("SET %s: TLS settings not applied: %s", name, exc)
                text = "TLS settings could not be applied, still using old configuration"
                notice = m.notice_response("NOTICE", "00000", text)
        log.info("SET %s=%s (admin console, %s)", name, value, self.client.user)
        apply_config(self.proxy, dataclasses.replace(old, settings=settings), tls)
        return notice + _ready(f"SET {key}={value}")

    # -- process control ----------------------------------------------------------------

    def disable(self, arg: str) -> Result:
        """DISABLE db: refuse new client logins to ``db``; its connected clients go on."""
        db = self._database(self._required(arg), "disable")
        log.info("DISABLE '%s' command issued", db)
        self.proxy.disabled_databases.add(db)
        return _ready("DISABLE")

    def enable(self, arg: str) -> Result:
        """ENABLE db: take new client logins to ``db`` again, after DISABLE."""
        db = self._database(self._required(arg), "enable")
        log.info("ENABLE '%s' command issued", db)
        self.proxy.disabled_databases.discard(db)
        return _ready("ENABLE")

    @staticmethod
    def _required(arg: str) -> str:
        if not arg:
            raise AdminError("a database is required")
        return arg

    def _database(self, arg: str, verb: str) -> str:
        if arg == show.ADMIN_DB:
            raise AdminError(f"cannot {verb} admin db: {arg}")
        known = any(pool.database == arg for pool in self.proxy.pools.values())
        if not known and self.proxy.config.database(arg) is None:
            raise AdminError(f"no such database: {arg}")
        return arg

    def pause(self, arg: str) -> Result:
        proxy = self.proxy
        if proxy.paused:
            raise AdminError("already suspended/paused")
        if not arg:
            log.info("PAUSE command issued")
            proxy.pause()
            return Deferred(lambda: self._drained(None))
        db = self._database(arg, "pause")
        log.info("PAUSE '%s' command issued", db)
        pause_database(proxy, db)
        if not pools_of(proxy, db):
            return _ready("PAUSE")
        return Deferred(lambda: self._drained(db))

    async def _drained(self, db: str | None) -> bytes:
        """PAUSE's wait: until no server is lent out, then close the idle ones."""
        while any(busy_servers(pool) for pool in pools_of(self.proxy, db)):  # noqa: ASYNC110
            await asyncio.sleep(_POLL)  # releases happen in callbacks: a brief poll
        for pool in pools_of(self.proxy, db):
            reconnect_pool(pool)
        return _ready("PAUSE")

    def resume(self, arg: str) -> Result:
        proxy = self.proxy
        if not arg:
            log.info("RESUME command issued")
            if getattr(proxy, "shutting_down", None):
                raise AdminError("pooler is shutting down")
            if not proxy.paused:
                raise AdminError("pooler is not paused/suspended")
            resume_databases(proxy, None)
            return _ready("RESUME")
        log.info("RESUME '%s' command issued", arg)
        if arg not in paused_databases(proxy):
            known = arg == show.ADMIN_DB or arg in proxy.config.databases  # not via "*"
            if not known and not pools_of(proxy, arg):
                raise AdminError(f"no such database: {arg}")
            raise AdminError(f"database {arg} is not paused")
        resume_databases(proxy, arg)
        return _ready("RESUME")

    def reconnect(self, arg: str) -> Result:
        db = self._database(arg, "reconnect") if arg else None
        log.info("RECONNECT%s command issued", f" '{db}'" if db else "")
        hook = getattr(self.proxy, "reconnect", None)
        if callable(hook):
            hook(db)
        else:
            for pool in pools_of(self.proxy, db):
                reconnect_pool(pool)
        return _ready("RECONNECT")

    def wait_close(self, arg: str) -> Result:
        db = self._database(arg, "wait in") if arg else None
        log.info("WAIT_CLOSE%s command issued", f" '{db}'" if db else "")

        async def closed() -> bytes:
            while any(closing_servers(p) for p in pools_of(self.proxy, db)):  # noqa: ASYNC110
                await asyncio.sleep(_POLL)
            return _ready("WAIT_CLOSE")

        return Deferred(closed)

    def kill(self, arg: str) -> Result:
        proxy = self.proxy
        if proxy.paused:
            raise AdminError("already suspended/paused")
        if arg:
            databases = [self._database(arg, "kill")]
        else:
            databases = sorted({pool.database for pool in proxy.pools.values()})
        log.info("KILL%s command issued", f" '{arg}'" if arg else "")
        for db in databases:
            kill_database(proxy, db)
        return _ready("KILL")

    def kill_client(self, arg: str) -> Result:
        if not arg.isdigit():
            raise AdminError("invalid client pointer supplied")
        for client in list(self.proxy.clients):
            if client.pid == int(arg) and show.client_state(client) is not None:
                log.info("KILL_CLIENT %s command issued", arg)
                client.fail("08P01", "admin forced disconnect")
                return _ready("KILL_CLIENT")
        raise AdminError("client not found")

    def reload(self, arg: str) -> Result:
        if arg:
            raise _syntax_error(self._text)
        log.info("RELOAD command issued")
        source = self.proxy.config.source
        if source is None:
            log.info("RELOAD: running without a config file; nothing to reload")
            return _ready("RELOAD")
        try:
            new = load_config(source)
            tls = client_context(new.settings)
        except (ConfigError, OSError) as exc:
            log.error("RELOAD failed, keeping the old configuration: %s", exc)
            raise AdminError(
                "RELOAD failed, see logs for additional details", code="F0000"
            ) from None
        apply_config(self.proxy, new, tls)
        return _ready("RELOAD")

    def shutdown(self, arg: str) -> Result:
        mode = _SHUTDOWN_MODES.get(arg.lower())
        if mode is None:
            raise _syntax_error(self._text)
        log.info("SHUTDOWN%s command issued", f" {arg.upper()}" if arg else "")
        start_shutdown(self.proxy, mode)
        return _Hold.HOLD if mode == "immediate" else _ready("SHUTDOWN")


_COMMANDS: dict[str, Callable[[AdminSession, str], Result]] = {
    "show": AdminSession.show,
    "select": AdminSession.show,
    "pause": AdminSession.pause,
    "resume": AdminSession.resume,
    "reconnect": AdminSession.reconnect,
    "wait_close": AdminSession.wait_close,
    "kill": AdminSession.kill,
    "kill_client": AdminSession.kill_client,
    "reload": AdminSession.reload,
    "shutdown": AdminSession.shutdown,
    "disable": AdminSession.disable,
    "enable": AdminSession.enable,
}
_UNSUPPORTED = frozenset({"suspend"})  # PgBouncer's, not (yet) millpond's


# --------------------------------------------------------------------------- actions


def _stats_cells(what: str, rows: tuple[stats.StatsRow, ...]) -> list[show.Row]:
    if what == "totals":
        return list(stats.totals_rows(rows))
    if what == "stats":
        return [(r.database, *r.totals.values(), *r.averages) for r in rows]
    if what == "stats_totals":
        return [(r.database, *r.totals.values()) for r in rows]
    return [(r.database, *r.averages) for r in rows]


def _state_rows(proxy: Proxy) -> list[show.Row]:
    paused = "yes" if proxy.paused else "no"
    return [("active", "no" if proxy.paused else "yes"), ("paused", paused), ("suspended", "no")]
