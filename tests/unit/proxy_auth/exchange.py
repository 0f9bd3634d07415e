"""Test-side peers for the authenticators: a libpq-like SCRAM client and message helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from millpond.proxy.auth import ClientAuthenticator, scram_keys
from millpond.proxy.auth_server import AuthDone, ServerAuthenticator
from millpond.proxy.protocol import MessageReader
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import (
    Authentication,
    ErrorResponse,
    decode_authentication,
    decode_error_response,
)


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, payload) of each complete message in ``data``; nothing may be left over."""
    reader = MessageReader()
    reader.feed(data)
    found = [(message.type, bytes(message.payload)) for message in reader]
    assert reader.buffered == 0, f"{reader.buffered} stray bytes after the messages"
    return found


def auth_requests(data: bytes) -> list[Authentication]:
    """Decode every message in ``data``, which must all be Authentication requests."""
    found = split(data)
    assert all(kind == m.AUTHENTICATION for kind, _ in found), found
    return [decode_authentication(payload) for _, payload in found]


def error_of(data: bytes) -> ErrorResponse:
    """The one ErrorResponse that ``data`` must hold."""
    ((kind, payload),) = split(data)
    assert kind == m.ERROR_RESPONSE, kind
    return decode_error_response(payload)


def payload_of(message: bytes) -> bytes:
    """The payload of one framed message."""
    ((_, payload),) = split(message)
    return payload


def scram_secret(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """A stored ``SCRAM-SHA-256$...`` secret built by hand, the way PostgreSQL writes it."""
    salt = secrets.token_bytes(16) if salt is None else salt
    stored_key, server_key = scram_keys(password, salt, iterations)
    parts = [base64.b64encode(value).decode() for value in (salt, stored_key, server_key)]
    return f"SCRAM-SHA-256${iterations}:{parts[0]}${parts[1]}:{parts[2]}"


def _attributes(message: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in message.split(","))


@dataclass
class LibpqScram:
    """The client half of SCRAM-SHA-256 as libpq writes it (``n,,n=,r=...``), by hand.

    Kept independent of scramp so that the server side is checked against a second
    implementation of RFC 5802.
    """

    password: str
    gs2_header: str = "n,,"
    nonce: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(18)).decode())
    server_signature: bytes = b""
    bare: str = ""

    def first(self) -> bytes:
        self.bare = f"n=,r={self.nonce}"
        return (self.gs2_header + self.bare).encode()

    def final(self, server_first: bytes, *, nonce: str | None = None) -> bytes:
        attrs = _attributes(server_first.decode())
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        binding = base64.b64encode(self.gs2_header.encode()).decode()
        without_proof = f"c={binding},r={attrs['r'] if nonce is None else nonce}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def round_trip(client: ClientAuthenticator, server: ServerAuthenticator) -> AuthDone | None:
    """Let the proxy's two authenticators talk; AuthDone if the login went through.

    Raises whatever the server side raises; returns ``None`` when the client side
    refused (``client.state`` says so).
    """
    to_server = client.start().send
    while True:
        step = None
        for kind, payload in split(to_server):
            if kind == m.ERROR_RESPONSE:
                return None
            reply = server.feed(payload)
            if isinstance(reply, AuthDone):
                return reply
            if reply is not None:
                ((reply_kind, reply_payload),) = split(reply)
                step = client.feed(reply_kind, reply_payload)
        assert step is not None, "the server side had nothing to answer"
        to_server = step.send
