"""The compiled lane in the proxy: who enters it, what it borrows, how they leave.

docs/proxy-data-path.md has the why. Each transaction-mode pool gets a
:class:`PoolLane`, the Python side of one ``_lane.Lane``:

- **Clients enter** when the Python path has nothing for them: logged in, idle, nothing
  buffered either way, no session state of their own (no SET kept, not pinned), plain
  TCP or Unix socket, the pool neither paused nor shutting down, and the same tracked
  parameters as the lane's first client (so any server of the lane suits any client).
  They enter after their login and after every transaction the Python path finishes.
- **Servers are borrowed** from the pool core, as leases: when a client queues in the
  lane and no server is free there, the lane asks (``on_want``); a server idle in the
  core is lent at once, else the lane waits in the core's queue like any client. A
  server whose parameters differ from the lane's is not lent: it goes back, and a
  queued client leaves the lane to take it on the Python path, which aligns it.
- **Leases end** by the twice-a-second sweep (idle servers go back to the core, whose
  lifetimes, idle timeouts and checks then apply; busy ones due to retire are ejected),
  when a Python-path client of the same pool must wait (the lane gives back a server at
  its next release: ``owed_back``), or takes one (a free one is given back at once), and
  on every eject.
- **Anything Python does to a client or server in the lane ejects it first**: close,
  fail, a cancel request, an admin command, pause, reload, reconnect, shutdown, a timeout
  due by the lane's clocks. The eject handler rebuilds the Python state (the link, the
  server's outstanding answers and transaction status, the clocks), writes what each
  side is owed, resumes both transports, and feeds what the lane read and did not
  forward to the Python path: not a byte is lost or reordered, and the Python path, the
  reference, decides from there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from millpond.errors import PoolClosed
from millpond.pool.core import Release
from millpond.pool.state import Slot
from millpond.proxy.backend import ServerConnection
from millpond.proxy.pools import DirectWaiter
from millpond.proxy.protocol import messages as m

try:
    from millpond.proxy import _lane
except ImportError:  # the extension is not built: the Python path serves everything
    _lane = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from millpond.proxy._lane import Guest, Lane, Side
    from millpond.proxy.config import ProxySettings
    from millpond.proxy.frontend import ClientConnection
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.proxy")

#: Is the compiled lane built?
AVAILABLE = _lane is not None

#: What the lane forwards: simple Query from clients (Terminate, the extended protocol,
#: COPY data... are the Python path's); from servers, what answers a simple Query
#: (RowDescription, DataRow, CommandComplete, EmptyQueryResponse, ErrorResponse,
#: NoticeResponse, ReadyForQuery). ParameterStatus, COPY, notifications: Python's.
CLIENT_TYPES = b"Q"
SERVER_TYPES = b"TDCIENZ"

#: Longer messages are the Python path's (a queued client sending more is not read).
MAX_MESSAGE = 65536

REFUSED = _lane.REFUSED if _lane is not None else "refused"
_GUEST = _lane.Guest if _lane is not None else None

_STATUS = {c: bytes([c]) for c in b"IETX"}


def _fileno(transport: Any) -> int:
    return int(transport.get_extra_info("socket").fileno())


def _resume(transport: Any) -> None:
    if transport is not None and not transport.is_closing():
        transport.resume_reading()


class PoolLane:
    """The lane of one server pool."""

    def __init__(self, proxy: Proxy, pool: ServerPool) -> None:
        self.proxy = proxy
        self.pool = pool
        self.lane: Lane | None = None  # opened by the first client that enters
        self.sig: tuple[str | None, ...] = ()  # the tracked parameters of its clients
        self.params: dict[str, str] = {}
        self.lent: dict[ServerConnection, Slot] = {}  # servers borrowed from the core
        self.ask: DirectWaiter | None = None  # waiting in the core's queue
        self._ask_handle: Any = None
        self.folded = (0, 0, 0, 0, 0.0, 0.0, 0.0)  # the lane's counters already counted

    def __repr__(self) -> str:
        lane = self.lane
        size = len(lane) if lane is not None else 0
        return f"<PoolLane {self.pool.name} sockets={size} lent={len(self.lent)}>"

    # -- entering -------------------------------------------------------------------

    def admit(self, client: ClientConnection) -> bool:
        """An idle client enters the lane if nothing keeps it on the Python path."""
        transport = client.transport
        session = client.session
        if client.lane_skip:  # the lane refused it lately: see _ejected
            client.lane_skip -= 1
            return False
        if (
            client.tls
            or client.server is not None
            or client.reader.buffered
            or client._wait is not None
            or client.lane_side is not None
            or session.wanted
            or session.pinned
            or session.pending
            or session.reset_all
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or not transport.is_reading()  # paused, or a door.StandIn: not ours to read
            or self.pool.paused
            or self.proxy.shutting_down
        ):
            return False
        lane = self.lane
        if lane is None:
            lane = self._open(client)
        elif client.param_sig != self.sig:
            return False
        fd = _fileno(transport)
        transport.pause_reading()
        try:
            side = lane.add_client(client, fd)
        except OSError:
            transport.resume_reading()
            return False
        client.lane_side = side
        return True

    def _open(self, client: ClientConnection) -> Lane:
        assert _lane is not None
        self.lane = lane = _lane.Lane(
            asyncio.get_running_loop(),
            self._ejected,
            CLIENT_TYPES,
            SERVER_TYPES,
            session_check=True,
            max_message=MAX_MESSAGE,
            on_want=self._want,
        )
        self.sig = client.param_sig
        self.params = dict(client.params)
        self.folded = (0, 0, 0, 0, 0.0, 0.0, 0.0)
        return lane

    # -- borrowing servers ----------------------------------------------------------

    def _want(self) -> None:
        """The lane queued a client and has no free server: lend what we can."""
        self._ask()

    def _ask(self) -> None:
        lane = self.lane
        while lane is not None and lane.queue_length and self.ask is None:
            try:
                slot = self.pool.take()
            except PoolClosed:
                break
            if slot is None:  # wait in the core's queue, as a client would
                ask = self.ask = DirectWaiter(self._handed, self._refused)
                try:
                    handle = self.pool.wait(ask, own=True)
                except PoolClosed:
                    self.ask = None
                    break
                if not ask.done():
                    self._ask_handle = handle
                return
            self._lend(slot)
            lane = self.lane
        if lane is not None:
            lane.asking = self.ask is not None  # else on_want when the next one queues

    def _handed(self, slot: Slot) -> None:
        self.ask = self._ask_handle = None
        self._lend(slot)
        self._ask()

    def _refused(self, exc: BaseException) -> None:
        """The core could not serve us (the pool closed, it cannot connect): the queued
        clients wait on the Python path, which tells them."""
        self.ask = self._ask_handle = None
        lane = self.lane
        if lane is not None:
            lane.asking = False
            self._eject_queued()

    def _eject_queued(self, count: int = -1) -> None:
        """Up to ``count`` queued clients (all if negative) to the Python path."""
        lane = self.lane
        if lane is None:
            return
        for side in lane.sides():
            if not count:
                return
            if side.queued:
                lane.eject(side)
                count -= 1

    def _stop_asking(self) -> None:
        if self._ask_handle is not None:
            self.pool.cancel_wait(self._ask_handle)  # nothing will be handed to it
        self.ask = self._ask_handle = None
        if self.lane is not None:
            self.lane.asking = False

    def _lend(self, slot: Slot) -> None:
        server: ServerConnection = slot.conn
        lane = self.lane
        transport = server.transport
        if (
            lane is None
            or lane.closed
            or not lane.queue_length
            or self.pool.server_driver.verdict(server) is not Release.CLEAN
            or transport is None  # (verdict said no already: for the type checker)
            or transport.get_write_buffer_size()
            or server.statements.skip_z
            or server.cancels
            or server.client is not None
        ):
            self.pool.give(slot)
            return
        if transport.get_extra_info("ssl_object") is not None:
            # the server said yes to TLS (server_tls_sslmode = prefer): this pool's
            # servers are the Python path's
            self.pool.give(slot)
            self.pool.lane = None
            self.close()
            return
        if server.applied or any(server.params.get(k) != v for k, v in self.params.items()):
            # not set up as the lane's clients expect: the Python path aligns it for a
            # queued client, and the lane may borrow it once it is back
            self.pool.give(slot)
            self._eject_queued(1)
            return
        fd = _fileno(transport)
        transport.pause_reading()
        self.lent[server] = slot
        server.lane = self
        side = lane.add_server(server, fd)  # serves the first queued client at once
        if side.active:
            server.lane_side = side

    def reclaim(self) -> bool:
        """A Python-path client found no idle server: give one back if the lane has
        one free (True if it did)."""
        lane = self.lane
        if lane is None or not lane.free_servers:
            return False
        if not lane.queue_length:
            self._stop_asking()  # the server must reach the taker, not come back
        return lane.give_back(1) > 0

    def owe(self) -> None:
        """Someone on the Python path waits in the core: servers go back to it as they
        are released (``owed_back``), rather than to the lane's own queue."""
        lane = self.lane
        if lane is not None and self.lent:
            waiting = self.pool._core.waiting() - (self.ask is not None)
            lane.owed_back = max(0, waiting)

    # -- leaving --------------------------------------------------------------------

    def leave(self, side: Side) -> None:
        """``side`` (with its linked peer) out of the lane now."""
        lane = self.lane
        if lane is not None and side.active:
            lane.eject(side)

    def _ejected(
        self,
        client: ClientConnection | None,
        client_unread: bytes,
        client_owed: bytes,
        server: ServerConnection | None,
        server_unread: bytes,
        server_owed: bytes,
        outstanding: int,
        reason: str,
    ) -> None:
        """The lane let go of a client, a server, or a linked pair: the Python path
        takes over from exactly where the lane stopped."""
        from millpond.proxy.frontend import ClientState

        if client is not None and type(client) is _GUEST:  # type: ignore[comparison-overlap]
            door = self.proxy.door  # a guest of the door's: Python's from now on
            assert door is not None
            client = door.adopt(cast("Guest", client))
        slot = server_side = None
        if server is not None:
            server_side, server.lane_side, server.lane = server.lane_side, None, None
            slot = self.lent.pop(server, None)
            server.outstanding = outstanding
            if server_side is not None:
                server.tx_status = _STATUS.get(server_side.status, m.TX_IDLE)
        if client is not None:
            side, client.lane_side = client.lane_side, None
            if side is not None:
                client.last_active = side.last_active
                if reason == REFUSED:  # extended protocol, COPY...: try the lane less often
                    used = side.messages_forwarded > 0
                    client.lane_backoff = 0 if used else min(2 * client.lane_backoff or 1, 64)
                    client.lane_skip = client.lane_backoff
            if server is not None:  # linked in the middle of a transaction
                client.server, client.slot, client.state = server, slot, ClientState.ACTIVE
                server.client = client
                busy = server_side.busy_since if server_side is not None else 0.0
                client.busy_since = busy or client.last_active
                client.unsynced = False
        if client is not None and client_owed and client.transport is not None:
            client.transport.write(client_owed)
        if server is not None:
            if server_owed and server.transport is not None:
                server.transport.write(server_owed)
            _resume(server.transport)
        if client is not None:
            _resume(client.transport)
            if client_unread and client.state is not ClientState.CLOSED:
                client.data_received(client_unread)  # its requests first: they came first
        if server is not None:
            if server_unread:
                server.data_received(server_unread)
            if client is None and slot is not None:
                self.pool.give(slot)  # back to the core (its verdict judges it)
            elif slot is None:
                server.abort("left the lane without its lease")
        self.owe()

    # -- housekeeping ---------------------------------------------------------------

    def fold(self) -> None:
        """The lane's counters into the pool's (SHOW STATS, the metrics)."""
        lane = self.lane
        if lane is None:
            return
        now = (
            lane.transactions,
            lane.queries,
            lane.client_bytes,
            lane.server_bytes,
            lane.xact_time,
            lane.query_time,
            lane.wait_time,
        )
        was, self.folded = self.folded, now
        c = self.pool.counters
        xacts = now[0] - was[0]
        c.xact_count += xacts
        self.pool.lends.acquires += xacts  # each one a server assignment
        c.query_count += now[1] - was[1]
        c.bytes_received += now[2] - was[2]
        c.bytes_sent += now[3] - was[3]
        c.xact_time += now[4] - was[4]
        c.query_time += now[5] - was[5]
        c.wait_time += now[6] - was[6]

    def sweep(self, now: float) -> None:
        """Twice a second: counters folded, idle servers back to the core, busy ones
        due to retire out of the lane (their transaction ends on the Python path)."""
        lane = self.lane
        if lane is None:
            return
        self.fold()
        s = self.proxy.config.settings
        for side in lane.sides():  # guests: Python's sweep sees clients only
            if side.guest and side.active and due(side, s, self.pool, now):
                lane.eject(side)
        # out of the core's queue: the next client to queue asks again, so the core
        # never sees the lane as one waiter older than reserve_pool_timeout
        self._stop_asking()
        lane.give_back()
        for server, slot in list(self.lent.items()):
            side = server.lane_side
            if side is not None and not self.pool.keepable(slot, now):
                lane.eject(side)
        self._ask()  # for the clients queued now, with a fresh place in the queue
        self.owe()

    def close(self) -> None:
        """Everything out of the lane (pause, reload, reconnect, admin, shutdown); the
        next client to enter opens a new one."""
        lane = self.lane
        if lane is None:
            return
        self.fold()
        self._stop_asking()
        if self.proxy.door is not None:
            self.proxy.door.forget_lane(lane)  # before its guests come out as clients
        lane.close()
        self.lane = None
        self.lent.clear()


def due(side: Side, s: ProxySettings, pool: ServerPool, now: float) -> bool:
    """Might a timeout apply to this lane client, or has it waited long enough for the
    reserve pool? (Then the sweep ejects it, and the Python path decides, with the
    clocks the eject handed over.)"""
    if side.queued:
        limit = pool.config.acquire_timeout  # query_wait_timeout
        if pool.reserve:
            limit = min(limit, pool.reserve_timeout)
        return now - side.queued_since > limit
    peer = side.peer
    if peer is None:
        limit = s.client_idle_timeout
        return bool(limit) and now - side.last_active > limit
    if peer.outstanding:
        limit = s.query_timeout
        return bool(limit) and now - peer.busy_since > limit
    limit = s.idle_transaction_timeout
    return bool(limit) and now - side.last_active > limit
