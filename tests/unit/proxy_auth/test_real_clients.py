"""Real client libraries (libpq via psycopg, asyncpg) authenticating to ClientAuthenticator.

A tiny asyncio server on 127.0.0.1 plays the proxy's login: it runs the authenticator and,
on success, sends the few messages a client needs to consider itself connected.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import psycopg
import pytest

from millpond.proxy.auth import AuthStep, ClientAuthenticator, md5_password_hash
from millpond.proxy.protocol import MessageReader, SSLRequest, StartupMessage, StartupReader
from millpond.proxy.protocol import messages as m
from tests.helpers import run
from tests.unit.proxy_auth.exchange import scram_secret

PASSWORD = "real-client-pässword"
SECRETS = {
    "plain": PASSWORD,
    "md5": md5_password_hash(PASSWORD, "app"),
    "scram": scram_secret(PASSWORD),
}
WELCOME = b"".join(
    [
        m.parameter_status("server_version", "16.0"),
        m.parameter_status("client_encoding", "UTF8"),
        m.parameter_status("server_encoding", "UTF8"),
        m.parameter_status("standard_conforming_strings", "on"),
        m.parameter_status("DateStyle", "ISO, MDY"),
        m.parameter_status("integer_datetimes", "on"),
        m.backend_key_data(1234, 5678),
        m.ready_for_query(),
    ]
)


async def startup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> StartupMessage:
    """Refuse TLS and return the StartupMessage."""
    packets = StartupReader()
    while True:
        packets.feed(await reader.read(4096))
        while (packet := packets.next_packet()) is not None:
            if isinstance(packet, SSLRequest):
                writer.write(m.SSL_REJECTED)
            elif isinstance(packet, StartupMessage):
                return packet


async def authenticate(
    auth: ClientAuthenticator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AuthStep:
    step = auth.start()
    writer.write(step.send)
    messages = MessageReader()
    while not step.done:
        data = await reader.read(4096)
        if not data:
            break
        messages.feed(data)
        for message in messages:
            step = auth.feed(message.type, message.payload)
            writer.write(step.send)
            if step.done:
                break
    return step


@asynccontextmanager
async def proxy_login(method: str, secret: str | None) -> AsyncIterator[tuple[int, list[AuthStep]]]:
    """Serve logins on a free port; yields the port and the final step of each login."""
    outcomes: list[AuthStep] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packet = await startup(reader, writer)
        auth = ClientAuthenticator(method, packet.user, secret, database=packet.database)
        step = await authenticate(auth, reader, writer)
        outcomes.append(step)
        if step.ok:
            writer.write(WELCOME)
            await reader.read(4096)  # the client's Terminate (or whatever it sends first)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], outcomes
    finally:
        server.close()
        await server.wait_closed()


def libpq_connect(port: int, password: str) -> None:
    dsn = f"host=127.0.0.1 port={port} user=app dbname=app password={password} sslmode=disable"
    psycopg.connect(dsn, connect_timeout=10).close()


async def with_libpq(method: str, secret: str | None, password: str) -> list[AuthStep]:
    async with proxy_login(method, secret) as (port, outcomes):
        try:
            await asyncio.to_thread(libpq_connect, port, password)
        except psycopg.OperationalError as exc:
            outcomes.append(AuthStep(outcomes[-1].outcome, reason=str(exc)))
        return outcomes


async def with_asyncpg(method: str, secret: str | None, password: str) -> list[AuthStep]:
    async with proxy_login(method, secret) as (port, outcomes):
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user="app",
                database="app",
                password=password,
                ssl=False,
                timeout=10,
            )
            await conn.close()
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            outcomes.append(AuthStep(outcomes[-1].outcome, reason=str(exc)))
        return outcomes


CASES = [
    ("plain", "plain"),
    ("md5", "plain"),
    ("md5", "md5"),
    ("md5", "scram"),
    ("scram-sha-256", "plain"),
    ("scram-sha-256", "scram"),
]


@pytest.mark.parametrize(("method", "stored"), CASES)
def test_libpq_logs_in(method: str, stored: str) -> None:
    (step,) = run(with_libpq(method, SECRETS[stored], PASSWORD))
    assert step.ok


@pytest.mark.parametrize(("method", "stored"), CASES)
def test_asyncpg_logs_in(method: str, stored: str) -> None:
    (step,) = run(with_asyncpg(method, SECRETS[stored], PASSWORD))
    assert step.ok


@pytest.mark.parametrize(
    ("method", "text"),
    [("md5", "password authentication failed"), ("scram-sha-256", "SASL authentication failed")],
)
@pytest.mark.parametrize("secret", [PASSWORD, None], ids=["wrong-password", "unknown-user"])
def test_libpq_shows_pgbouncers_error(method: str, text: str, secret: str | None) -> None:
    step, client_side = run(with_libpq(method, secret, "wrong"))
    assert step.failed
    assert text in client_side.reason


def test_asyncpg_gets_sqlstate_08p01_for_a_wrong_password() -> None:
    async def attempt() -> str:
        async with proxy_login("scram-sha-256", PASSWORD) as (port, _):
            with pytest.raises(asyncpg.PostgresError) as caught:
                await asyncpg.connect(
                    host="127.0.0.1", port=port, user="app", password="wrong", ssl=False
                )
            return str(caught.value.sqlstate)

    assert run(attempt()) == "08P01"
