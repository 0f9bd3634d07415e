"""ServerAuthenticator logging in to a real PostgreSQL with each method it may ask for."""

from __future__ import annotations

import asyncio

import pytest

from millpond.embedded import PostgresCluster
from millpond.proxy.auth import md5_password_hash
from millpond.proxy.auth_server import AuthDone, ServerAuthenticator
from millpond.proxy.protocol import MessageReader
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import ErrorResponse, decode_error_response
from tests.helpers import ClusterFactory, run

PASSWORD = "pg-pässword"
HBA = [
    "host all scram_u 127.0.0.1/32 scram-sha-256",
    "host all md5_u 127.0.0.1/32 md5",
    "host all pw_u 127.0.0.1/32 password",
]


@pytest.fixture
def cluster(own_cluster: ClusterFactory) -> PostgresCluster:
    """A cluster with one user per method; md5_u's password is stored as an MD5 hash."""
    cluster = own_cluster(hba_lines=HBA)
    cluster.create_user("scram_u", password=PASSWORD)
    cluster.create_user("pw_u", password=PASSWORD)
    cluster.psql(f"SET password_encryption = 'md5'; CREATE ROLE md5_u LOGIN PASSWORD '{PASSWORD}'")
    return cluster


async def login(cluster: PostgresCluster, user: str, secret: str) -> AuthDone | ErrorResponse:
    """Log in over raw TCP; AuthDone once ReadyForQuery arrives, or the server's error."""
    reader, writer = await asyncio.open_connection(cluster.host, cluster.port)
    auth, done = ServerAuthenticator(user, secret), None
    messages = MessageReader()
    writer.write(m.startup_message({"user": user, "database": "postgres"}))
    try:
        while data := await reader.read(65536):
            messages.feed(data)
            for message in messages:
                if message.type == m.ERROR_RESPONSE:
                    return decode_error_response(message.payload)
                if message.type == m.READY_FOR_QUERY and done is not None:
                    return done
                if message.type == m.AUTHENTICATION:
                    reply = auth.feed(message.payload)
                    if isinstance(reply, AuthDone):
                        done = reply
                    elif reply is not None:
                        writer.write(reply)
        raise AssertionError("the server closed the connection during login")
    finally:
        writer.write(m.terminate())
        writer.close()
        await writer.wait_closed()


METHODS = {"scram_u": "scram-sha-256", "md5_u": "md5", "pw_u": "password"}
# Each test starts its own cluster, so each covers every user in one go.


def test_each_method_logs_in_and_reaches_ready_for_query(cluster: PostgresCluster) -> None:
    for user, method in METHODS.items():
        assert run(login(cluster, user, PASSWORD)) == AuthDone(method), user
    secret = md5_password_hash(PASSWORD, "md5_u")
    assert run(login(cluster, "md5_u", secret)) == AuthDone("md5"), "md5 from the stored hash"


def test_a_wrong_password_gets_postgresqls_28p01(cluster: PostgresCluster) -> None:
    for user in METHODS:
        error = run(login(cluster, user, PASSWORD + "x"))
        assert isinstance(error, ErrorResponse), user
        assert (error.severity, error.code) == ("FATAL", "28P01"), user
        assert error.message == f'password authentication failed for user "{user}"'
