"""Choosing how each client authenticates, from PgBouncer's settings.

``auth_type`` (or, with ``auth_type = hba``, the first matching rule of
``auth_hba_file``) picks the method; the secret comes from ``auth_file``. The
sans-I/O exchange itself is :class:`millpond.proxy.auth.ClientAuthenticator`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from millpond.proxy.auth import (
    AuthOutcome,
    AuthStep,
    ClientAuthenticator,
    error_login_rejected,
    error_no_auth_method,
)
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import Payload

if TYPE_CHECKING:
    from millpond.proxy.authfile import ConnType
    from millpond.proxy.config import ProxyConfig
    from millpond.proxy.frontend import ClientConnection


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
