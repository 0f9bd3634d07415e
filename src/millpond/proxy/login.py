"""Choosing how each side authenticates: client logins and server logins.

This module maps PgBouncer's settings (auth_type, auth_file, auth_hba_file) onto the
sans-I/O authenticators the client and server connections drive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from millpond.errors import DatabaseUnavailable, ProtocolError
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import decode_authentication

if TYPE_CHECKING:
    from millpond.proxy.config import ProxyConfig
    from millpond.proxy.frontend import ClientConnection


@dataclass(frozen=True, slots=True)
class Step:
    send: bytes = b""
    ok: bool = False
    failed: bool = False
    reason: str = ""


class TrustAuth:
    """No secret asked: the configuration trusts this client."""

    def start(self) -> Step:
        return Step(send=m.authentication_ok(), ok=True)

    def feed(self, kind: bytes, payload: Any) -> Step:
        return Step(failed=True, reason="unexpected message during trust login")


def for_client(config: ProxyConfig, client: ClientConnection) -> Any:
    """The authenticator for a client that asked for ``client.user``@``client.database``."""
    return TrustAuth()


class ServerLogin:
    """Answers PostgreSQL's authentication requests when the proxy logs in."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password

    def feed(self, payload: Any) -> bytes | None:
        auth = decode_authentication(payload)
        if auth.code == 0:
            return None
        raise DatabaseUnavailable(f"server asked for authentication method {auth.code}")


__all__ = ["ProtocolError", "ServerLogin", "Step", "TrustAuth", "for_client"]
