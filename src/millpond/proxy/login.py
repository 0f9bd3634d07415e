"""A client's way in: its startup packets, authentication, and the welcome.

:class:`ClientHandshake` runs a client connection's login until it is welcomed (then
the connection drops it). ``auth_type`` (or, with ``auth_type = hba``, the first
matching rule of ``auth_hba_file``) picks the method (:func:`for_client`); the secret
comes from ``auth_file``. The sans-I/O exchange itself is
:class:`millpond.proxy.auth.ClientAuthenticator`.
"""

from __future__ import annotations

import logging
import pwd
import socket
import struct
from typing import TYPE_CHECKING, Any, Protocol

from millpond.proxy.auth import (
    CLIENT_METHODS,
    AuthOutcome,
    AuthStep,
    ClientAuthenticator,
    error_no_auth_method,
    pooler_error,
)
from millpond.proxy.backend import TRACKED_PARAMS
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.codec import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
)
from millpond.proxy.protocol.parsers import Payload

if TYPE_CHECKING:
    from millpond.proxy.authfile import ConnType
    from millpond.proxy.config import ProxyConfig
    from millpond.proxy.frontend import ClientConnection


log = logging.getLogger("millpond.proxy")


class ClientHandshake:
    """A client connection's login: SSLRequest/GSSENCRequest or CancelRequest, then the
    StartupMessage, the authentication exchange, and the welcome."""

    __slots__ = ("auth", "client", "greeting", "raw", "startup")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.startup = StartupReader()
        self.auth: Any = None
        self.greeting = b""  # AuthenticationOk (and SASLFinal), held for the welcome
        self.raw: bytes | None = None  # the StartupMessage as it came, when whole (door.py)

    def startup_data(self, data: bytes) -> None:
        client = self.client
        packet = self.startup.read(data)
        if packet is None:
            return
        kind = type(packet)
        if kind is StartupMessage:
            assert isinstance(packet, StartupMessage)
            rest = self.startup.take_rest()
            if rest:
                client.reader.feed(rest)
            elif type(data) is bytes and int.from_bytes(data[:4], "big") == len(data):
                self.raw = data
            client.proxy.login(client, packet)
        elif kind is SSLRequest or kind is GSSENCRequest:
            client.proxy.negotiate_tls(client, kind is SSLRequest)
        else:
            assert isinstance(packet, CancelRequest)
            client.proxy.cancel(packet)
            client.close()

    def start_auth(self, authenticator: Any) -> None:
        self.auth = authenticator
        self._apply(authenticator.start())

    def auth_data(self) -> None:
        """Feed the authenticator what the client sent, until it decides."""
        reader = self.client.reader
        while self.auth is not None:
            msg = reader.next_message()
            if msg is None:
                return
            self._apply(self.auth.feed(msg.type, msg.payload))

    def _apply(self, step: Any) -> None:
        client = self.client
        if step.ok:
            self.greeting = step.send  # AuthenticationOk goes out with the welcome
        elif step.send and client.transport is not None:
            client.transport.write(step.send)
        if step.failed:
            self.auth = None
            log.warning(
                "login failed for %s@%s from %s: %s",
                client.user,
                client.database,
                client.addr,
                step.reason,
            )
            client.proxy.stats_login_failed(client)
            client.close()
        elif step.ok:
            keys = self.auth.scram_keys
            if keys is not None:  # for the server login as this user (SCRAM pass-through)
                client.proxy.scram_keys[client.user] = keys
            self.auth = None
            client.proxy.authenticated(client)

    def welcome(self, server_params: dict[str, str]) -> bytes:
        """Send the login's answer in one write: AuthenticationOk, the parameters, our own
        cancel key, ReadyForQuery. Returns what came before the cancel key."""
        client = self.client
        key = (tuple(server_params.items()), tuple(client.params.items()))
        known = _WELCOMES.get(key)
        if known is None:
            known = _welcome_parts(server_params, client.params)
            if len(_WELCOMES) >= _WELCOMES_KEPT:
                _WELCOMES.clear()
            _WELCOMES[key] = known
        statuses, defaults, client.param_sig = known
        if defaults:
            client.params.update(defaults)
        greeting, self.greeting = self.greeting, b""
        assert client.transport is not None
        before = greeting + statuses
        client.transport.write(before + m.backend_key_data(client.pid, client.key) + _READY_IDLE)
        return before


#: The parameter part of recent welcomes, by (server parameters, client parameters):
#: every client with the same startup parameters on the same pool gets the same bytes.
_WELCOMES: dict[tuple[Any, ...], tuple[bytes, dict[str, str], tuple[str | None, ...]]] = {}
_WELCOMES_KEPT = 256
_READY_IDLE = m.ready_for_query(m.TX_IDLE)


def _welcome_parts(
    server_params: dict[str, str], client_params: dict[str, str]
) -> tuple[bytes, dict[str, str], tuple[str | None, ...]]:
    """The ParameterStatus messages a client is welcomed with (the server's parameters,
    overridden by what the client asked for), the tracked parameters it did not set
    (it takes the server's), and its parameter signature."""
    params = dict(server_params)
    params.update(client_params)
    defaults = {
        name: params[name]
        for name in TRACKED_PARAMS
        if name in params and name not in client_params
    }
    signature = tuple(client_params.get(name, defaults.get(name)) for name in TRACKED_PARAMS)
    statuses = b"".join(m.parameter_status(k, v) for k, v in params.items())
    return statuses, defaults, signature


class Authenticator(Protocol):
    #: after a SCRAM login checked against a stored SCRAM secret, its ClientKey and
    #: ServerKey (for SCRAM pass-through); None otherwise
    scram_keys: tuple[bytes, bytes] | None

    def start(self) -> AuthStep: ...

    def feed(self, message_type: bytes, payload: Payload) -> AuthStep: ...


class Decided:
    """A login decided before any exchange: let in (``any``) or refuse outright."""

    scram_keys: tuple[bytes, bytes] | None = None  # no SCRAM exchange, nothing to pass on

    def __init__(self, step: AuthStep) -> None:
        self._step = step

    def start(self) -> AuthStep:
        return self._step

    def feed(self, message_type: bytes, payload: Payload) -> AuthStep:
        return AuthStep(AuthOutcome.FAILED, b"", "no message expected")


def _hba_method(config: ProxyConfig, client: ClientConnection) -> str | None:
    if config.hba is None:
        return None
    conn_type: ConnType = "local"
    if client.addr != "unix":
        conn_type = "hostssl" if client.tls else "hostnossl"
    return config.hba.match(conn_type, client.database, client.user, _address(client))


def peer_uid(client: ClientConnection) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), else None."""
    transport = client.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError, TypeError):
        return None
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def _peer_name(client: ClientConnection) -> str | None:
    uid = peer_uid(client)
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _cert_names(client: ClientConnection) -> tuple[str, ...]:
    """The CommonName(s) of the client's verified TLS certificate (empty: none)."""
    transport = client.transport
    cert = transport.get_extra_info("peercert") if client.tls and transport is not None else None
    if not cert:
        return ()
    return tuple(v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName")


def _refused(text: str, reason: str) -> Decided:
    return Decided(AuthStep(AuthOutcome.FAILED, pooler_error(text), reason))


def _by_identity(method: str, config: ProxyConfig, client: ClientConnection) -> Decided:
    """``peer`` and ``cert``: the operating system or the TLS layer vouches for the user
    (who must still be in ``auth_file`` when one is set); PgBouncer's error texts."""
    known = config.auth is None or config.auth.get(client.user) is not None
    if method == "peer":
        name = _peer_name(client)
        if known and name == client.user:
            return Decided(AuthStep(AuthOutcome.OK, m.authentication_ok()))
        why = "not a Unix socket" if name is None else f"peer is {name!r}"
        return _refused("unix socket login rejected", f"peer authentication failed: {why}")
    names = _cert_names(client)
    if known and client.user in names:
        return Decided(AuthStep(AuthOutcome.OK, m.authentication_ok()))
    why = f"certificate names {list(names)}" if names else "no verified client certificate"
    return _refused("certificate authentication failed", f"cert authentication failed: {why}")


def _address(client: ClientConnection) -> str | None:
    return client.addr[0] if isinstance(client.addr, tuple) else None


def auth_query_target(config: ProxyConfig, client: ClientConnection) -> tuple[str, str] | None:
    """(database, auth_user) to run auth_query on, when the auth file lacks the user."""
    if config.auth is not None and config.auth.get(client.user) is not None:
        return None
    if config.settings.auth_type in ("trust", "any", "cert", "peer"):
        return None
    db = config.database(client.database)
    if db is None:
        return None
    auth_user = db.auth_user or config.settings.auth_user
    if not auth_user:
        return None
    return (db.auth_dbname or config.settings.auth_dbname or client.database, auth_user)


def for_client(
    config: ProxyConfig, client: ClientConnection, *, looked_up: str | None = None
) -> Authenticator:
    """The authenticator for ``client.user`` logging in to ``client.database``.

    ``looked_up`` is the secret auth_query found, when the auth file had none.
    """
    method: str = config.settings.auth_type
    if method == "hba":
        found = _hba_method(config, client)
        if found is None:
            return Decided(AuthStep(AuthOutcome.FAILED, error_no_auth_method(), "no hba rule"))
        method = found
    if method == "any" or (method == "trust" and config.auth is None):
        return Decided(AuthStep(AuthOutcome.OK, m.authentication_ok()))
    if method in ("cert", "peer"):
        return _by_identity(method, config, client)
    if method not in CLIENT_METHODS:  # pam, ldap: PgBouncer's, not millpond's
        return _refused("login rejected", f"auth method {method} is not supported by millpond")
    entry = config.auth.get(client.user) if config.auth is not None else None
    secret = entry.secret if entry is not None else looked_up
    return ClientAuthenticator(method, client.user, secret, database=client.database)
