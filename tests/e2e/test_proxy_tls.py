"""TLS on both sides of the proxy: clients to the proxy, and the proxy to PostgreSQL."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from millpond.embedded import PostgresCluster
from millpond.proxy.backend import ServerState
from millpond.proxy.config import config_from_args
from millpond.proxy.protocol import messages as m
from millpond.proxy.server import Proxy
from tests.e2e.conftest import ProxyFactory
from tests.helpers import run
from tests.integration.test_proxy_lane import simple, the_pool, value
from tests.integration.test_proxy_tcp import options, server_fds


@pytest.fixture(scope="module")
def certs(pg_cluster: PostgresCluster) -> Iterator[Path]:
    """A self-signed certificate for 127.0.0.1, readable by the server's user."""
    tmp = Path(tempfile.mkdtemp(prefix="millpond-tls-"))
    os.chmod(tmp, 0o755)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    os.chmod(tmp / "key.pem", 0o600)
    if os.geteuid() == 0:  # the server runs as the harness's unprivileged user
        owner = pwd.getpwnam("millpond")
        for name in ("key.pem", "cert.pem"):
            os.chown(tmp / name, owner.pw_uid, owner.pw_gid)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_cluster(certs: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(
        settings={
            "ssl": "on",
            "ssl_cert_file": str(certs / "cert.pem"),
            "ssl_key_file": str(certs / "key.pem"),
        }
    )
    cluster.start()
    yield cluster
    cluster.cleanup()


def test_clients_talk_tls_to_the_proxy(proxy_factory: ProxyFactory, certs: Path) -> None:
    proxy = proxy_factory(
        client_tls_sslmode="require",
        client_tls_cert_file=str(certs / "cert.pem"),
        client_tls_key_file=str(certs / "key.pem"),
    )
    url = proxy.url()
    with psycopg.connect(url + "?sslmode=require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 'over tls'").fetchone() == ("over tls",)
    with psycopg.connect(url + f"?sslmode=verify-full&sslrootcert={certs / 'cert.pem'}") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        psycopg.connect(url + "?sslmode=disable")


def test_plaintext_stuffed_after_ssl_request_is_refused(
    proxy_factory: ProxyFactory, certs: Path
) -> None:
    """A StartupMessage sent in the clear right behind the SSLRequest (a man in the
    middle injecting a login) is refused before any handshake; others carry on."""
    proxy = proxy_factory(
        client_tls_sslmode="require",
        client_tls_cert_file=str(certs / "cert.pem"),
        client_tls_key_file=str(certs / "key.pem"),
    )
    startup = m.startup_message({"user": "postgres", "database": "postgres"})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(m.ssl_request() + startup)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer[:1] == b"E"  # an error, not 'S' and a handshake
    assert b"received unencrypted data after SSL request" in answer
    assert b"08P01" in answer
    with psycopg.connect(proxy.url() + "?sslmode=require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_proxy_talks_tls_to_the_server(
    proxy_factory: ProxyFactory, tls_cluster: PostgresCluster, certs: Path
) -> None:
    proxy = proxy_factory(
        databases=f"* = host=127.0.0.1 port={tls_cluster.port}",
        server_tls_sslmode="verify-full",
        server_tls_ca_file=str(certs / "cert.pem"),
    )
    with psycopg.connect(proxy.url()) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)


def test_required_server_tls_is_enforced(
    proxy_factory: ProxyFactory,
    pg_cluster: PostgresCluster,
    certs: Path,
    tls_cluster: PostgresCluster,
) -> None:
    # The shared cluster has no TLS: require must refuse to fall back to plain text.
    plain = proxy_factory(server_tls_sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(plain.url())
    # A certificate signed by someone else fails verification.
    other = certs / "other.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(certs / "other-key.pem"), "-out", str(other), "-subj", "/CN=x"],
        check=True, capture_output=True,
    )  # fmt: skip
    wrong_ca = proxy_factory(
        databases=f"* = host=127.0.0.1 port={tls_cluster.port}",
        server_tls_sslmode="verify-full",
        server_tls_ca_file=str(other),
    )
    with pytest.raises(psycopg.OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
        psycopg.connect(wrong_ca.url())


@pytest.fixture(scope="module")
def client_certs() -> Iterator[Path]:
    """Self-signed client certificates for CN=postgres and CN=stranger, both trusted."""
    tmp = Path(tempfile.mkdtemp(prefix="millpond-client-certs-"))
    for name in ("postgres", "stranger"):
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", str(tmp / f"{name}.key"), "-out", str(tmp / f"{name}.crt"),
                "-subj", f"/CN={name}",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        os.chmod(tmp / f"{name}.key", 0o600)  # libpq refuses a key others can read
    trusted = (tmp / "postgres.crt").read_text() + (tmp / "stranger.crt").read_text()
    (tmp / "trusted.pem").write_text(trusted)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_cert_auth_takes_the_user_from_the_certificate(
    proxy_factory: ProxyFactory, certs: Path, client_certs: Path
) -> None:
    """auth_type = cert: a verified client certificate whose CommonName is the login
    user gets in; another name, or no certificate, does not."""
    proxy = proxy_factory(
        auth_type="cert",
        client_tls_sslmode="verify-ca",
        client_tls_cert_file=str(certs / "cert.pem"),
        client_tls_key_file=str(certs / "key.pem"),
        client_tls_ca_file=str(client_certs / "trusted.pem"),
    )

    def url(name: str) -> str:
        crt, key = client_certs / f"{name}.crt", client_certs / f"{name}.key"
        return proxy.url() + f"?sslmode=require&sslcert={crt}&sslkey={key}"

    with psycopg.connect(url("postgres")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="certificate authentication failed"):
        psycopg.connect(url("stranger"))
    with pytest.raises(psycopg.OperationalError):  # no certificate: the handshake fails
        psycopg.connect(proxy.url() + "?sslmode=require&sslcert=/nonexistent")


def test_tls_server_connections_get_the_tcp_settings(
    tls_cluster: PostgresCluster, certs: Path
) -> None:
    """tcp_* settings reach a server connection under TLS too (its socket is found
    through the TLS transport)."""

    async def main() -> None:
        config = config_from_args(
            "127.0.0.1:0",
            tls_cluster.dsn(),
            auth_type="trust",
            unix_socket_dir="",
            server_tls_sslmode="verify-full",
            server_tls_ca_file=str(certs / "cert.pem"),
            tcp_keepidle="33",
        )
        proxy = Proxy(config)
        await proxy.start()
        try:
            conn = await simple(proxy)
            sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            assert await value(conn, sql) is True
            servers = server_fds(proxy)
            assert servers
            for fd in servers:
                got = options(fd)
                assert (got["keepalive"], got["idle"]) == (1, 33)
            await conn.close()
            conns = [s.conn for s in the_pool(proxy)._core.slots.values() if s.conn]
        finally:
            await proxy.shutdown(timeout=1)
        # shutdown returns once each server connection is gone, its TLS close included:
        # a loop closed before that fails with EBUSY (it did, on a loaded CI machine)
        assert conns
        assert all(c.state is ServerState.CLOSED for c in conns)

    run(main())
