"""Sans-I/O authentication of the clients that connect to the proxy, PgBouncer's way.

:class:`ClientAuthenticator` runs one client's login exchange: :meth:`~ClientAuthenticator.start`
gives the first request to write, each :meth:`~ClientAuthenticator.feed` of a client message
gives an :class:`AuthStep` (bytes to write, and whether the client is in, out, or owes another
message). Nothing here touches a socket, a clock or a task; the client connection protocol
writes the bytes and closes the connection after a failure.

Rules taken from PgBouncer (``src/client.c``, ``src/proto.c``, ``src/objects.c``):

* ``md5`` is upgraded to ``scram-sha-256`` when the stored secret is a SCRAM secret;
* a user missing from the auth file still gets the whole exchange, against a fake secret,
  and fails with the same message as a wrong password, so neither the answer nor the work
  done tells which users exist;
* every error the pooler raises itself is FATAL with SQLSTATE 08P01, PgBouncer's default
  (it does not use PostgreSQL's 28P01 for a wrong password).

Channel binding is not offered: only ``SCRAM-SHA-256`` is advertised, never ``-PLUS``.
The server side of the proxy (logging in to PostgreSQL) is in
:mod:`millpond.proxy.auth_server`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Final, cast

from scramp import ScramException, ScramMechanism  # type: ignore[import-untyped]
from scramp.utils import saslprep  # type: ignore[import-untyped]

from millpond.errors import ProtocolError
from millpond.proxy.authfile import ScramSecret, SecretKind, classify_secret, parse_scram_secret
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import (
    Payload,
    decode_password_message,
    decode_sasl_initial_response,
    decode_sasl_response,
)

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
PGBOUNCER_SQLSTATE: Final = "08P01"
"""The SQLSTATE PgBouncer puts on every error it sends itself (protocol_violation)."""
CLIENT_METHODS: Final = ("trust", "plain", "password", "md5", "scram-sha-256", "reject")
"""Methods :class:`ClientAuthenticator` runs; ``password`` (HBA's name) means ``plain``."""

SCRAM_ITERATIONS: Final = 4096
"""Iterations of the SCRAM secret derived from a plain-text password (PostgreSQL's default)."""
_SCRAM_SALT_LEN = 16
_SCRAMP_ITERATIONS = range(4096, 10_000_001)  # what scramp accepts in a stored secret
_SCRAMP_MIN_SALT = 12
_PLACEHOLDER_USER = "x"
_SCRAM: Final = ScramMechanism(SCRAM_SHA_256)
_PROCESS_KEY = secrets.token_bytes(32)
"""Keys the fake salts and secrets of this process: stable per user, unguessable outside."""

# -- errors PgBouncer sends --------------------------------------------------------------


def pooler_error(message: str, sqlstate: str = PGBOUNCER_SQLSTATE) -> bytes:
    """A FATAL ErrorResponse as PgBouncer's ``send_pooler_error`` builds before closing."""
    return m.error_response("FATAL", sqlstate, message)


def error_password_failed() -> bytes:
    """Wrong password, or unknown user, under ``plain`` or ``md5`` (08P01)."""
    return pooler_error("password authentication failed")


def error_sasl_failed() -> bytes:
    """Any failed SCRAM exchange: wrong password, unknown user, bad message (08P01)."""
    return pooler_error("SASL authentication failed")


def error_trust_failed() -> bytes:
    """``trust`` for a user the auth file does not list (08P01)."""
    return pooler_error('"trust" authentication failed')


def error_login_rejected() -> bytes:
    """``reject``, or a method the pooler cannot run for this connection (08P01)."""
    return pooler_error("login rejected")


def error_no_auth_method() -> bytes:
    """``auth_type = hba`` and no HBA rule matches the connection (08P01)."""
    return pooler_error("no authentication method is found")


def error_empty_password() -> bytes:
    """The client answered a password request with an empty password (08P01)."""
    return pooler_error("empty password returned by client")


def error_invalid_sasl_mechanism() -> bytes:
    """The client picked a SASL mechanism that was not offered (08P01)."""
    return pooler_error("client selected an invalid SASL authentication mechanism")


def error_no_such_database(database: str) -> bytes:
    """Sent after a successful login to a database the pooler does not know (08P01)."""
    return pooler_error(f"no such database: {database}")


def error_no_such_user() -> bytes:
    """``auth_query`` found no row for the user (08P01); the auth file path never says this."""
    return pooler_error("no such user")


def error_protocol_violation(message: str) -> bytes:
    """A client message that breaks the protocol during login (08P01)."""
    return pooler_error(message)


# -- secrets -------------------------------------------------------------------------------


def secret_kind(secret: str) -> SecretKind:
    """What a stored secret is, as PgBouncer's ``get_password_type`` decides.

    Unlike :func:`~millpond.proxy.authfile.classify_secret`, a value that looks like an MD5
    hash or a SCRAM secret but does not parse is a plain-text password, not an error.
    """
    try:
        return classify_secret(secret)
    except ValueError:
        return "plain"


def md5_password_hash(password: str, user: str) -> str:
    """PostgreSQL's stored MD5 secret: ``"md5" + md5(password + user)`` in hex."""
    return "md5" + hashlib.md5(_raw(password) + _raw(user)).hexdigest()


def md5_salted_response(hashed: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: ``"md5" + md5(stored_hex + salt)``."""
    return "md5" + hashlib.md5(hashed[3:].encode("ascii") + salt).hexdigest()


def _raw(text: str) -> bytes:
    """The bytes a protocol or file string came from (see the codec's surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


def prepare_password(password: str) -> bytes:
    """SASLprep'd UTF-8, or the raw bytes when SASLprep refuses it, as PostgreSQL does."""
    try:
        prepared = cast(str, saslprep(password))
    except ScramException:
        return _raw(password)
    return _raw(prepared)


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """The StoredKey and ServerKey of a SCRAM-SHA-256 secret for this password (RFC 5802)."""
    salted = hashlib.pbkdf2_hmac("sha256", prepare_password(password), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return hashlib.sha256(client_key).digest(), server_key


@lru_cache(maxsize=1024)
def _stored_password_keys(password: str, salt: bytes) -> tuple[bytes, bytes]:
    """:func:`scram_keys` of a password from the auth file, computed once per process."""
    return scram_keys(password, salt, SCRAM_ITERATIONS)


def _keyed(label: bytes, user: str, size: int = 32) -> bytes:
    return hmac.digest(_PROCESS_KEY, label + b"\0" + _raw(user), "sha256")[:size]


def _scramp_problem(scram: ScramSecret) -> str | None:
    """Why scramp would refuse this stored secret, or ``None``."""
    if scram.iterations not in _SCRAMP_ITERATIONS:
        return f"its SCRAM secret has {scram.iterations} iterations (4096 to 10000000 work)"
    if len(scram.salt) < _SCRAMP_MIN_SALT:
        return f"its SCRAM secret has a {len(scram.salt)}-byte salt (at least 12 work)"
    return None


ScramVerifier = tuple[bytes, bytes, bytes, int]
"""What scramp's server wants: salt, StoredKey, ServerKey, iterations."""


@dataclass(frozen=True, slots=True)
class _Stored:
    """A user's stored secret, classified.

    ``problem`` says why no password can match (unknown user, empty secret);
    ``scramp_problem`` why a SCRAM secret cannot drive a SCRAM exchange (it can
    still check a plain-text password).
    """

    kind: SecretKind
    value: str = ""
    scram: ScramSecret | None = None
    problem: str | None = None
    scramp_problem: str | None = None
    known: bool = True


def _stored(user: str, secret: str | None) -> _Stored:
    if secret is None:
        return _Stored("plain", problem=f'user "{user}" is not in the auth file', known=False)
    if not secret:
        return _Stored("plain", problem=f'user "{user}" has an empty password')
    kind = secret_kind(secret)
    if kind == "md5":
        return _Stored(kind, secret.lower())
    if kind == "plain":
        return _Stored(kind, secret)
    scram = parse_scram_secret(secret)
    problem = _scramp_problem(scram)
    return _Stored(kind, secret, scram, scramp_problem=problem and f'user "{user}": {problem}')


# -- the client side -------------------------------------------------------------------------


class AuthOutcome(Enum):
    """Where a login stands after a step."""

    CONTINUE = "continue"
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AuthStep:
    """What to do after one step: write ``send``, then go on, let the client in, or close.

    On success ``send`` ends with AuthenticationOk (after AuthenticationSASLFinal for
    SCRAM); on failure it is the ErrorResponse for the client, and ``reason`` (for the log
    only, never sent) says what really went wrong.
    """

    outcome: AuthOutcome
    send: bytes = b""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK

    @property
    def failed(self) -> bool:
        return self.outcome is AuthOutcome.FAILED

    @property
    def done(self) -> bool:
        return self.outcome is not AuthOutcome.CONTINUE


class ClientAuthState(Enum):
    """The states of a client login."""

    NEW = "new"
    WAIT_PASSWORD = "wait_password"
    WAIT_SASL_INITIAL = "wait_sasl_initial"
    WAIT_SASL_RESPONSE = "wait_sasl_response"
    OK = "ok"
    FAILED = "failed"


_S = ClientAuthState
_MOVES: Final = {
    _S.NEW: {_S.WAIT_PASSWORD, _S.WAIT_SASL_INITIAL, _S.OK, _S.FAILED},
    _S.WAIT_PASSWORD: {_S.OK, _S.FAILED},
    _S.WAIT_SASL_INITIAL: {_S.WAIT_SASL_RESPONSE, _S.FAILED},
    _S.WAIT_SASL_RESPONSE: {_S.OK, _S.FAILED},
    _S.OK: set(),
    _S.FAILED: set(),
}
_EXPECTED = {_S.WAIT_PASSWORD: "password", _S.WAIT_SASL_INITIAL: "SASL"}


def _resolve_method(method: str, stored: _Stored) -> str:
    if method not in CLIENT_METHODS:
        raise ValueError(
            f"ClientAuthenticator runs {', '.join(CLIENT_METHODS)}, not {method!r}; "
            "resolve hba to its rule's method and handle any, cert and peer before it"
        )
    if method == "password":
        return "plain"
    if method == "md5" and stored.kind == "scram-sha-256":
        return "scram-sha-256"
    return method


def _anonymous_client_first(message: str) -> tuple[str, str]:
    """The client-first-message with a placeholder user name, and its original bare part.

    PostgreSQL ignores the SCRAM user name (libpq sends an empty ``n=``) but scramp
    refuses an empty one, so scramp parses the placeholder while the signatures use
    the bare message exactly as the client sent it.
    """
    first = message.find(",")
    second = message.find(",", first + 1) if first >= 0 else -1
    bare = message[second + 1 :] if second >= 0 else ""
    end = bare.find(",")
    if not bare.startswith("n=") or end < 0:
        return message, bare
    return f"{message[: second + 1]}n={_PLACEHOLDER_USER}{bare[end:]}", bare


def _final_problem(exc: Exception) -> str:
    """The log reason for a client-final-message scramp refused."""
    if getattr(getattr(exc, "server_error", None), "value", None) == "invalid-proof":
        return "wrong password"
    return f"bad SCRAM client-final-message: {exc}"


class ClientAuthenticator:
    """One client's login: trust, plain, md5, scram-sha-256 or reject.

    ``secret`` is the user's stored secret (plain text, ``md5...`` or ``SCRAM-SHA-256$...``)
    or ``None`` when the auth file does not list the user; ``database`` only names the
    target in log reasons. ``method`` is the configured ``auth_type`` or the matching HBA
    rule's method; ``md5`` becomes ``scram-sha-256`` for a user with a SCRAM secret.
    """

    def __init__(self, method: str, user: str, secret: str | None, *, database: str = "") -> None:
        self.user = user
        self.database = database
        self._stored = _stored(user, secret)
        self.method = _resolve_method(method, self._stored)
        self.state = ClientAuthState.NEW
        self._salt = b""
        self._scram: Any = None
        #: ClientKey and ServerKey after a SCRAM login checked against a stored SCRAM
        #: secret: what the proxy needs to log in to the server as this user with the
        #: same secret (SCRAM pass-through), as PgBouncer does
        self.scram_keys: tuple[bytes, bytes] | None = None

    def __repr__(self) -> str:
        return (
            f"<ClientAuthenticator user={self.user!r} database={self.database!r} "
            f"method={self.method} state={self.state.value}>"
        )

    # -- driving ---------------------------------------------------------------------

    def start(self) -> AuthStep:
        """The first step: the authentication request, or the outcome for trust/reject."""
        self._require(ClientAuthState.NEW, "start() was already called")
        if self.method == "trust":
            return self._trust()
        if self.method == "reject":
            return self._fail(error_login_rejected(), "the auth method is reject")
        if self.method == "plain":
            return self._move(_S.WAIT_PASSWORD, m.authentication_cleartext_password())
        if self.method == "md5":
            self._salt = secrets.token_bytes(4)
            return self._move(_S.WAIT_PASSWORD, m.authentication_md5_password(self._salt))
        return self._move(_S.WAIT_SASL_INITIAL, m.authentication_sasl([SCRAM_SHA_256]))

    def feed(self, message_type: bytes, payload: Payload) -> AuthStep:
        """Take the client's next message (its type byte and payload) and decide."""
        if self.state in (_S.NEW, _S.OK, _S.FAILED):
            raise RuntimeError(f"feed() called in state {self.state.value}")
        if message_type == m.TERMINATE:
            return self._fail(b"", "the client left during authentication")
        if message_type != m.PASSWORD_MESSAGE:
            return self._wrong_type(message_type)
        if self.state is _S.WAIT_PASSWORD:
            return self._password(payload)
        if self.state is _S.WAIT_SASL_INITIAL:
            return self._sasl_initial(payload)
        return self._sasl_response(payload)

    def _wrong_type(self, message_type: bytes) -> AuthStep:
        """PostgreSQL's answer to anything but a password or SASL message during login."""
        number = message_type[0] if len(message_type) == 1 else -1
        expected = _EXPECTED.get(self.state, "SASL")
        text = f"expected {expected} response, got message type {number}"
        return self._fail(error_protocol_violation(text), text)

    # -- state changes ------------------------------------------------------------------

    def _require(self, state: ClientAuthState, problem: str) -> None:
        if self.state is not state:
            raise RuntimeError(problem)

    def _set_state(self, state: ClientAuthState) -> None:
        if state not in _MOVES[self.state]:
            raise RuntimeError(f"illegal move {self.state.value} -> {state.value}")
        self.state = state

    def _move(self, state: ClientAuthState, send: bytes) -> AuthStep:
        self._set_state(state)
        return AuthStep(AuthOutcome.CONTINUE, send)

    def _succeed(self, send: bytes) -> AuthStep:
        self._set_state(_S.OK)
        self._scram = None
        return AuthStep(AuthOutcome.OK, send + m.authentication_ok())

    def _fail(self, send: bytes, reason: str) -> AuthStep:
        self._set_state(_S.FAILED)
        self._scram = None
        where = f' to database "{self.database}"' if self.database else ""
        full = f'{self.method} login of user "{self.user}"{where} failed: {reason}'
        return AuthStep(AuthOutcome.FAILED, send, full)

    # -- trust, plain and md5 -----------------------------------------------------------

    def _trust(self) -> AuthStep:
        if not self._stored.known:
            return self._fail(error_trust_failed(), self._stored.problem or "unknown user")
        return self._succeed(b"")

    def _password(self, payload: Payload) -> AuthStep:
        try:
            password = decode_password_message(payload).password
        except ProtocolError as exc:
            return self._fail(error_protocol_violation(str(exc)), str(exc))
        if not password:
            return self._fail(error_empty_password(), "the client sent an empty password")
        if self._password_matches(password):
            return self._succeed(b"")
        return self._fail(error_password_failed(), self._stored.problem or "wrong password")

    def _password_matches(self, password: str) -> bool:
        """Whether the password (or MD5 response) fits the stored secret, in constant time."""
        stored = self._stored
        if self.method == "md5":
            expected = md5_salted_response(self._md5_hash(), self._salt)
            return hmac.compare_digest(_raw(password), expected.encode()) and not stored.problem
        if stored.problem is not None:
            hmac.compare_digest(_raw(password), _raw(password))
            return False
        if stored.kind == "md5":
            return hmac.compare_digest(md5_password_hash(password, self.user), stored.value)
        if stored.scram is not None:
            return self._matches_scram_secret(password, stored.scram)
        return hmac.compare_digest(_raw(password), _raw(stored.value))

    def _md5_hash(self) -> str:
        """The stored MD5 secret, derived from a plain password, or a fake one."""
        stored = self._stored
        if stored.problem is not None:
            return "md5" + _keyed(b"md5", self.user, 16).hex()
        if stored.kind == "md5":
            return stored.value
        return md5_password_hash(stored.value, self.user)

    @staticmethod
    def _matches_scram_secret(password: str, scram: ScramSecret) -> bool:
        stored_key, server_key = scram_keys(password, scram.salt, scram.iterations)
        same_stored = hmac.compare_digest(stored_key, scram.stored_key)
        return hmac.compare_digest(server_key, scram.server_key) and same_stored

    # -- scram-sha-256 -------------------------------------------------------------------

    def _verifier(self) -> ScramVerifier:
        """The secret scramp checks the client against; a fake one when none can match."""
        stored = self._stored
        if stored.scram is not None and stored.scramp_problem is None:
            scram = stored.scram
            return scram.salt, scram.stored_key, scram.server_key, scram.iterations
        salt = _keyed(b"salt", self.user, _SCRAM_SALT_LEN)
        if stored.problem is None and stored.kind == "plain":
            return salt, *_stored_password_keys(stored.value, salt), SCRAM_ITERATIONS
        return salt, _keyed(b"stored", self.user), _keyed(b"server", self.user), SCRAM_ITERATIONS

    def _scram_problem(self) -> str | None:
        """Why this user cannot pass SCRAM whatever the client sends, or ``None``."""
        stored = self._stored
        if stored.kind == "md5" and stored.problem is None:
            return (
                f'user "{self.user}" has an MD5 secret; SCRAM needs the plain-text '
                "password or a SCRAM secret"
            )
        return stored.problem or stored.scramp_problem

    def _sasl_failed(self, reason: str) -> AuthStep:
        return self._fail(error_sasl_failed(), reason)

    def _sasl_initial(self, payload: Payload) -> AuthStep:
        try:
            initial = decode_sasl_initial_response(payload)
        except ProtocolError as exc:
            return self._sasl_failed(str(exc))
        if initial.mechanism != SCRAM_SHA_256:
            reason = f"the client chose SASL mechanism {initial.mechanism!r}"
            return self._fail(error_invalid_sasl_mechanism(), reason)
        if initial.data is None:
            return self._sasl_failed("the client sent no SCRAM client-first-message")
        return self._server_first(initial.data)

    def _server_first(self, data: bytes) -> AuthStep:
        verifier = self._verifier()
        self._scram = _SCRAM.make_server(lambda _name: verifier)
        try:
            message, bare = _anonymous_client_first(data.decode("utf-8"))
            self._scram.set_client_first(message)
            self._scram.client_first_bare = bare
            server_first = cast(str, self._scram.get_server_first())
        except (ScramException, UnicodeDecodeError) as exc:
            return self._sasl_failed(f"bad SCRAM client-first-message: {exc}")
        server_first_message = m.authentication_sasl_continue(server_first.encode())
        return self._move(_S.WAIT_SASL_RESPONSE, server_first_message)

    def _sasl_response(self, payload: Payload) -> AuthStep:
        try:
            final = decode_sasl_response(payload).data.decode("utf-8")
            self._scram.set_client_final(final)
            server_final = cast(str, self._scram.get_server_final())
        except UnicodeDecodeError as exc:
            return self._sasl_failed(f"bad SCRAM client-final-message: {exc}")
        except ScramException as exc:
            return self._sasl_failed(self._scram_problem() or _final_problem(exc))
        problem = self._scram_problem()
        if problem is not None:
            return self._sasl_failed(problem)
        self.scram_keys = self._client_keys(final)
        return self._succeed(m.authentication_sasl_final(server_final.encode()))

    def _client_keys(self, final: str) -> tuple[bytes, bytes] | None:
        """ClientKey (recovered from the proof: ClientProof xor HMAC(StoredKey,
        AuthMessage), RFC 5802) and ServerKey, when the stored secret is a SCRAM one."""
        scram = self._stored.scram
        without_proof, sep, proof = final.rpartition(",p=")
        if scram is None or not sep:
            return None
        parts = (self._scram.client_first_bare, self._scram.server_first, without_proof)
        signature = hmac.digest(scram.stored_key, ",".join(parts).encode(), "sha256")
        try:
            client_key = bytes(
                a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True)
            )
        except (ValueError, binascii.Error):
            return None
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), scram.stored_key):
            return None
        return client_key, scram.server_key
