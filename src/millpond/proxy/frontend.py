"""Client connections: the proxy's side of each application connection.

A :class:`ClientConnection` is an asyncio Protocol with an explicit state. After the
startup packet and authentication it is *idle* (no server), *waiting* (queued for a
server connection) or *active* (linked to one). While active, complete messages are
forwarded to the server as one write per read, parsing only their 5-byte headers;
the server connection goes back to its pool as soon as the pool mode allows and the
protocol state proves it idle (every Sync/Query answered, transaction status idle).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import re
import secrets
from collections.abc import Iterator
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from millpond.errors import PoolClosed, ProtocolError
from millpond.pool.state import Slot
from millpond.proxy.backend import TRACKED_PARAMS, ServerConnection
from millpond.proxy.login import ClientHandshake
from millpond.proxy.prepared import Rewriter, Statement, responses
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.codec import MessageReader, names_statements
from millpond.proxy.protocol.parsers import decode_parameter_status, decode_parse, decode_query
from millpond.proxy.session import SessionTracker, alignment_sql, readback_sql
from millpond.proxy.session import hint as session_hint

if TYPE_CHECKING:
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.proxy")

_has_extended = re.compile(rb"[PBDCEH]").search

# Message types that end with a ReadyForQuery from the server.
_SYNC_POINTS = (b"Q", b"S", b"F")
# Extended-protocol messages that leave the server mid-protocol until the next Sync.
_EXTENDED = frozenset(b"PBDECH")


class ClientState(enum.Enum):
    STARTUP = "startup"
    AUTH = "auth"
    LOGIN = "login"  # authenticated, learning the server parameters
    IDLE = "idle"
    WAITING = "waiting"
    ACTIVE = "active"
    CLOSED = "closed"


# Enum members and constants as plain names for the hot path (a class attribute of an
# Enum is a slow lookup: EnumType has __getattr__).
_STARTUP, _AUTH, _LOGIN = ClientState.STARTUP, ClientState.AUTH, ClientState.LOGIN
_IDLE, _WAITING, _ACTIVE, _CLOSED = (
    ClientState.IDLE, ClientState.WAITING, ClientState.ACTIVE, ClientState.CLOSED
)  # fmt: skip
_TX_IDLE = m.TX_IDLE
# Type bytes as ints: ``int in bytes`` is a memchr, while a bytes needle first fails
# (with a formatted TypeError, raised and cleared) to be read as an int.
_PARAMETER_STATUS, _QUERY = ord(m.PARAMETER_STATUS), ord(m.QUERY)
_PIDS = itertools.count(secrets.randbits(30))


def _random_keys() -> Iterator[bytes]:
    """Cancel keys: 4 bytes each from the OS's CSPRNG, read 4 KiB at a time (one
    getrandom call per 1,024 logins instead of one per login)."""
    while True:
        block = os.urandom(4096)
        for i in range(0, 4096, 4):
            yield block[i : i + 4]


_KEYS = _random_keys()
#: Bytes a client may send while it waits for a server before we stop reading it.
_WAIT_BUFFER = 256 * 1024


def _query_texts(data: bytes) -> list[str]:
    """The SQL of every Query and Parse message in a span of client messages."""
    reader = MessageReader()
    reader.feed(data)
    texts = []
    for msg in reader:
        if msg.type == b"Q":
            texts.append(decode_query(msg.payload).text)
        elif msg.type == b"P":
            texts.append(decode_parse(msg.payload).query)
    return texts


def _unsynced_after(types: bytes, before: bool) -> bool:
    """Is the server mid extended-protocol after these messages?"""
    last = max(types.rfind(b"S"), types.rfind(b"Q"), types.rfind(b"F"))
    tail = types[last + 1 :] if last >= 0 else types
    return any(t in _EXTENDED for t in tail) or (before and last < 0)


class ClientConnection(asyncio.Protocol):
    """One application connection to the proxy."""

    __slots__ = (
        "_held", "_reading_paused", "_wait", "addr", "admin", "busy_since", "connect_time",
        "database", "handshake", "keeps", "key", "lane_backoff", "lane_side", "lane_skip",
        "last_active", "param_sig", "params", "pid", "pool", "proxy", "reader",
        "request_time", "rewriter", "server", "session", "slot", "state", "statements",
        "tls", "transport", "unsynced", "user", "welcomed"
    )  # fmt: skip

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.state = _STARTUP
        self.handshake: ClientHandshake | None = ClientHandshake(self)  # until welcomed
        self.reader = MessageReader()
        self.user = ""
        self.database = ""
        self.params: dict[str, str] = {}
        self.param_sig: tuple[str | None, ...] = ()
        self.pool: ServerPool | None = None
        self.server: ServerConnection | None = None
        self.slot: Slot | None = None
        self.keeps = False  # idle, still holding its last server (ServerPool.affinity)
        self.unsynced = False
        # Our BackendKeyData: the pid only names the connection (a counter will do);
        # the key is what makes a CancelRequest hard to forge.
        self.pid = next(_PIDS) & 0x7FFFFFFF or 1
        self.key = next(_KEYS)
        self.addr: tuple[Any, ...] | str = ""
        self.tls = False
        self.statements: dict[str, Statement] = {}  # named prepared statements
        self.session = SessionTracker()
        self.rewriter: Rewriter | None = None
        self.admin: Any = None
        self._wait: Any = None
        self._held: tuple[bytes, bytes] | None = None  # scanned data waiting for a server
        self._reading_paused = False  # the client sent too much while waiting
        self.last_active = monotonic()  # for client_idle_timeout / idle_transaction_timeout
        self.connect_time = self.last_active  # for SHOW CLIENTS
        self.request_time = self.last_active
        self.busy_since = 0.0  # when the server started owing answers (query_timeout)
        self.welcomed = False  # logged in (client_login_timeout no longer applies)
        self.lane_side: Any = None  # in the pool's compiled lane (see lane.py)
        self.lane_backoff = self.lane_skip = 0  # transactions to skip the lane for

    def __repr__(self) -> str:
        return f"<ClientConnection {self.user}@{self.database} {self.state.value} {self.addr}>"

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        standin: Any = self.transport
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if standin is not None:  # it came in through the door (door.py)
            standin.attach(self, self.transport)
            return
        self.addr = transport.get_extra_info("peername") or "unix"
        self.proxy.client_opened(self)  # its sweep enforces client_login_timeout

    def data_received(self, data: bytes) -> None:
        try:
            state = self.state
            if state is _ACTIVE:
                whole = self.reader.whole(data, b"X")
                if whole is not None and whole[0][-1:] != b"X":
                    self._forward_span(data, whole[0])  # the common case: no copy
                else:
                    self.reader.feed(data)
                    self._forward()
            elif state is _IDLE and self.admin is None:
                self.last_active = monotonic()
                whole = self.reader.whole(data, b"X")
                if whole is not None and whole[0][-1:] != b"X":
                    self._start_transaction(data, whole[0])
                else:
                    self.reader.feed(data)
                    self._need_server()
            elif state is _STARTUP:
                assert self.handshake is not None
                self.handshake.startup_data(data)
            elif self.state is _AUTH:
                assert self.handshake is not None
                self.reader.feed(data)
                self.handshake.auth_data()
            elif self.admin is not None:
                self.reader.feed(data)
                self.admin.data_ready(self)
            elif state is _WAITING:
                self._hold(data)
            else:
                self.reader.feed(data)
                if self.state is _IDLE:
                    self.last_active = monotonic()
                    self._need_server()
        except ProtocolError as exc:
            self.fail("08P01", f"protocol violation: {exc}")
        except Exception:  # a bug of ours: this client is told and dropped, no one else
            log.exception("internal error serving %r", self)
            self.fail("XX000", "internal error in the pooler, see its log")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    # -- startup and login --------------------------------------------------------

    def start_auth(self, authenticator: Any) -> None:
        """Begin authentication with a sans-I/O authenticator (see ClientHandshake)."""
        assert self.handshake is not None
        self.state = _AUTH
        self.handshake.start_auth(authenticator)

    def welcome(self, server_params: dict[str, str]) -> None:
        """Finish the login (parameters, our cancel key, ReadyForQuery), then serve."""
        handshake = self.handshake
        assert handshake is not None
        before = handshake.welcome(server_params)
        self.handshake = None  # the startup reader and the authenticator go with it
        self.welcomed = True
        self.state = _IDLE
        if self.admin is not None:
            if self.reader.buffered:
                self.admin.data_ready(self)
        elif self.reader.buffered:
            self._need_server()
        elif self.pool is not None and self.pool.lane is not None:
            door = self.proxy.door
            if self.pool.lane.admit(self) and door is not None and handshake.raw is not None:
                door.learn(self, handshake.raw, before, server_params)

    def leave_lane(self) -> None:
        """Out of the compiled lane, back to the Python path (a no-op if not in it)."""
        side = self.lane_side
        if side is not None and self.pool is not None and self.pool.lane is not None:
            self.pool.lane.leave(side)

    # -- getting and giving back a server -----------------------------------------

    def _need_server(self) -> None:
        """Link to a server connection when a complete message is waiting."""
        pool = self.pool
        assert pool is not None
        if self.keeps:  # the uncommon ways to a request (partial data, pause): plainly
            self.unkeep()
        scan = self.reader.scan(stop=b"X")
        if not scan.length:
            return
        if scan.types[:1] == b"X":
            self.close()  # Terminate while no server is linked: nothing to forward
            return
        if self.proxy.shutting_down in ("safe", "immediate"):
            self.fail("08P01", "pooler is shutting down")
            return
        self.request_time = monotonic()
        if pool.paused:
            self.state = _WAITING
            self.proxy.park(self)
            return
        slot = self._take(pool)
        if slot is not None:
            self._link(slot)
        elif self.state is not _CLOSED:
            self._queue(pool)

    def _take(self, pool: ServerPool, now: float = 0.0) -> Slot | None:
        """An idle server connection, or None; a closed pool fails (and closes) the client."""
        try:
            slot = pool.take(now)
            if slot is None and pool.kept:
                slot = pool.take_kept(now)  # one an idle client kept
            if slot is None and pool.lane is not None and pool.lane.reclaim():
                slot = pool.take(now)  # one the lane had free
            return slot
        except PoolClosed:
            self.fail("08P01", "pooler is shutting down")
            return None

    def _queue(self, pool: ServerPool, held: tuple[bytes, bytes] | None = None) -> None:
        """Wait for a server connection.

        ``held`` is a chunk of whole messages already scanned: it waits as it is, and
        is forwarded on the hand-off without being scanned again. Reading goes on
        meanwhile (so a client that leaves is noticed at once) until the client has
        sent more than _WAIT_BUFFER bytes: then it stops until a server is linked.
        """
        self.state = _WAITING
        self._held = held
        handle = pool.wait(self, self.request_time)  # the hand-off calls set_result
        if self.state is _WAITING:
            self._wait = handle

    def _hold(self, data: bytes) -> None:
        """Data while waiting for a server: it goes after what already waits."""
        held, self._held = self._held, None
        if held is not None:
            self.reader.feed(held[0])
        self.reader.feed(data)
        if self.reader.buffered > _WAIT_BUFFER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def resume_from_pause(self) -> None:
        if self.state is _WAITING and self._wait is None:
            held, self._held = self._held, None
            if held is not None:
                self.reader.feed(held[0])
            self._resume_reading()
            self.state = _IDLE
            self._need_server()

    # -- the pool core hands us a server as it would resolve a future (pools.Handoff) --

    def done(self) -> bool:
        """Handed a server already, or no longer waiting for one."""
        return self._wait is None and self.state is not _WAITING

    def set_result(self, slot: Slot) -> None:
        """The pool handed us a server connection (called synchronously by the core)."""
        self._wait = None
        if self.state is not _WAITING:
            assert self.pool is not None
            self.pool.give(slot)  # we left while it was on its way
            return
        if self._reading_paused:
            self._resume_reading()
        held, self._held = self._held, None
        self._link(slot, held)

    def set_exception(self, exc: BaseException) -> None:
        self._wait = None
        self.fail("08P01", str(exc))

    def wait_expired(self) -> None:
        """query_wait_timeout ran out while we waited for a server (the proxy's sweep)."""
        if self._wait is not None and self.pool is not None:
            self.pool.expire(self._wait)
            self._wait = None
        self.fail("08P01", "query_wait_timeout")

    def _link(self, slot: Slot, span: tuple[bytes, bytes] | None = None, now: float = 0.0) -> None:
        server: ServerConnection = slot.conn
        self.slot, self.server = slot, server
        server.client = self
        self.state = _ACTIVE
        wanted = self.session.wanted
        if server.param_sig != self.param_sig or server.applied != wanted:
            sets = ";".join(
                part
                for part in (self._param_sets(server), alignment_sql(server.applied, wanted))
                if part
            )
            server.applied = dict(wanted)
            if sets:
                if span is not None:
                    self.reader.feed(span[0])
                self.state = _LOGIN  # hold client data until the SETs finish
                server.run_internal(sets, self._after_sets)
                return
        if span is not None:
            self._forward_span(span[0], span[1], now)
        else:
            self._forward()

    def _param_sets(self, server: ServerConnection) -> str:
        parts = []
        for name, value in self.params.items():
            if name in TRACKED_PARAMS and server.params.get(name) != value:
                quoted = value.replace("'", "''")
                parts.append(f"SET {name} = '{quoted}'")
        return ";".join(parts)

    def _after_sets(self) -> None:
        if self.server is None or self.state is _CLOSED:
            return
        self.state = _ACTIVE
        self._forward()

    def _forward(self) -> None:
        server = self.server
        assert server is not None
        assert server.transport is not None
        scan = self.reader.scan(stop=b"X")
        if not scan.length:
            return
        types = scan.types
        data = self.reader.take(scan.length)
        if types[-1:] == b"X":
            self._terminate(data, types, scan.last_offset)
            return
        self._forward_span(data, types)

    def _start_transaction(self, data: bytes, types: bytes) -> None:
        """Idle, and whole messages arrived: take a server now if one is idle."""
        pool = self.pool
        assert pool is not None
        if self.proxy.shutting_down or pool.paused:
            self.reader.feed(data)
            self._need_server()
            return
        now = self.request_time = self.last_active
        if self.keeps:  # server affinity: its last server is still linked and idle
            self.keeps = False
            del pool.kept[self]
            pool.lends.acquires += 1  # a lend all the same, for the statistics
            self.state = _ACTIVE
            self._forward_span(data, types, now)
            return
        if pool.waiters:  # others wait already: no server is idle or kept, queue behind
            self._queue(pool, (data, types))
            return
        slot = self._take(pool, now)
        if self.state is _CLOSED:
            return
        if slot is None:
            self._queue(pool, (data, types))
            return
        self._link(slot, (data, types), now)

    def _forward_span(self, data: Any, types: bytes, now: float = 0.0) -> None:
        """Send whole client messages to the linked server, keeping the protocol books
        (``now``: the clock, if the caller just read it)."""
        server = self.server
        assert server is not None
        assert server.transport is not None
        pool = self.pool
        assert pool is not None
        hinted = pool.mode != "session" and session_hint(data)
        if hinted and self._note_session(data, types):
            return  # refused (session_pinning = reject)
        owed = server.outstanding
        if not owed:
            self.busy_since = now or monotonic()
        simple = types == b"Q"
        if simple:  # one simple query: the common case
            server.outstanding = owed + 1
            self.unsynced = False
        else:
            server.outstanding = owed + types.count(b"Q") + types.count(b"S") + types.count(b"F")
            self.unsynced = _unsynced_after(types, self.unsynced)
        pool.counters.bytes_received += len(data)
        if pool.rewrites and (
            hinted  # DISCARD ALL / DEALLOCATE ALL drop the server's statements
            or server.statements.pending
            or (
                not simple
                and _has_extended(types)
                and (self.unsynced or names_statements(bytes(data)))
            )
        ):
            self._forward_rewritten(server, bytes(data), owed)
        else:
            server.transport.write(data)  # nothing to rename: forwarded untouched

    def _forward_rewritten(self, server: ServerConnection, data: bytes, owed: int) -> None:
        """Named prepared statements: map them onto the server's (see prepared.py)."""
        if self.rewriter is None:
            self.rewriter = Rewriter(self.proxy.registry, self.statements)
        assert server.transport is not None
        if not self.unsynced:
            renamed = self.rewriter.renamed_only(server.statements, data)
            if renamed is not None:  # statements the server holds: rename, nothing to track
                server.transport.write(renamed)
                return
        to_server, to_client = self.rewriter.requests(server, data, owed)
        if to_server:
            server.transport.write(to_server)
        if to_client and self.transport is not None:
            self.transport.write(to_client)

    def _terminate(self, data: Any, types: bytes, offset: int) -> None:
        """Terminate: forward what came before it, then close (the server stays pooled)."""
        server = self.server
        if offset and server is not None and server.transport is not None:
            server.outstanding += sum(types[:-1].count(t) for t in _SYNC_POINTS)
            self.unsynced = _unsynced_after(types[:-1], self.unsynced)
            server.transport.write(data[:offset])
        self.close()

    def from_server(
        self, server: ServerConnection, data: Any, types: bytes, ready: bytes | None
    ) -> None:
        """Bytes from our linked server: forward them; release the server when idle."""
        if self.keeps:  # unsolicited, to an idle client: the pool's business, not ours
            self.unkeep()
            server.unsolicited(bytes(data))
            return
        st = server.statements
        if st.pending or st.skip_z:
            data = responses(st, bytes(data))
        transport = self.transport
        if transport is not None:
            transport.write(data)
        pool = self.pool
        assert pool is not None
        counters = pool.counters
        counters.bytes_sent += len(data)
        if _PARAMETER_STATUS in types:
            self._server_params(server, data)
        if ready is None:
            return
        done = types.count(b"Z")
        owed = server.outstanding - done
        server.outstanding = owed
        self.last_active = now = monotonic()
        server.tx_status = ready
        counters.query_count += done
        if owed:
            if owed < 0:
                server.abort("ReadyForQuery without a request: protocol desync")
            return
        if self.unsynced:
            return
        if ready == _TX_IDLE:
            if pool.mode != "session":
                counters.xact_count += 1
                self._transaction_done(server, now)
        elif pool.mode == "statement":
            self.fail("08P01", "transaction blocks not allowed in statement pooling mode")

    def _transaction_done(self, server: ServerConnection, now: float = 0.0) -> None:
        """Transaction mode, server idle: settle session state, then release (or stay)."""
        session = self.session
        if session.reset_all:
            session.forget_all(server.applied)
        if session.pending:
            names = sorted(session.pending)
            session.pending.clear()
            self.state = _LOGIN  # hold client data while we ask the server
            server.run_internal(readback_sql(names), lambda: self._settled(server, names))
            return
        if session.pinned:
            return  # this server connection is the client's until it leaves
        pool = self.pool
        assert pool is not None
        if (
            pool.affinity
            and not pool.waiters
            and not self.reader.buffered
            and not server.cancels  # a late cancel must not meet this client's next query
            and not pool.paused
            and not self.proxy.shutting_down
            and self.slot is not None
            and pool.keepable(self.slot, now or monotonic())
        ):
            self.state = _IDLE
            self.keeps = True  # until someone else needs it: see ServerPool.take_kept
            pool.kept[self] = None
            return
        self._unlink(now)
        if self.reader.buffered:
            self._need_server()
        elif pool.lane is not None:
            pool.lane.admit(self)

    def unkeep(self, now: float = 0.0) -> None:
        """Give back the server this idle client kept (another client, or housekeeping,
        needs the pool to see it)."""
        if self.keeps:
            self._unlink(now)

    def _settled(self, server: ServerConnection, names: list[str]) -> None:
        if server is not self.server or self.state is _CLOSED:
            return
        if server.rows:
            self.session.settle(server.applied, names, server.rows[0])
        self.state = _ACTIVE
        self._transaction_done(server)

    def _note_session(self, data: Any, types: bytes) -> bool:
        """Track SET/RESET and pinning features; True if the request was refused."""
        texts = _query_texts(bytes(data))
        pool = self.pool
        assert pool is not None
        policy = pool.session_pinning
        was_pinned = self.session.pinned
        reason = self.session.inspect(texts, reject=policy == "reject" and _QUERY in types)
        if reason is not None:
            text = (
                f"{reason} needs a dedicated server connection, which transaction pooling "
                "does not give (session_pinning = reject); use session pooling for this client"
            )
            status = self.server.tx_status if self.server is not None else m.TX_IDLE
            self.transport_write(
                m.error_response("ERROR", "0A000", text) + m.ready_for_query(status)
            )
            if self.server is not None and not self.server.outstanding and status == m.TX_IDLE:
                self._transaction_done(self.server)
            return True
        if self.session.pinned and not was_pinned:
            pool.counters.pinned += 1
            log.info("%r pinned to its server connection: %s", self, self.session.pin_reason)
        return False

    def _server_params(self, server: ServerConnection, data: Any) -> None:
        reader = MessageReader()
        reader.feed(bytes(data))
        for msg in reader:
            if msg.type == m.PARAMETER_STATUS:
                status = decode_parameter_status(msg.payload)
                server.params[status.name] = status.value
                if status.name in TRACKED_PARAMS:
                    self.params[status.name] = status.value
        server.param_sig = tuple(server.params.get(n) for n in TRACKED_PARAMS)
        self.param_sig = tuple(self.params.get(n) for n in TRACKED_PARAMS)

    def _unlink(self, now: float = 0.0) -> None:
        server, slot, pool = self.server, self.slot, self.pool
        self.server = self.slot = None
        if self.keeps:
            self.keeps = False
            if pool is not None:
                pool.kept.pop(self, None)
        if self.state is not _CLOSED:
            self.state = _IDLE
        if server is not None:
            server.client = None
            if self.session.pinned:
                server.needs_reset = True  # its session state must not reach anyone else
        if slot is not None and pool is not None:
            if server is not None and server.cancels:
                self.proxy.release_after_cancel(pool, slot)
            else:
                pool.give(slot, None, now)

    def server_lost(self, server: ServerConnection) -> None:
        if server is self.server:
            kept = self.keeps  # it died idle: as in the pool, nothing of ours was lost
            self._unlink()
            if not kept:
                self.fail("08P01", "server conn crashed?")

    # -- errors and the end -------------------------------------------------------

    def transport_write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, code: str, message: str) -> None:
        """Send an error to the client and close its connection (PgBouncer-style)."""
        self.leave_lane()
        if self.proxy.config.settings.log_pooler_errors:
            log.warning(
                "pooler error to %s@%s (%s): %s", self.user, self.database, self.addr, message
            )
        if self.transport is not None and not self.transport.is_closing():
            # after a good login, AuthenticationOk first, as it always came before
            greeting = self.handshake.greeting if self.handshake is not None else b""
            self.transport.write(greeting + m.error_response("FATAL", code, message))
        self.close()

    def close(self) -> None:
        self.leave_lane()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed()

    def _closed(self) -> None:
        if self.state is _CLOSED:
            return
        self.state = _CLOSED
        if self._wait is not None and self.pool is not None:
            self.pool.cancel_wait(self._wait)
            self._wait = None
        if self.server is not None:
            self._unlink()
        if self.session.pinned and self.pool is not None:
            self.pool.counters.pinned -= 1
        self.proxy.client_closed(self)
