"""The proxy's two halves talking: ServerAuthenticator logging in to ClientAuthenticator."""

from __future__ import annotations

import pytest

from millpond.proxy.auth import ClientAuthenticator, ClientAuthState, md5_password_hash
from millpond.proxy.auth_server import AuthDone, ServerAuthenticator, ServerAuthError
from tests.unit.proxy_auth.exchange import round_trip, scram_secret

USER = "app_user"
PASSWORD = "s3cr3t-ü"
SECRETS = {
    "plain": PASSWORD,
    "md5": md5_password_hash(PASSWORD, USER),
    "scram": scram_secret(PASSWORD),
}
# method -> secret kind stored by the proxy's client side -> how the login runs
EXPECTED = {
    ("plain", "plain"): "password",
    ("plain", "md5"): "password",
    ("plain", "scram"): "password",
    ("md5", "plain"): "md5",
    ("md5", "md5"): "md5",
    ("md5", "scram"): "scram-sha-256",
    ("scram-sha-256", "plain"): "scram-sha-256",
    ("scram-sha-256", "scram"): "scram-sha-256",
}


@pytest.mark.parametrize(("method", "stored"), sorted(EXPECTED))
def test_the_right_password_logs_in(method: str, stored: str) -> None:
    client = ClientAuthenticator(method, USER, SECRETS[stored])
    done = round_trip(client, ServerAuthenticator(USER, PASSWORD))
    assert done == AuthDone(EXPECTED[method, stored])
    assert client.state is ClientAuthState.OK


@pytest.mark.parametrize(("method", "stored"), sorted(EXPECTED))
def test_a_wrong_password_is_refused(method: str, stored: str) -> None:
    client = ClientAuthenticator(method, USER, SECRETS[stored])
    assert round_trip(client, ServerAuthenticator(USER, PASSWORD + "!")) is None
    assert client.state is ClientAuthState.FAILED


@pytest.mark.parametrize("method", ["plain", "md5", "scram-sha-256"])
def test_an_unknown_user_is_refused(method: str) -> None:
    client = ClientAuthenticator(method, USER, None)
    assert round_trip(client, ServerAuthenticator(USER, PASSWORD)) is None
    assert client.state is ClientAuthState.FAILED


def test_md5_hash_on_both_sides_logs_in() -> None:
    client = ClientAuthenticator("md5", USER, SECRETS["md5"])
    done = round_trip(client, ServerAuthenticator(USER, SECRETS["md5"]))
    assert done == AuthDone("md5")


def test_trust_needs_no_password() -> None:
    client = ClientAuthenticator("trust", USER, "")
    assert round_trip(client, ServerAuthenticator(USER, None)) == AuthDone("trust")


def test_scram_with_only_a_scram_secret_on_the_logging_in_side_is_a_clear_error() -> None:
    client = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    with pytest.raises(ServerAuthError, match="only a SCRAM secret"):
        round_trip(client, ServerAuthenticator(USER, SECRETS["scram"]))


def test_scram_with_an_md5_hash_stored_is_refused_by_the_client_side() -> None:
    client = ClientAuthenticator("scram-sha-256", USER, SECRETS["md5"])
    assert round_trip(client, ServerAuthenticator(USER, PASSWORD)) is None


# -- SCRAM pass-through: a client's keys log the proxy in where it holds no password ----


def keys_from_a_client_login(secret: str) -> tuple[bytes, bytes]:
    """What the proxy learns when a client logs in with the password against ``secret``."""
    client = ClientAuthenticator("scram-sha-256", USER, secret)
    assert round_trip(client, ServerAuthenticator(USER, PASSWORD)) == AuthDone("scram-sha-256")
    assert client.scram_keys is not None
    return client.scram_keys


def test_scram_keys_of_a_client_log_in_to_a_server_with_the_same_secret() -> None:
    keys = keys_from_a_client_login(SECRETS["scram"])
    server_side = ClientAuthenticator("scram-sha-256", USER, SECRETS["scram"])  # PostgreSQL
    proxy = ServerAuthenticator(USER, SECRETS["scram"], scram_keys=keys)
    assert round_trip(server_side, proxy) == AuthDone("scram-sha-256")
    assert server_side.state is ClientAuthState.OK
    # and again: the keys are not used up, each exchange has its own nonces
    again = ClientAuthenticator("scram-sha-256", USER, SECRETS["scram"])
    assert round_trip(again, ServerAuthenticator(USER, None, scram_keys=keys)) is not None


def test_scram_keys_do_not_fit_a_server_with_another_secret() -> None:
    keys = keys_from_a_client_login(SECRETS["scram"])
    other = scram_secret(PASSWORD)  # the same password, another salt: other keys
    server_side = ClientAuthenticator("scram-sha-256", USER, other)
    assert round_trip(server_side, ServerAuthenticator(USER, None, scram_keys=keys)) is None
    assert server_side.state is ClientAuthState.FAILED


def test_only_a_login_against_a_scram_secret_yields_keys() -> None:
    for method, stored in (("scram-sha-256", "plain"), ("md5", "md5"), ("plain", "scram")):
        client = ClientAuthenticator(method, USER, SECRETS[stored])
        assert round_trip(client, ServerAuthenticator(USER, PASSWORD)) is not None
        assert client.scram_keys is None, (method, stored)


def test_a_server_that_does_not_hold_the_secret_cannot_pass_for_it() -> None:
    """The keyed client checks the server's signature: a server that accepted the proof
    without knowing ServerKey is refused."""
    keys = keys_from_a_client_login(SECRETS["scram"])
    forged = (keys[0], b"\0" * 32)  # the right ClientKey, a ServerKey the server lacks
    server_side = ClientAuthenticator("scram-sha-256", USER, SECRETS["scram"])
    with pytest.raises(ServerAuthError, match="failed to prove"):
        round_trip(server_side, ServerAuthenticator(USER, None, scram_keys=forged))
