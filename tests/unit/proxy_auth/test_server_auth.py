"""ServerAuthenticator answering canned server requests and a scramp SCRAM server."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from scramp import ScramMechanism  # type: ignore[import-untyped]

from millpond.errors import DatabaseUnavailable, ProtocolError
from millpond.proxy.auth import md5_password_hash, md5_salted_response
from millpond.proxy.auth_server import (
    AuthDone,
    ServerAuthenticator,
    ServerAuthError,
    ServerAuthState,
)
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.messages import AuthCode
from millpond.proxy.protocol.parsers import decode_password_message, decode_sasl_initial_response
from tests.unit.proxy_auth.exchange import payload_of, scram_secret, split

USER = "proxy"
PASSWORD = "pä55 word"
OK = payload_of(m.authentication_ok())
SALT = b"\x0a\x0b\x0c\x0d"


def request(code: AuthCode, data: bytes = b"") -> bytes:
    """The payload of an Authentication request with this code and data."""
    return payload_of(m.frame(m.AUTHENTICATION, code.to_bytes(4, "big") + data))


def sent(reply: bytes | AuthDone | None) -> tuple[bytes, bytes]:
    assert isinstance(reply, bytes), reply
    ((kind, payload),) = split(reply)
    return kind, payload


def test_trust_is_done_at_the_first_authentication_ok() -> None:
    auth = ServerAuthenticator(USER, None)
    assert auth.feed(OK) == AuthDone("trust")
    assert auth.state is ServerAuthState.DONE


def test_cleartext_sends_the_plain_password() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    kind, payload = sent(auth.feed(request(AuthCode.CLEARTEXT_PASSWORD)))
    assert kind == m.PASSWORD_MESSAGE
    assert decode_password_message(payload).password == PASSWORD
    assert auth.feed(OK) == AuthDone("password")


@pytest.mark.parametrize("secret", [PASSWORD, md5_password_hash(PASSWORD, USER)])
def test_md5_answers_from_a_plain_password_or_a_stored_hash(secret: str) -> None:
    auth = ServerAuthenticator(USER, secret)
    _, payload = sent(auth.feed(request(AuthCode.MD5_PASSWORD, SALT)))
    expected = md5_salted_response(md5_password_hash(PASSWORD, USER), SALT)
    assert decode_password_message(payload).password == expected
    assert auth.feed(OK) == AuthDone("md5")


def test_md5_accepts_an_upper_case_stored_hash() -> None:
    secret = md5_password_hash(PASSWORD, USER).upper().replace("MD5", "md5", 1)
    _, payload = sent(ServerAuthenticator(USER, secret).feed(request(AuthCode.MD5_PASSWORD, SALT)))
    expected = md5_salted_response(md5_password_hash(PASSWORD, USER), SALT)
    assert decode_password_message(payload).password == expected


@pytest.mark.parametrize(
    ("secret", "code", "problem"),
    [
        (None, AuthCode.CLEARTEXT_PASSWORD, "no password is configured"),
        ("", AuthCode.MD5_PASSWORD, "no password is configured"),
        (md5_password_hash(PASSWORD, USER), AuthCode.CLEARTEXT_PASSWORD, "only an MD5 hash"),
        (scram_secret(PASSWORD), AuthCode.CLEARTEXT_PASSWORD, "only a SCRAM secret"),
        (scram_secret(PASSWORD), AuthCode.MD5_PASSWORD, "only a SCRAM secret"),
    ],
)
def test_a_request_the_secret_cannot_answer_is_a_clear_error(
    secret: str | None, code: AuthCode, problem: str
) -> None:
    data = SALT if code is AuthCode.MD5_PASSWORD else b""
    with pytest.raises(ServerAuthError, match=problem) as caught:
        ServerAuthenticator(USER, secret).feed(request(code, data))
    assert 'user "proxy"' in str(caught.value)
    assert isinstance(caught.value, DatabaseUnavailable)


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (AuthCode.KERBEROS_V5, "Kerberos V5"),
        (AuthCode.GSS, "GSSAPI"),
        (AuthCode.SSPI, "SSPI"),
        (AuthCode.GSS_CONTINUE, "GSSAPI"),
    ],
)
def test_unsupported_methods_are_named(code: AuthCode, name: str) -> None:
    with pytest.raises(ServerAuthError, match=f"asks for {name} authentication"):
        ServerAuthenticator(USER, PASSWORD).feed(request(code))


# -- SCRAM against scramp's server ------------------------------------------------------


class ScrampServer:
    """PostgreSQL's side of SCRAM-SHA-256, played by scramp."""

    def __init__(self, password: str = PASSWORD) -> None:
        info = ScramMechanism().make_auth_info(password)
        self.scram: Any = ScramMechanism().make_server(lambda _user: info)

    def first(self, initial_response: bytes) -> bytes:
        initial = decode_sasl_initial_response(initial_response)
        assert initial.mechanism == "SCRAM-SHA-256"
        assert initial.data is not None
        self.scram.set_client_first(initial.data.decode())
        return request(AuthCode.SASL_CONTINUE, self.scram.get_server_first().encode())

    def final(self, response: bytes) -> bytes:
        self.scram.set_client_final(response.decode())
        return request(AuthCode.SASL_FINAL, self.scram.get_server_final().encode())


def sasl_request(*mechanisms: str) -> bytes:
    return request(AuthCode.SASL, b"".join(m.cstring(name) for name in mechanisms) + b"\0")


def test_scram_logs_in_and_checks_the_server_signature() -> None:
    auth, server = ServerAuthenticator(USER, PASSWORD), ScrampServer()
    kind, initial = sent(auth.feed(sasl_request("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    assert kind == m.PASSWORD_MESSAGE
    _, response = sent(auth.feed(server.first(initial)))
    assert auth.feed(server.final(response)) is None
    assert auth.state is ServerAuthState.SASL_FINISHED
    assert auth.feed(OK) == AuthDone("scram-sha-256")


def test_scram_with_a_wrong_password_is_refused_by_the_server() -> None:
    auth, server = ServerAuthenticator(USER, "wrong"), ScrampServer()
    _, initial = sent(auth.feed(sasl_request("SCRAM-SHA-256")))
    _, response = sent(auth.feed(server.first(initial)))
    with pytest.raises(Exception, match="client keys don't match"):
        server.final(response)


def test_a_server_with_a_forged_signature_is_not_trusted() -> None:
    auth, server = ServerAuthenticator(USER, PASSWORD), ScrampServer()
    _, initial = sent(auth.feed(sasl_request("SCRAM-SHA-256")))
    _, response = sent(auth.feed(server.first(initial)))
    server.final(response)
    forged = request(AuthCode.SASL_FINAL, b"v=" + base64.b64encode(b"\0" * 32))
    with pytest.raises(ServerAuthError, match="failed to prove it knows the password"):
        auth.feed(forged)
    assert auth.state is ServerAuthState.FAILED
    with pytest.raises(RuntimeError, match="state failed"):
        auth.feed(OK)


def test_authentication_ok_before_the_scram_signature_is_refused() -> None:
    auth, server = ServerAuthenticator(USER, PASSWORD), ScrampServer()
    _, initial = sent(auth.feed(sasl_request("SCRAM-SHA-256")))
    auth.feed(server.first(initial))
    with pytest.raises(ProtocolError, match="before the SCRAM exchange finished"):
        auth.feed(OK)


def test_a_server_first_message_with_another_nonce_is_refused() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.feed(sasl_request("SCRAM-SHA-256"))
    salt = base64.b64encode(b"s" * 16)
    with pytest.raises(ServerAuthError, match="nonce"):
        auth.feed(request(AuthCode.SASL_CONTINUE, b"r=someoneelse,s=" + salt + b",i=4096"))


@pytest.mark.parametrize(
    "data", [b"", b"r=", b"garbage", b"e=invalid-proof", b"\xff\xfe", b"r=x,s=,i=0"]
)
def test_a_malformed_server_first_message_is_refused(data: bytes) -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.feed(sasl_request("SCRAM-SHA-256"))
    with pytest.raises((ServerAuthError, ProtocolError)):
        auth.feed(request(AuthCode.SASL_CONTINUE, data))


@pytest.mark.parametrize("mechanisms", [("SCRAM-SHA-256-PLUS",), ("OAUTHBEARER", "PLAIN")])
def test_no_usable_sasl_mechanism_is_a_clear_error(mechanisms: tuple[str, ...]) -> None:
    with pytest.raises(ServerAuthError, match="none of the server's SASL mechanisms"):
        ServerAuthenticator(USER, PASSWORD).feed(sasl_request(*mechanisms))


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        (scram_secret(PASSWORD), "only a SCRAM secret is stored"),
        (md5_password_hash(PASSWORD, USER), "only an MD5 hash is stored"),
        (None, "no password is configured"),
    ],
)
def test_scram_needs_the_plain_password(secret: str | None, problem: str) -> None:
    with pytest.raises(ServerAuthError, match=problem):
        ServerAuthenticator(USER, secret).feed(sasl_request("SCRAM-SHA-256"))


# -- garbage and out-of-order requests ---------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0",
        b"\0\0\0\x63",
        request(AuthCode.OK, b"x"),
        request(AuthCode.MD5_PASSWORD, b"ab"),
    ],
)
def test_malformed_requests_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        ServerAuthenticator(USER, PASSWORD).feed(payload)


@pytest.mark.parametrize(
    "payload", [request(AuthCode.SASL_CONTINUE, b"r=x"), request(AuthCode.SASL_FINAL, b"v=x")]
)
def test_scram_steps_without_a_sasl_request_are_out_of_order(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="out of order"):
        ServerAuthenticator(USER, PASSWORD).feed(payload)


def test_a_second_password_request_is_out_of_order() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.feed(request(AuthCode.MD5_PASSWORD, SALT))
    with pytest.raises(ProtocolError, match="out of order"):
        auth.feed(request(AuthCode.CLEARTEXT_PASSWORD))


def test_feeding_after_authentication_ok_is_a_programming_error() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.feed(OK)
    with pytest.raises(RuntimeError):
        auth.feed(OK)


def test_repr_shows_method_and_state() -> None:
    auth = ServerAuthenticator(USER, PASSWORD)
    auth.feed(request(AuthCode.MD5_PASSWORD, SALT))
    assert repr(auth) == "<ServerAuthenticator user='proxy' method=md5 state=password_sent>"
