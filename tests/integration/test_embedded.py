"""The throwaway-PostgreSQL harness itself: start, connect, restart, auth, cleanup."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from millpond import embedded
from millpond.embedded import ClusterError, PostgresCluster
from tests.helpers import ClusterFactory, run


def _postmaster_pid(cluster: PostgresCluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().split()[0])


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _accepts_tcp(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _asyncpg_select_1(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


async def _psycopg_async_select_1(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
        assert row is not None
        value: int = row[0]
        return value


def test_cluster_runs_with_test_settings(pg_cluster: PostgresCluster) -> None:
    assert pg_cluster.is_running()
    assert pg_cluster.version >= 12
    assert pg_cluster.psql("SELECT 1") == "1\n"
    out = pg_cluster.psql("SHOW fsync; SHOW max_connections; SHOW wal_level; SHOW hot_standby")
    assert out.split() == ["off", "300", "replica", "on"]
    assert pg_cluster.psql("SHOW listen_addresses").strip() == "127.0.0.1"
    # PostgreSQL never runs as root: as root the harness drops to an unprivileged user.
    owner = os.stat(f"/proc/{_postmaster_pid(pg_cluster)}").st_uid
    if os.geteuid() == 0:
        assert owner != 0
        assert pg_cluster.data_dir.stat().st_uid == owner
    else:
        assert owner == os.geteuid()


def test_asyncpg_connects(pg_dsn: str) -> None:
    assert run(_asyncpg_select_1(pg_dsn)) == 1


def test_psycopg_connects(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row == (1,)
    assert run(_psycopg_async_select_1(pg_dsn)) == 1


def test_psql_runs_statements_separately(pg_cluster: PostgresCluster) -> None:
    pg_cluster.create_database("embedded_psql")  # CREATE DATABASE needs its own statement
    out = pg_cluster.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7); SELECT x FROM t")
    assert out == "7\n"
    assert pg_cluster.psql("SELECT current_database()", dbname="embedded_psql") == "embedded_psql\n"
    with pytest.raises(ClusterError, match="no_such_table"):
        pg_cluster.psql("SELECT * FROM no_such_table")


@pytest.mark.parametrize("mode", ["immediate", "fast", "smart"])
def test_restart_then_accepts_connections(own_cluster: ClusterFactory, mode: str) -> None:
    pg = own_cluster()
    # synchronous_commit is off for speed: a crash may drop the last commits unless asked.
    pg.psql("SET synchronous_commit = on; CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    old_pid = _postmaster_pid(pg)

    async def scenario() -> int:
        conn = await asyncpg.connect(pg.dsn())
        if mode == "smart":  # smart waits for clients to leave
            await conn.close()
        else:
            pg.restart(mode=mode)
            with pytest.raises((asyncpg.PostgresError, ConnectionError, asyncpg.InterfaceError)):
                await conn.fetchval("SELECT 1")
            await conn.close()
            return await _asyncpg_select_1(pg.dsn())
        pg.restart(mode=mode)
        return await _asyncpg_select_1(pg.dsn())

    assert run(scenario()) == 1
    assert _postmaster_pid(pg) != old_pid
    assert pg.psql("SELECT count(*) FROM kept") == "1\n"


def test_stop_start_kill(own_cluster: ClusterFactory) -> None:
    pg = own_cluster()
    pg.stop()
    assert not pg.is_running()
    assert not _accepts_tcp(pg.port)
    pg.start()
    assert pg.psql("SELECT 1") == "1\n"
    pg.kill()
    assert not pg.is_running()
    pg.restart()  # starts a stopped server
    assert pg.is_running()
    with pytest.raises(ValueError, match="shutdown mode"):
        pg.stop(mode="gentle")


def test_scram_user(own_cluster: ClusterFactory) -> None:
    pg = own_cluster(hba_lines=["host all alice 127.0.0.1/32 scram-sha-256"])
    pg.create_user("alice", password="s3cr'et")
    pg.create_database("alicedb", owner="alice")
    stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
    assert stored.startswith("SCRAM-SHA-256$")
    good = pg.dsn(user="alice", dbname="alicedb", password="s3cr'et")
    bad = pg.dsn(user="alice", dbname="alicedb", password="wrong")

    assert run(_asyncpg_select_1(good)) == 1
    with psycopg.connect(good) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)
    with pytest.raises(asyncpg.InvalidPasswordError):
        run(_asyncpg_select_1(bad))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad)
    # Other users keep trust auth.
    assert run(_asyncpg_select_1(pg.dsn())) == 1


def test_superuser_flag(pg_cluster: PostgresCluster) -> None:
    pg_cluster.create_user("embedded_boss", superuser=True)
    pg_cluster.create_user("embedded_minion")
    out = pg_cluster.psql(
        "SELECT rolname, rolsuper FROM pg_roles WHERE rolname LIKE 'embedded_%' ORDER BY 1"
    )
    assert out.splitlines() == ["embedded_boss|t", "embedded_minion|f"]


def test_cleanup_stops_server_and_removes_files() -> None:
    pg = PostgresCluster()
    pg.start()
    root, port, pid = pg.data_dir.parent, pg.port, _postmaster_pid(pg)
    assert root.is_dir()
    assert _accepts_tcp(port)
    pg.cleanup()
    assert not root.exists()
    assert not _accepts_tcp(port)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    pg.cleanup()  # idempotent
    with pytest.raises(ClusterError, match="cleaned up"):
        pg.start()


def test_context_manager() -> None:
    with PostgresCluster(max_connections=20) as pg:
        root = pg.data_dir.parent
        assert pg.psql("SHOW max_connections") == "20\n"
    assert not root.exists()


def test_start_failure_reports_server_log() -> None:
    pg = PostgresCluster(settings={"shared_buffers": "not-a-size"})
    try:
        with pytest.raises(ClusterError, match="shared_buffers") as info:
            pg.start()
        assert "server log tail" in str(info.value)
    finally:
        pg.cleanup()


def test_port_clash_retries_elsewhere() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        pg = PostgresCluster()
        taken = squatter.getsockname()[1]
        pg._port = taken  # simulate losing the race for the picked port
        try:
            pg.start()
            assert pg.port != taken
            assert pg.psql("SELECT 1") == "1\n"
        finally:
            pg.cleanup()


def test_dsn_quotes_credentials(pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.dsn(user="a b", dbname="d/b", password="p@ss:w/rd")
    assert dsn == f"postgresql://a%20b:p%40ss%3Aw%2Frd@127.0.0.1:{pg_cluster.port}/d%2Fb"
    assert pg_cluster.host == "127.0.0.1"


def test_every_binary_source_works() -> None:
    """Each PostgreSQL found (system packages, the pgserver wheel) can run a cluster."""
    candidates = embedded.candidate_bin_dirs()
    assert candidates
    for bin_dir in candidates:
        with PostgresCluster(bin_dir=bin_dir) as pg:
            assert pg.bin_dir == bin_dir
            assert pg.psql("SELECT 1") == "1\n"


def test_no_binaries_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embedded.BIN_DIR_ENV, raising=False)
    monkeypatch.setattr(embedded, "candidate_bin_dirs", list)
    with pytest.raises(RuntimeError, match=r"pip install millpond\[embedded\]"):
        PostgresCluster()


def test_bin_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(embedded.BIN_DIR_ENV, str(tmp_path))
    with pytest.raises(ClusterError, match="lacks one of"):
        embedded.find_bin_dir()


def test_cli_serves_until_interrupted() -> None:
    argv = [sys.executable, "-m", "millpond.embedded", "--max-connections", "25"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            dsn = proc.stdout.readline().strip()
            assert dsn.startswith("postgresql://postgres@127.0.0.1:")
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SHOW max_connections").fetchone() == ("25",)
                row = conn.execute("SHOW data_directory").fetchone()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
    assert row is not None
    assert not Path(row[0]).exists()


def test_unreachable_binaries_are_reported() -> None:
    """As root the server runs as another user, who must be able to reach the binaries."""
    stranger = pwd.struct_passwd(("stranger", "x", 54321, 54321, "", "/", "/bin/sh"))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        locked = Path(tmp)
        (locked / "bin").mkdir()
        locked.chmod(0o700)
        with pytest.raises(ClusterError, match="cannot enter"):
            embedded._check_reachable(locked / "bin", stranger)
        locked.chmod(0o755)
        embedded._check_reachable(locked / "bin", stranger)
