"""A client's way in: its startup packets, authentication, and the welcome.

:class:`ClientHandshake` runs a client connection's login until it is welcomed (then
the connection drops it). ``auth_type`` (or, with ``auth_type = hba``, the first
matching rule of ``auth_hba_file``) picks the method (:func:`for_client`); the secret
comes from ``auth_file``. The sans-I/O exchange itself is
:class:`millpond.proxy.auth.ClientAuthenticator`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from millpond.proxy.auth import (
    AuthOutcome,
    AuthStep,
    ClientAuthenticator,
    error_login_rejected,
    error_no_auth_method,
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

    __slots__ = ("auth", "client", "greeting", "startup")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.startup = StartupReader()
        self.auth: Any = None
        self.greeting = b""  # AuthenticationOk (and SASLFinal), held for the welcome

    def startup_data(self, data: bytes) -> None:
        client = self.client
        self.startup.feed(data)
        packet = self.startup.next_packet()
        if packet is None:
            return
        if isinstance(packet, SSLRequest | GSSENCRequest):
            client.proxy.negotiate_tls(client, isinstance(packet, SSLRequest))
            return
        if isinstance(packet, CancelRequest):
            client.proxy.cancel(packet)
            client.close()
            return
        assert isinstance(packet, StartupMessage)
        rest = self.startup.take_rest()
        if rest:
            client.reader.feed(rest)
        client.proxy.login(client, packet)

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
            self.auth = None
            client.proxy.authenticated(client)

    def welcome(self, server_params: dict[str, str]) -> None:
        """Send the login's answer in one write: AuthenticationOk, the parameters, our own
        cancel key, ReadyForQuery."""
        client = self.client
        params = dict(server_params)
        params.update(client.params)
        for name in TRACKED_PARAMS:
            if name in params:
                client.params.setdefault(name, params[name])
        client.param_sig = tuple(client.params.get(name) for name in TRACKED_PARAMS)
        out = [self.greeting]
        self.greeting = b""
        out.extend(m.parameter_status(k, v) for k, v in params.items())
        out.append(m.backend_key_data(client.pid, client.key))
        out.append(m.ready_for_query(m.TX_IDLE))
        assert client.transport is not None
        client.transport.write(b"".join(out))


class Authenticator(Protocol):
    def start(self) -> AuthStep: ...

    def feed(self, message_type: bytes, payload: Payload) -> AuthStep: ...


class Decided:
    """A login decided before any exchange: let in (``any``) or refuse outright."""

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
        reason = f"auth method {method} is not supported by millpond yet"
        return Decided(AuthStep(AuthOutcome.FAILED, error_login_rejected(), reason))
    entry = config.auth.get(client.user) if config.auth is not None else None
    secret = entry.secret if entry is not None else looked_up
    return ClientAuthenticator(method, client.user, secret, database=client.database)
