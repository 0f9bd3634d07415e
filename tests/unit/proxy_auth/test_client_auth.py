"""ClientAuthenticator with canned client messages: every method, right and wrong."""

from __future__ import annotations

import base64

import pytest
from scramp import ScramClient, ScramMechanism  # type: ignore[import-untyped]

from millpond.proxy.auth import (
    AuthOutcome,
    AuthStep,
    ClientAuthenticator,
    ClientAuthState,
    md5_password_hash,
    md5_salted_response,
)
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.messages import AuthCode
from tests.unit.proxy_auth.exchange import (
    LibpqScram,
    auth_requests,
    error_of,
    payload_of,
    scram_secret,
    split,
)

USER = "alice"
PASSWORD = "correct horse"
MD5_SECRET = md5_password_hash(PASSWORD, USER)
SCRAM_SECRET = scram_secret(PASSWORD)
STORED = {"plain": PASSWORD, "md5": MD5_SECRET, "scram": SCRAM_SECRET}


def authenticator(method: str, secret: str | None = PASSWORD) -> ClientAuthenticator:
    return ClientAuthenticator(method, USER, secret, database="app")


def feed(auth: ClientAuthenticator, message: bytes) -> AuthStep:
    ((kind, payload),) = split(message)
    return auth.feed(kind, payload)


def assert_refused(step: AuthStep, text: str, sqlstate: str = "08P01") -> None:
    assert step.outcome is AuthOutcome.FAILED
    assert step.failed
    assert step.done
    assert not step.ok
    error = error_of(step.send)
    assert (error.severity, error.code, error.message) == ("FATAL", sqlstate, text)


def assert_let_in(step: AuthStep) -> None:
    assert step.ok
    assert step.done
    assert not step.failed
    assert split(step.send)[-1] == (m.AUTHENTICATION, payload_of(m.authentication_ok()))


# -- trust and reject -----------------------------------------------------------------


def test_trust_lets_a_known_user_in_at_once() -> None:
    auth = authenticator("trust")
    step = auth.start()
    assert step.send == m.authentication_ok()
    assert step.ok
    assert auth.state is ClientAuthState.OK


def test_trust_accepts_a_known_user_without_a_password() -> None:
    assert authenticator("trust", "").start().ok


def test_trust_refuses_a_user_missing_from_the_auth_file() -> None:
    step = authenticator("trust", None).start()
    assert_refused(step, '"trust" authentication failed')
    assert "not in the auth file" in step.reason


def test_reject_refuses_everyone() -> None:
    step = authenticator("reject").start()
    assert_refused(step, "login rejected")
    assert 'user "alice" to database "app"' in step.reason


@pytest.mark.parametrize("method", ["any", "hba", "cert", "peer", "pam", "MD5", ""])
def test_methods_it_cannot_run_are_a_programming_error(method: str) -> None:
    with pytest.raises(ValueError, match="ClientAuthenticator runs"):
        authenticator(method)


# -- plain (cleartext) ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["plain", "password"])
@pytest.mark.parametrize("stored", sorted(STORED))
def test_plain_accepts_the_right_password_whatever_is_stored(method: str, stored: str) -> None:
    auth = authenticator(method, STORED[stored])
    (request,) = auth_requests(auth.start().send)
    assert request.code is AuthCode.CLEARTEXT_PASSWORD
    assert_let_in(feed(auth, m.password_message(PASSWORD)))


@pytest.mark.parametrize("stored", sorted(STORED))
def test_plain_refuses_a_wrong_password(stored: str) -> None:
    auth = authenticator("plain", STORED[stored])
    auth.start()
    step = feed(auth, m.password_message("correct horse "))
    assert_refused(step, "password authentication failed")
    assert step.reason.endswith("wrong password")


def test_plain_refuses_an_unknown_user_only_after_asking_for_the_password() -> None:
    auth = authenticator("plain", None)
    (request,) = auth_requests(auth.start().send)
    assert request.code is AuthCode.CLEARTEXT_PASSWORD
    step = feed(auth, m.password_message(PASSWORD))
    assert_refused(step, "password authentication failed")
    assert 'user "alice" is not in the auth file' in step.reason


def test_an_empty_stored_password_matches_nothing() -> None:
    auth = authenticator("plain", "")
    auth.start()
    assert_refused(feed(auth, m.password_message("x")), "password authentication failed")


def test_an_empty_password_from_the_client_is_refused() -> None:
    auth = authenticator("plain")
    auth.start()
    assert_refused(auth.feed(b"p", b"\0"), "empty password returned by client")


def test_a_password_message_without_its_nul_is_a_protocol_violation() -> None:
    auth = authenticator("plain")
    auth.start()
    step = auth.feed(b"p", PASSWORD.encode())
    assert step.failed
    assert error_of(step.send).code == "08P01"
    assert "PasswordMessage" in error_of(step.send).message


def test_plain_checks_a_password_against_a_scram_secret_scramp_would_refuse() -> None:
    low = scram_secret(PASSWORD, iterations=1000, salt=b"shortsalt")
    auth = authenticator("plain", low)
    auth.start()
    assert_let_in(feed(auth, m.password_message(PASSWORD)))


# -- md5 ------------------------------------------------------------------------------


def md5_answer(auth: ClientAuthenticator, password: str = PASSWORD) -> tuple[AuthStep, bytes]:
    (request,) = auth_requests(auth.start().send)
    assert request.code is AuthCode.MD5_PASSWORD
    answer = md5_salted_response(md5_password_hash(password, USER), request.salt)
    return feed(auth, m.password_message(answer)), request.salt


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_md5_accepts_the_right_password(stored: str) -> None:
    step, _ = md5_answer(authenticator("md5", STORED[stored]))
    assert_let_in(step)
    assert step.send == m.authentication_ok()


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_md5_refuses_a_wrong_password(stored: str) -> None:
    step, _ = md5_answer(authenticator("md5", STORED[stored]), "Correct horse")
    assert_refused(step, "password authentication failed")


def test_md5_refuses_an_unknown_user_like_a_wrong_password() -> None:
    known, _ = md5_answer(authenticator("md5"), "guess")
    unknown, _ = md5_answer(authenticator("md5", None), "guess")
    assert unknown.send == known.send
    assert "not in the auth file" in unknown.reason


def test_md5_salts_are_random() -> None:
    salts = {md5_answer(authenticator("md5"))[1] for _ in range(8)}
    assert len(salts) == 8


def test_md5_refuses_the_stored_hash_replayed_as_the_answer() -> None:
    auth = authenticator("md5", MD5_SECRET)
    auth.start()
    assert_refused(feed(auth, m.password_message(MD5_SECRET)), "password authentication failed")


def test_md5_answer_from_another_salt_is_refused() -> None:
    auth = authenticator("md5")
    auth.start()
    answer = md5_salted_response(MD5_SECRET, b"salt")
    assert_refused(feed(auth, m.password_message(answer)), "password authentication failed")


def test_md5_is_upgraded_to_scram_for_a_user_with_a_scram_secret() -> None:
    auth = authenticator("md5", SCRAM_SECRET)
    assert auth.method == "scram-sha-256"
    (request,) = auth_requests(auth.start().send)
    assert (request.code, request.mechanisms) == (AuthCode.SASL, ("SCRAM-SHA-256",))


# -- scram-sha-256 ----------------------------------------------------------------------


def scram_login(
    auth: ClientAuthenticator, client: LibpqScram, *, nonce: str | None = None
) -> tuple[AuthStep, AuthStep]:
    (request,) = auth_requests(auth.start().send)
    assert request.mechanisms == ("SCRAM-SHA-256",)  # never -PLUS
    first = feed(auth, m.sasl_initial_response("SCRAM-SHA-256", client.first()))
    if first.done:
        return first, first
    (challenge,) = auth_requests(first.send)
    assert challenge.code is AuthCode.SASL_CONTINUE
    return first, feed(auth, m.sasl_response(client.final(challenge.data, nonce=nonce)))


@pytest.mark.parametrize("stored", ["plain", "scram"])
def test_scram_accepts_libpqs_exchange(stored: str) -> None:
    client = LibpqScram(PASSWORD)
    _, last = scram_login(authenticator("scram-sha-256", STORED[stored]), client)
    assert_let_in(last)
    final, _ = auth_requests(last.send)
    assert final.code is AuthCode.SASL_FINAL
    expected = base64.b64encode(client.server_signature).decode()
    assert final.data == f"v={expected}".encode()


def test_scram_accepts_a_secret_made_by_scramp() -> None:
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(PASSWORD)
    b64 = [base64.b64encode(value).decode() for value in (salt, stored_key, server_key)]
    secret = f"SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"
    _, last = scram_login(authenticator("scram-sha-256", secret), LibpqScram(PASSWORD))
    assert_let_in(last)


def test_scram_accepts_a_client_that_sends_its_user_name() -> None:
    auth = authenticator("scram-sha-256")
    auth.start()
    client = ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
    step = feed(auth, m.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode()))
    client.set_server_first(auth_requests(step.send)[0].data.decode())
    last = feed(auth, m.sasl_response(client.get_client_final().encode()))
    assert_let_in(last)
    client.set_server_final(auth_requests(last.send)[0].data.decode())


def test_scram_accepts_the_y_flag_since_no_channel_binding_is_offered() -> None:
    _, last = scram_login(authenticator("scram-sha-256"), LibpqScram(PASSWORD, gs2_header="y,,"))
    assert_let_in(last)


@pytest.mark.parametrize("stored", ["plain", "scram"])
def test_scram_refuses_a_wrong_password(stored: str) -> None:
    first, last = scram_login(authenticator("scram-sha-256", STORED[stored]), LibpqScram("nope"))
    assert not first.done
    assert_refused(last, "SASL authentication failed")
    assert last.reason.endswith("wrong password")


def test_scram_runs_the_whole_exchange_for_an_unknown_user() -> None:
    first, last = scram_login(authenticator("scram-sha-256", None), LibpqScram(PASSWORD))
    assert auth_requests(first.send)[0].code is AuthCode.SASL_CONTINUE
    assert_refused(last, "SASL authentication failed")
    assert "not in the auth file" in last.reason


def server_first_attributes(auth: ClientAuthenticator) -> dict[str, str]:
    auth.start()
    step = feed(auth, m.sasl_initial_response("SCRAM-SHA-256", LibpqScram(PASSWORD).first()))
    text = auth_requests(step.send)[0].data.decode()
    return dict(item.split("=", 1) for item in text.split(","))


def test_an_unknown_users_fake_salt_is_stable_like_a_real_one() -> None:
    unknown = [server_first_attributes(authenticator("scram-sha-256", None)) for _ in range(2)]
    other = server_first_attributes(ClientAuthenticator("scram-sha-256", "bob", None))
    real = server_first_attributes(authenticator("scram-sha-256"))
    assert unknown[0]["s"] == unknown[1]["s"] != other["s"]
    assert len(base64.b64decode(unknown[0]["s"])) == len(base64.b64decode(real["s"]))
    assert unknown[0]["i"] == real["i"] == "4096"


def test_scram_with_a_stored_md5_hash_fails_clearly() -> None:
    first, last = scram_login(authenticator("scram-sha-256", MD5_SECRET), LibpqScram(PASSWORD))
    assert not first.done
    assert_refused(last, "SASL authentication failed")
    assert "has an MD5 secret" in last.reason


def test_scram_secret_outside_scramps_limits_fails_clearly() -> None:
    low = scram_secret(PASSWORD, iterations=1000)
    _, last = scram_login(authenticator("scram-sha-256", low), LibpqScram(PASSWORD))
    assert_refused(last, "SASL authentication failed")
    assert "1000 iterations" in last.reason


def test_scram_refuses_a_final_message_with_another_nonce() -> None:
    client = LibpqScram(PASSWORD)
    _, last = scram_login(authenticator("scram-sha-256"), client, nonce=client.nonce + "forged")
    assert_refused(last, "SASL authentication failed")
    assert "nonce" in last.reason


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "PLAIN", ""])
def test_scram_refuses_a_mechanism_it_did_not_offer(mechanism: str) -> None:
    auth = authenticator("scram-sha-256")
    auth.start()
    step = feed(auth, m.sasl_initial_response(mechanism, LibpqScram(PASSWORD).first()))
    assert_refused(step, "client selected an invalid SASL authentication mechanism")


def test_scram_refuses_channel_binding_it_did_not_offer() -> None:
    client = LibpqScram(PASSWORD, gs2_header="p=tls-server-end-point,,")
    first, _ = scram_login(authenticator("scram-sha-256"), client)
    assert_refused(first, "SASL authentication failed")


def initial(data: bytes | None) -> bytes:
    return payload_of(m.sasl_initial_response("SCRAM-SHA-256", data))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"SCRAM-SHA-256\0", "needs 4 more byte"),
        (b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=", "needs 32 more byte"),
        (b"SCRAM-SHA-256", "no NUL terminator"),
        (initial(None), "no SCRAM client-first-message"),
        (initial(b"n,,n"), "client-first-message"),
        (initial(b"n,,n=,r=\xff\xfe"), "codec can't decode"),
        (initial(b"n,,m=x,n=,r=ab"), "client-first-message"),
        (initial(b"n,a=someone,n=,r=ab"), "authzid"),
        (initial(b"n,,n=,r=a,b"), "client-first-message"),
    ],
)
def test_scram_refuses_malformed_initial_responses(payload: bytes, reason: str) -> None:
    auth = authenticator("scram-sha-256")
    auth.start()
    step = auth.feed(b"p", payload)
    assert_refused(step, "SASL authentication failed")
    assert reason in step.reason


@pytest.mark.parametrize("cut", [0, 5, 20, -10, -1])
def test_scram_refuses_truncated_final_messages(cut: int) -> None:
    auth = authenticator("scram-sha-256")
    auth.start()
    client = LibpqScram(PASSWORD)
    step = feed(auth, m.sasl_initial_response("SCRAM-SHA-256", client.first()))
    final = client.final(auth_requests(step.send)[0].data)
    assert_refused(auth.feed(b"p", final[:cut]), "SASL authentication failed")


# -- wrong messages and misuse ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "expected"), [("plain", "password"), ("md5", "password"), ("scram-sha-256", "SASL")]
)
def test_a_query_instead_of_a_password_is_refused_like_postgresql(
    method: str, expected: str
) -> None:
    auth = authenticator(method)
    auth.start()
    step = feed(auth, m.query("SELECT 1"))
    assert_refused(step, f"expected {expected} response, got message type 81")


def test_a_wrong_message_in_the_middle_of_scram_is_refused() -> None:
    auth = authenticator("scram-sha-256")
    auth.start()
    feed(auth, m.sasl_initial_response("SCRAM-SHA-256", LibpqScram(PASSWORD).first()))
    assert_refused(feed(auth, m.sync()), "expected SASL response, got message type 83")


def test_terminate_ends_the_login_without_an_answer() -> None:
    auth = authenticator("md5")
    auth.start()
    step = feed(auth, m.terminate())
    assert (step.failed, step.send) == (True, b"")
    assert "left" in step.reason


def test_feeding_before_start_or_after_the_end_is_a_programming_error() -> None:
    auth = authenticator("plain")
    with pytest.raises(RuntimeError, match="state new"):
        auth.feed(b"p", b"x\0")
    auth.start()
    with pytest.raises(RuntimeError, match="already called"):
        auth.start()
    feed(auth, m.password_message(PASSWORD))
    with pytest.raises(RuntimeError, match="state ok"):
        auth.feed(b"p", b"x\0")


def test_repr_shows_user_method_and_state() -> None:
    auth = authenticator("md5", SCRAM_SECRET)
    assert repr(auth) == (
        "<ClientAuthenticator user='alice' database='app' method=scram-sha-256 state=new>"
    )
    auth.start()
    assert "state=wait_sasl_initial" in repr(auth)
