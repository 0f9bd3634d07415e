"""The authentication matrix through the proxy: each client-side method, each server-side one.

Server side: PostgreSQL demands SCRAM from one user and MD5 from another; the proxy logs
in with the secret from its auth file. Client side: the proxy demands plain, md5,
scram-sha-256 or trust. Right passwords get in; wrong ones get PgBouncer's error, and
nobody gets in without the right secret.
"""

from __future__ import annotations

import hashlib
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory
from tests.helpers import run

USERS = {"scram_u": "sc-pw", "md5_u": "md-pw"}


@pytest.fixture(scope="module")
def auth_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(
        hba_lines=[
            "host all scram_u 127.0.0.1/32 scram-sha-256",
            "host all md5_u 127.0.0.1/32 md5",
        ]
    )
    cluster.start()
    cluster.create_user("scram_u", password=USERS["scram_u"])
    cluster.psql("SET password_encryption = 'md5'; CREATE ROLE md5_u LOGIN PASSWORD 'md-pw'")
    yield cluster
    cluster.cleanup()


def userlist(tmp: Path) -> Path:
    md5 = "md5" + hashlib.md5(b"md-pw" + b"md5_u").hexdigest()
    path = tmp / "userlist.txt"
    # scram_u: a plain password; md5_u: only its MD5 hash, as pg_shadow would hold it.
    path.write_text(f'"scram_u" "sc-pw"\n"md5_u" "{md5}"\n"postgres" "admin-pw"\n')
    return path


def connect_asyncpg(url: str) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(url, statement_cache_size=0)
        try:
            user = url.split("//")[1].split("@")[0].split(":")[0]
            assert await conn.fetchval("SELECT current_user") == user
        finally:
            await conn.close()

    run(main())


@pytest.mark.parametrize("auth_type", ["plain", "md5", "scram-sha-256"])
def test_password_methods(
    auth_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path, auth_type: str
) -> None:
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={auth_cluster.port}",
        auth_type=auth_type,
        auth_file=str(userlist(tmp_path)),
    )
    # scram_u: any client method works (the proxy holds the plain password).
    connect_asyncpg(proxy.url(user="scram_u", password="sc-pw"))
    with pytest.raises(asyncpg.PostgresError, match="authentication failed"):
        connect_asyncpg(proxy.url(user="scram_u", password="wrong"))
    with pytest.raises(asyncpg.PostgresError, match="authentication failed"):
        connect_asyncpg(proxy.url(user="nobody", password="sc-pw"))
    # md5_u: the proxy only has the MD5 hash. It can check md5/plain logins and log in
    # to an md5 server; a SCRAM login cannot be checked against an MD5 hash.
    if auth_type == "scram-sha-256":
        with pytest.raises(asyncpg.PostgresError, match="SASL authentication failed"):
            connect_asyncpg(proxy.url(user="md5_u", password="md-pw"))
    else:
        connect_asyncpg(proxy.url(user="md5_u", password="md-pw"))
        with pytest.raises(asyncpg.PostgresError, match="password authentication failed"):
            connect_asyncpg(proxy.url(user="md5_u", password="md-pwx"))


def test_libpq_scram_through_proxy(
    auth_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={auth_cluster.port}",
        auth_type="scram-sha-256",
        auth_file=str(userlist(tmp_path)),
    )
    with psycopg.connect(proxy.url(user="scram_u", password="sc-pw")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scram_u",)
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        psycopg.connect(proxy.url(user="scram_u", password="nope"))


def test_trust_still_needs_a_listed_user(
    auth_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={auth_cluster.port}",
        auth_type="trust",
        auth_file=str(userlist(tmp_path)),
    )
    connect_asyncpg(proxy.url(user="scram_u"))  # no password asked
    with pytest.raises(asyncpg.PostgresError, match='"trust" authentication failed'):
        connect_asyncpg(proxy.url(user="stranger"))


def test_unknown_database_after_login(
    auth_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    proxy = proxy_factory(
        databases=f"postgres = host=127.0.0.1 port={auth_cluster.port}",
        auth_type="md5",
        auth_file=str(userlist(tmp_path)),
    )
    with pytest.raises(asyncpg.PostgresError, match="no such database: elsewhere"):
        connect_asyncpg(proxy.url(db="elsewhere", user="scram_u", password="sc-pw"))
    # A wrong password to an unknown database reveals nothing about the database.
    with pytest.raises(asyncpg.PostgresError, match="password authentication failed"):
        connect_asyncpg(proxy.url(db="elsewhere", user="scram_u", password="bad"))


def test_scram_pass_through_with_only_the_servers_secret(
    auth_cluster: PostgresCluster, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The auth file holds scram_u's SCRAM secret as PostgreSQL stores it, no password:
    a client's SCRAM login gives the proxy the keys it then logs in to the server with
    (PgBouncer's SCRAM pass-through); a wrong password still gets nowhere."""
    secret = auth_cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scram_u'")
    assert secret.strip().startswith("SCRAM-SHA-256$")
    users = tmp_path / "userlist.txt"
    users.write_text(f'"scram_u" "{secret.strip()}"\n')
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={auth_cluster.port}",
        auth_type="scram-sha-256",
        auth_file=str(users),
    )
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        psycopg.connect(proxy.url(user="scram_u", password="wrong"))
    with psycopg.connect(proxy.url(user="scram_u", password="sc-pw")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scram_u",)
    connect_asyncpg(proxy.url(user="scram_u", password="sc-pw"))  # and a second client


def test_peer_auth_believes_the_unix_socket_peer(
    proxy_factory: ProxyFactory, pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """An hba ``peer`` rule (PgBouncer allows it only there, for local connections): over
    the Unix socket the login name must be the connecting process's own user
    (SO_PEERCRED); any other name is refused."""
    me = pwd.getpwuid(os.getuid()).pw_name
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    hba = tmp_path / "hba.conf"
    hba.write_text("local all all peer\n")
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={pg_cluster.port} user=postgres",
        auth_type="hba",
        auth_hba_file=str(hba),
        unix_socket_dir=str(sockets),
    )
    local = {"host": str(sockets), "port": proxy.port, "dbname": "postgres"}
    with psycopg.connect(**local, user=me) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)  # forced user
    with pytest.raises(psycopg.OperationalError, match="unix socket login rejected"):
        psycopg.connect(**local, user=f"not_{me}")  # type: ignore[arg-type]


def test_methods_millpond_lacks_are_refused_cleanly(proxy_factory: ProxyFactory) -> None:
    """auth_type = pam (PgBouncer's, not millpond's): every login gets a clear refusal,
    and the proxy keeps answering."""
    proxy = proxy_factory(auth_type="pam")
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError, match="login rejected"):
            psycopg.connect(proxy.url(), connect_timeout=5)
    assert "not supported by millpond" in proxy.log_text()
