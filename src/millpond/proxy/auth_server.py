"""Sans-I/O login of the proxy to PostgreSQL: answer whatever Authentication* the server asks.

:class:`ServerAuthenticator` is fed the payload of each Authentication ('R') message the
server sends during startup and returns what to write back (``bytes``), ``None`` when
nothing is owed (after AuthenticationSASLFinal, AuthenticationOk comes next), or
:class:`AuthDone` at AuthenticationOk. ErrorResponse and the messages after
AuthenticationOk are the caller's business.

It answers cleartext (needs the plain-text password), MD5 (the plain-text password, or a
stored ``md5...`` hash, since the server only checks md5(hash + salt)) and SCRAM-SHA-256
(the plain-text password; the client side is scramp's, and the server's final signature is
checked, so a server that does not know the password cannot pretend to accept it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, cast

from scramp import ScramClient, ScramException  # type: ignore[import-untyped]

from millpond.errors import DatabaseUnavailable, ProtocolError
from millpond.proxy.auth import (
    SCRAM_SHA_256,
    md5_password_hash,
    md5_salted_response,
    secret_kind,
)
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.messages import AuthCode
from millpond.proxy.protocol.parsers import Authentication, Payload, decode_authentication


class ServerAuthError(DatabaseUnavailable):
    """PostgreSQL asked for a login the proxy cannot give, or failed to prove itself.

    For the pool this is one more way the database cannot be reached, hence the base.

    Raised for an unsupported method (GSSAPI, SSPI, Kerberos V5), a request the stored
    secret cannot answer (cleartext with only a hash, SCRAM with only an MD5 hash or a
    SCRAM secret) and a SCRAM exchange that fails on the server's side (wrong nonce,
    unusable parameters, or a server signature that does not match).
    """


@dataclass(frozen=True, slots=True)
class AuthDone:
    """AuthenticationOk arrived; ``method`` is how the proxy logged in."""

    method: str


class ServerAuthState(Enum):
    """The states of a login to PostgreSQL."""

    START = "start"
    PASSWORD_SENT = "password_sent"
    SASL_STARTED = "sasl_started"
    SASL_CONTINUED = "sasl_continued"
    SASL_FINISHED = "sasl_finished"
    DONE = "done"
    FAILED = "failed"


_S = ServerAuthState
_MOVES: Final = {
    _S.START: {_S.PASSWORD_SENT, _S.SASL_STARTED, _S.DONE, _S.FAILED},
    _S.PASSWORD_SENT: {_S.DONE, _S.FAILED},
    _S.SASL_STARTED: {_S.SASL_CONTINUED, _S.FAILED},
    _S.SASL_CONTINUED: {_S.SASL_FINISHED, _S.FAILED},
    _S.SASL_FINISHED: {_S.DONE, _S.FAILED},
    _S.DONE: set(),
    _S.FAILED: set(),
}
_OK_STATES: Final = (_S.START, _S.PASSWORD_SENT, _S.SASL_FINISHED)
_UNSUPPORTED: Final = {
    AuthCode.KERBEROS_V5: "Kerberos V5",
    AuthCode.GSS: "GSSAPI",
    AuthCode.GSS_CONTINUE: "GSSAPI",
    AuthCode.SSPI: "SSPI",
}
_SCRAM_USER = "*"
"""PostgreSQL ignores the user name inside SCRAM; this one always passes SASLprep."""


class ServerAuthenticator:
    """One login of the proxy to PostgreSQL as ``user``.

    ``secret`` is the configured password: plain text, an ``md5...`` hash or a
    ``SCRAM-SHA-256$...`` secret (``None`` or empty when there is none, which only
    works if the server trusts the proxy). :meth:`feed` raises
    :class:`~millpond.errors.ProtocolError` for a malformed or out-of-order request and
    :class:`ServerAuthError` for a request the proxy cannot (or must not) satisfy.
    """

    def __init__(
        self, user: str, secret: str | None, *, scram_keys: tuple[bytes, bytes] | None = None
    ) -> None:
        self.user = user
        self._scram_keys = scram_keys  # ClientKey, ServerKey: SCRAM pass-through
        self._secret = secret or ""
        self._kind = secret_kind(self._secret) if self._secret else None
        self.state = ServerAuthState.START
        self.method = "trust"
        self._scram: Any = None

    def __repr__(self) -> str:
        return (
            f"<ServerAuthenticator user={self.user!r} method={self.method} "
            f"state={self.state.value}>"
        )

    def feed(self, payload: Payload) -> bytes | AuthDone | None:
        """Answer one Authentication message: bytes to send, ``None``, or :class:`AuthDone`.

        After an exception the login is over: the state is ``failed`` for good.
        """
        if self.state in (_S.DONE, _S.FAILED):
            raise RuntimeError(f"feed() called in state {self.state.value}")
        try:
            return self._answer(decode_authentication(payload))
        except (ProtocolError, ServerAuthError):
            self._set_state(_S.FAILED, "a request that ended the login")
            raise

    def _answer(self, request: Authentication) -> bytes | AuthDone | None:
        code = request.code
        if code in _UNSUPPORTED:
            raise ServerAuthError(
                f"the server asks for {_UNSUPPORTED[code]} authentication of user "
                f'"{self.user}", which millpond does not support; use scram-sha-256, '
                "md5 or password for the proxy's connections in pg_hba.conf"
            )
        if code is AuthCode.OK:
            return self._ok()
        if code is AuthCode.SASL_CONTINUE:
            return self._sasl_continue(request.data)
        if code is AuthCode.SASL_FINAL:
            self._sasl_final(request.data)
            return None
        return self._first_request(request)

    # -- state changes ------------------------------------------------------------------

    def _out_of_order(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"server sent {what} during login in state {self.state.value}, out of order"
        )

    def _set_state(self, state: ServerAuthState, what: str) -> None:
        if state not in _MOVES[self.state]:
            raise self._out_of_order(what)
        self.state = state

    def _require_state(self, state: ServerAuthState, what: str) -> None:
        """Check the state before work whose failure must not advance it."""
        if self.state is not state:
            raise self._out_of_order(what)

    def _ok(self) -> AuthDone:
        if self.state not in _OK_STATES:
            what = "AuthenticationOk before the SCRAM exchange finished"
            raise ProtocolError(f"server sent {what}; refusing to trust it")
        self._set_state(_S.DONE, "AuthenticationOk")
        self._scram = None
        return AuthDone(self.method)

    # -- cleartext and md5 -----------------------------------------------------------

    def _first_request(self, request: Authentication) -> bytes:
        if request.code is AuthCode.CLEARTEXT_PASSWORD:
            self._set_state(_S.PASSWORD_SENT, "AuthenticationCleartextPassword")
            self.method = "password"
            return m.password_message(self._plain_password("a cleartext password"))
        if request.code is AuthCode.MD5_PASSWORD:
            self._set_state(_S.PASSWORD_SENT, "AuthenticationMD5Password")
            self.method = "md5"
            return m.password_message(md5_salted_response(self._md5_hash(), request.salt))
        if request.code is AuthCode.SASL:
            return self._sasl_start(request.mechanisms)
        raise ProtocolError(f"server sent authentication request {request.code.name} first")

    def _missing(self, what: str, have: str) -> ServerAuthError:
        return ServerAuthError(
            f'the server asks for {what} for user "{self.user}", but {have}; '
            "configure the plain-text password for this user"
        )

    def _plain_password(self, what: str) -> str:
        if self._kind is None:
            raise self._missing(what, "no password is configured")
        if self._kind == "md5":
            raise self._missing(what, "only an MD5 hash is stored")
        if self._kind == "scram-sha-256":
            raise self._missing(
                what, "only a SCRAM secret is stored (passing SCRAM keys through is not supported)"
            )
        return self._secret

    def _md5_hash(self) -> str:
        if self._kind == "md5":
            return self._secret.lower()
        return md5_password_hash(self._plain_password("an MD5 password"), self.user)

    # -- scram-sha-256 -----------------------------------------------------------------

    def _sasl_start(self, mechanisms: tuple[str, ...]) -> bytes:
        self._set_state(_S.SASL_STARTED, "AuthenticationSASL")
        self.method = "scram-sha-256"
        if SCRAM_SHA_256 not in mechanisms:
            raise ServerAuthError(
                "none of the server's SASL mechanisms is supported: " + ", ".join(mechanisms)
            )
        if self._scram_keys is not None and self._kind in (None, "scram-sha-256"):
            self._scram = KeyedScramClient(*self._scram_keys)  # no password: pass-through
            first = self._scram.get_client_first()
            return m.sasl_initial_response(SCRAM_SHA_256, first.encode())
        password = self._plain_password("SCRAM-SHA-256")
        try:
            self._scram = ScramClient([SCRAM_SHA_256], _SCRAM_USER, password)
        except ScramException as exc:
            problem = f'cannot use the password of user "{self.user}" for SCRAM: {exc}'
            raise ServerAuthError(problem) from None
        first = cast(str, self._scram.get_client_first())
        return m.sasl_initial_response(SCRAM_SHA_256, first.encode())

    def _sasl_continue(self, data: bytes) -> bytes:
        self._require_state(_S.SASL_STARTED, "AuthenticationSASLContinue")
        try:
            self._scram.set_server_first(_scram_text(data, "server-first-message"))
            final = cast(str, self._scram.get_client_final())
        except ScramException as exc:
            raise ServerAuthError(f"SCRAM exchange with the server failed: {exc}") from None
        self._set_state(_S.SASL_CONTINUED, "AuthenticationSASLContinue")
        return m.sasl_response(final.encode())

    def _sasl_final(self, data: bytes) -> None:
        self._require_state(_S.SASL_CONTINUED, "AuthenticationSASLFinal")
        try:
            self._scram.set_server_final(_scram_text(data, "server-final-message"))
        except ScramException as exc:
            raise ServerAuthError(
                f"the server failed to prove it knows the password of user "
                f'"{self.user}" (SCRAM server signature): {exc}'
            ) from None
        self._set_state(_S.SASL_FINISHED, "AuthenticationSASLFinal")


class KeyedScramClient:
    """The client side of SCRAM-SHA-256 holding ClientKey and ServerKey instead of the
    password (RFC 5802): what PgBouncer calls SCRAM pass-through. A client's SCRAM login
    against a stored secret yields the keys (:attr:`ClientAuthenticator.scram_keys`),
    and they log in to a server that stores the same secret. scramp's client starts from
    the password, so this one does the three formulas itself: proof = ClientKey xor
    HMAC(H(ClientKey), AuthMessage), and the server proves itself with
    HMAC(ServerKey, AuthMessage). Same methods as scramp's ``ScramClient``.
    """

    def __init__(self, client_key: bytes, server_key: bytes) -> None:
        self._client_key, self._server_key = client_key, server_key
        self._nonce = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._first_bare = f"n={_SCRAM_USER},r={self._nonce}"
        self._server_first = ""
        self._server_nonce = ""
        self._auth_message = b""

    def get_client_first(self) -> str:
        return "n,," + self._first_bare

    def set_server_first(self, message: str) -> None:
        fields = dict(part.split("=", 1) for part in message.split(",") if "=" in part)
        nonce = fields.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ScramException("the server's nonce does not extend the client's")
        if "s" not in fields or "i" not in fields:
            raise ScramException("the server-first-message lacks a salt or iteration count")
        self._server_first, self._server_nonce = message, nonce

    def get_client_final(self) -> str:
        without_proof = f"c=biws,r={self._server_nonce}"
        message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        self._auth_message = message
        stored_key = hashlib.sha256(self._client_key).digest()
        signature = hmac.digest(stored_key, message, "sha256")
        proof = bytes(a ^ b for a, b in zip(self._client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}"

    def set_server_final(self, message: str) -> None:
        if message.startswith("e="):
            raise ScramException(f"the server refused the proof: {message[2:]}")
        if not message.startswith("v="):
            raise ScramException("the server-final-message has no verifier")
        try:
            verifier = base64.b64decode(message[2:], validate=True)
        except (ValueError, binascii.Error):
            raise ScramException("the server's verifier is not base64") from None
        expected = hmac.digest(self._server_key, self._auth_message, "sha256")
        if not hmac.compare_digest(verifier, expected):
            raise ScramException("the server's signature does not match")


def _scram_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"SCRAM {what} from the server is not UTF-8") from None
