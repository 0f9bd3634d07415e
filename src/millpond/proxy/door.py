"""The door: the proxy's listening sockets, accepted in C, and repeat logins answered there.

docs/proxy-data-path.md (stage 4) has the why: a client that connects for every
transaction (``pgbench -C``) spends most of its cost in the login, and a Python
Protocol per connection costs more than PgBouncer spends on the whole connection. So
when the settings allow it (:func:`wanted`), the proxy's listening sockets are watched
by a compiled :class:`~millpond.proxy._lane.Door` rather than by uvloop's servers:

- **Every connection is accepted in C.** Its SSLRequest is refused there ('N', as the
  Python path does without ``client_tls_*``) and its StartupMessage is looked up, byte
  for byte, among the logins the door has *learned*: a startup packet the Python path
  let in before, with ``auth_type`` trust (or any), on a pool whose compiled lane the
  client then entered. When found, the door sends the same welcome (AuthenticationOk,
  the ParameterStatus set, a BackendKeyData of its own, ReadyForQuery) and the client
  enters that lane as a *guest*: a client with no Python object. A guest that sends
  Terminate or closes while it holds no server is closed in C.
- **Everything else is the Python path's.** An unknown startup packet, a partial one, a
  CancelRequest, GSSENCRequest, anything malformed, the door at its share of
  ``max_client_conn``: the socket is handed over (:meth:`ProxyDoor._handed`) with the
  bytes read so far and becomes an ordinary :class:`ClientConnection`, which logs in
  as any other. A guest the lane ejects (a message the lane does not forward, a
  timeout, an admin command, pause, a cancel request naming it...) is *adopted*
  (:meth:`ProxyDoor.adopt`): it gets its Python object at once, with the login the door
  gave it, and a stand-in transport (:class:`StandIn`) that keeps what is written to
  it until uvloop's transport for the socket is made (one turn of the loop later).
- **What the door has learned is forgotten** when the lane it sends guests to closes
  (pause, reload, reconnect, any admin command), on reload, and when the pool's server
  parameters change (the sweep compares).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from millpond.proxy.lane import AVAILABLE

try:
    from millpond.proxy import _lane
except ImportError:  # not built: wanted() says no
    _lane = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from millpond.proxy._lane import Door, Guest
    from millpond.proxy.config import ProxySettings
    from millpond.proxy.frontend import ClientConnection
    from millpond.proxy.pools import ServerPool
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.proxy")

#: Startup packets remembered at most (then the door starts learning again).
LOGINS_KEPT = 256


def wanted(s: ProxySettings, client_tls: Any) -> bool:
    """May logins be answered in C with these settings? (Trust only: the door checks no
    password; no per-login logging; no client TLS; nothing in the welcome that depends
    on the client's address.)"""
    return bool(
        AVAILABLE
        and s.fast_lane
        and s.auth_type in ("trust", "any")
        and not s.log_connections
        and not s.log_disconnections
        and not s.application_name_add_host
        and client_tls is None
    )


@dataclass(frozen=True, slots=True)
class LoginInfo:
    """What the proxy needs to take over a guest: the login the door gave it."""

    user: str
    database: str
    pool: ServerPool
    params: dict[str, str]
    param_sig: tuple[str | None, ...]
    server_params: dict[str, str]  # what the welcome was made from


class StandIn:
    """The transport of an adopted guest until uvloop's is made: keeps what is written
    and whether it was closed, and hands both on (:meth:`attach`)."""

    __slots__ = ("aborted", "buffer", "closing", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer: list[bytes] = []
        self.closing = self.aborted = False

    def write(self, data: Any) -> None:
        self.buffer.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def pause_reading(self) -> None:
        pass  # nothing reads it yet; the client pauses again at its next read if need be

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.buffer))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        try:
            if name == "socket":
                return self.sock
            if name == "peername":
                return self.sock.getpeername()
            if name == "sockname":
                return self.sock.getsockname()
        except OSError:
            pass
        return default

    def attach(self, client: ClientConnection, transport: asyncio.Transport) -> None:
        """uvloop's transport is made: what the client wrote meanwhile goes first."""
        if self.buffer:
            transport.write(b"".join(self.buffer))
            self.buffer.clear()
        if self.aborted:
            transport.abort()
        elif self.closing:
            transport.close()


class Arrival:
    """The stand-in of a connection the door handed over before any login: once its
    transport is made, the client opens as any other and reads what the door read."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def attach(self, client: ClientConnection, transport: asyncio.Transport) -> None:
        client.addr = transport.get_extra_info("peername") or "unix"
        client.proxy.client_opened(client)
        if self.data:
            client.data_received(self.data)


class Listening:
    """A listening socket the door accepts on, where the proxy keeps its servers."""

    def __init__(self, door: ProxyDoor, sockets: list[socket.socket]) -> None:
        self.door = door
        self.sockets = sockets

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.door.door.unlisten(sock.fileno())
                sock.close()


class ProxyDoor:
    """The proxy's side of the compiled Door."""

    def __init__(self, proxy: Proxy) -> None:
        assert _lane is not None
        self.proxy = proxy
        self.door: Door = _lane.Door(asyncio.get_running_loop(), self._handed)
        self.door.refuse_ssl = True
        self.counted = 0  # door logins already in proxy.login_stats

    # -- listening ------------------------------------------------------------------

    def listen_tcp(self, host: str | None, port: int, backlog: int, reuse_port: bool) -> Listening:
        """Bound and listening, as ``loop.create_server`` would (one socket per address)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        made: list[socket.socket] = []
        try:
            for family, _kind, _proto, _name, addr in dict.fromkeys(infos):
                made.append(
                    socket.create_server(
                        addr, family=family, backlog=backlog, reuse_port=reuse_port
                    )
                )
        except BaseException:
            for sock in made:
                sock.close()
            raise
        for sock in made:
            sock.setblocking(False)
            self.door.listen(sock.fileno(), True)
        return Listening(self, made)

    def listen_unix(self, path: str, backlog: int) -> Listening:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.door.listen(sock.fileno(), False)
        return Listening(self, [sock])

    # -- the Python path takes over -------------------------------------------------

    def _handed(self, fd: int, data: bytes, connect_time: float, guest: Guest | None) -> None:
        """A connection for the Python path: a login the door does not know (``data``
        is what it read), or a guest welcomed that its lane could not take."""
        if guest is not None:
            self.adopt(guest)
            return
        from millpond.proxy.frontend import ClientConnection

        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            _close_fd(fd)
            return
        client = ClientConnection(self.proxy)
        client.connect_time = client.last_active = connect_time
        client.transport = cast(Any, Arrival(data))
        self._connect(client, sock)

    def adopt(self, guest: Guest) -> ClientConnection:
        """The Python object of a guest leaving the lane, logged in as the door let it."""
        from millpond.proxy.frontend import ClientConnection, ClientState

        info: LoginInfo = guest.login.info
        client = ClientConnection(self.proxy)
        client.user, client.database, client.pool = info.user, info.database, info.pool
        client.params = dict(info.params)
        client.param_sig = info.param_sig
        client.pid, client.key = guest.pid, guest.key_bytes
        client.handshake = None
        client.welcomed = True
        client.state = ClientState.IDLE
        client.connect_time = guest.connect_time
        side = guest.side
        client.last_active = side.last_active if side is not None else monotonic()
        sock = socket.socket(fileno=guest.fd)
        client.connection_made(cast(Any, StandIn(sock)))
        self.proxy.by_key[(client.pid, client.key)] = client
        client.lane_side = side
        self._connect(client, sock)
        return client

    def _connect(self, client: ClientConnection, sock: socket.socket) -> None:
        """uvloop's transport for the socket (the client's connection_made attaches it)."""

        async def connect() -> None:
            loop = asyncio.get_running_loop()
            try:
                await loop.connect_accepted_socket(lambda: client, sock)
            except Exception as exc:  # the socket went bad: as if it had closed
                log.info("could not take over a connection from the door: %s", exc)
                sock.close()
                client._closed()

        self.proxy.janitor.spawn(connect(), "door")

    # -- learning -------------------------------------------------------------------

    def learn(
        self, client: ClientConnection, packet: bytes, welcome: bytes, server: dict[str, str]
    ) -> None:
        """A client that logged in with ``packet`` and entered its pool's lane: the
        next with the same packet may be let in by the door."""
        proxy = self.proxy
        pool = client.pool
        pool_lane = pool.lane if pool is not None else None
        lane = pool_lane.lane if pool_lane is not None else None
        if (
            lane is None
            or pool is None
            or client.tls
            or client.admin is not None
            or not wanted(proxy.config.settings, proxy.client_tls)
        ):
            return
        logins = self.door.logins
        if len(logins) >= LOGINS_KEPT:
            logins.clear()
        info = LoginInfo(
            client.user, client.database, pool, dict(client.params), client.param_sig, dict(server)
        )
        with contextlib.suppress(ValueError):  # a welcome too long for the door: Python's
            logins[packet] = _lane.Login(lane, welcome, info)

    def forget(self) -> None:
        self.door.logins.clear()

    def forget_lane(self, lane: Any) -> None:
        self.door.forget_lane(lane)

    # -- housekeeping ---------------------------------------------------------------

    def find(self, pid: int, key: bytes) -> Guest | None:
        return self.door.find(pid, key)

    @property
    def guests(self) -> int:
        return int(self.door.guests)

    def set_limit(self, max_client_conn: int, python_clients: int) -> None:
        self.door.limit = (max_client_conn - python_clients) if max_client_conn else 1 << 62

    def fold(self) -> None:
        """Logins the door welcomed, into the proxy's count."""
        welcomed = self.door.welcomed
        self.proxy.login_stats.logins += welcomed - self.counted
        self.counted = welcomed

    def sweep(self, s: ProxySettings, now: float) -> None:
        self.fold()
        if s.client_login_timeout:
            self.door.expire(now - s.client_login_timeout)
        for packet, login in list(self.door.logins.items()):
            info: LoginInfo = login.info
            if info.pool.server_driver.welcome != info.server_params or login.lane.closed:
                self.door.logins.pop(packet, None)

    def close(self) -> None:
        self.door.close()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
