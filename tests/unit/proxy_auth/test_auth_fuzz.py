"""Random bytes at every step of a login: always a clean failure, never a way in."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scramp import ScramMechanism  # type: ignore[import-untyped]

from millpond.errors import ProtocolError
from millpond.proxy.auth import AuthStep, ClientAuthenticator, md5_password_hash
from millpond.proxy.auth_server import AuthDone, ServerAuthenticator, ServerAuthError
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.messages import AuthCode
from millpond.proxy.protocol.parsers import decode_sasl_initial_response
from tests.unit.proxy_auth.exchange import LibpqScram, auth_requests, error_of, payload_of, split

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
USER = "fuzz"
PASSWORD = "a long password nobody will generate by chance 8c1f"
SECRETS = [PASSWORD, md5_password_hash(PASSWORD, USER), None, ""]

methods = st.sampled_from(["plain", "md5", "scram-sha-256"])
secrets_ = st.sampled_from(SECRETS)
message_types = st.one_of(
    st.just(b"p"), st.binary(min_size=1, max_size=1), st.sampled_from([b"X", b"Q", b"S"])
)
payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(
        lambda data: payload_of(m.sasl_initial_response("SCRAM-SHA-256", data))
    ),
    st.binary(max_size=100).map(lambda data: data + b"\0"),
)
messages = st.lists(st.tuples(message_types, payloads), min_size=1, max_size=6)


def check_clean(step: AuthStep) -> None:
    """A step is never a success here, and says what it does in well-formed messages."""
    assert not step.ok
    if step.failed:
        assert step.reason
        if step.send:
            assert error_of(step.send).code == "08P01"
    else:
        auth_requests(step.send)


@SETTINGS
@given(method=methods, secret=secrets_, sent=messages)
def test_random_client_messages_never_log_in(
    method: str, secret: str | None, sent: list[tuple[bytes, bytes]]
) -> None:
    auth = ClientAuthenticator(method, USER, secret)
    auth.start()
    for kind, payload in sent:
        step = auth.feed(kind, payload)
        check_clean(step)
        if step.done:
            break


def scram_started(secret: str | None) -> tuple[ClientAuthenticator, LibpqScram, bytes]:
    auth = ClientAuthenticator("scram-sha-256", USER, secret)
    auth.start()
    client = LibpqScram(PASSWORD)
    step = auth.feed(b"p", payload_of(m.sasl_initial_response("SCRAM-SHA-256", client.first())))
    return auth, client, auth_requests(step.send)[0].data


@SETTINGS
@given(secret=secrets_, final=st.binary(max_size=300))
def test_a_random_scram_final_message_never_logs_in(secret: str | None, final: bytes) -> None:
    auth, _, _ = scram_started(secret)
    step = auth.feed(b"p", final)
    check_clean(step)
    assert step.failed


@SETTINGS
@given(secret=secrets_, proof=st.binary(min_size=32, max_size=32))
def test_a_forged_scram_proof_never_logs_in(secret: str | None, proof: bytes) -> None:
    auth, client, server_first = scram_started(secret)
    real = client.final(server_first).decode()
    without_proof, _, real_proof = real.rpartition(",p=")
    forged = f"{without_proof},p={base64.b64encode(proof).decode()}"
    step = auth.feed(b"p", forged.encode())
    if secret == PASSWORD and proof == base64.b64decode(real_proof):
        assert step.ok
        return
    check_clean(step)
    assert step.failed


# -- the server side ----------------------------------------------------------------------

request_codes = st.sampled_from([int(code) for code in AuthCode] + [1, 4, 6, 13, 99, -1])
auth_payloads = st.one_of(
    st.binary(max_size=200),
    st.tuples(request_codes, st.binary(max_size=120)).map(
        lambda pair: pair[0].to_bytes(4, "big", signed=True) + pair[1]
    ),
)


def feed_all(auth: ServerAuthenticator, payloads: list[bytes]) -> list[Any]:
    """Feed until the first error; the results before it."""
    results: list[Any] = []
    for payload in payloads:
        try:
            results.append(auth.feed(payload))
        except (ProtocolError, ServerAuthError):
            return results
        if isinstance(results[-1], AuthDone):
            return results
    return results


@SETTINGS
@given(secret=secrets_, sent=st.lists(auth_payloads, min_size=1, max_size=6))
def test_random_server_requests_only_raise_protocol_or_auth_errors(
    secret: str | None, sent: list[bytes]
) -> None:
    auth = ServerAuthenticator(USER, secret)
    for result, payload in zip(feed_all(auth, sent), sent, strict=False):
        if isinstance(result, AuthDone):
            assert payload == b"\0\0\0\0"  # only a real AuthenticationOk ends the login
        elif result is not None:
            split(result)


def scram_in_progress(*, continued: bool) -> ServerAuthenticator:
    """A login to a scramp SCRAM server, stopped after the SASL request or the challenge."""
    info = ScramMechanism().make_auth_info(PASSWORD)
    server: Any = ScramMechanism().make_server(lambda _user: info)
    auth = ServerAuthenticator(USER, PASSWORD)
    reply = auth.feed(payload_of(m.authentication_sasl(["SCRAM-SHA-256"])))
    assert isinstance(reply, bytes)
    initial = decode_sasl_initial_response(payload_of(reply))
    assert initial.data is not None
    server.set_client_first(initial.data.decode())
    if continued:
        challenge = m.authentication_sasl_continue(server.get_server_first().encode())
        assert isinstance(auth.feed(payload_of(challenge)), bytes)
    return auth


@SETTINGS
@given(continued=st.booleans(), sent=st.lists(auth_payloads, min_size=1, max_size=6))
def test_random_server_messages_mid_scram_never_finish_the_login(
    continued: bool, sent: list[bytes]
) -> None:
    auth = scram_in_progress(continued=continued)
    results = feed_all(auth, [*sent, payload_of(m.authentication_ok())])
    assert not any(isinstance(result, AuthDone) for result in results)
