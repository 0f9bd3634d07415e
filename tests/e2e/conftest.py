"""End-to-end fixtures: a real ``millpond proxy`` process in front of a real PostgreSQL.

The proxy is started the way users start it: ``millpond proxy pgbouncer.ini``, with an
ini file written in PgBouncer's format. Every test runs twice: with the compiled lane
(``fast_lane = 1``, the default) and with the Python path alone (``fast_lane = 0``), so
each behaviour is checked on both (docs/proxy-data-path.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from millpond.embedded import PostgresCluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ProxyProcess:
    process: subprocess.Popen[str]
    port: int
    ini: Path
    log: Path

    def url(self, db: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def write_ini(
    path: Path,
    cluster: PostgresCluster,
    port: int,
    settings: dict[str, str],
    databases: str | None = None,
) -> None:
    lines = ["[databases]"]
    lines.append(databases or f"* = host=127.0.0.1 port={cluster.port}")
    lines.append("[pgbouncer]")
    base = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "pool_mode": "transaction",
        "default_pool_size": "5",
        "max_client_conn": "500",
        "admin_users": "postgres",
        "server_check_delay": "10",
    }
    base.update(settings)
    lines.extend(f"{k} = {v}" for k, v in base.items())
    path.write_text("\n".join(lines) + "\n")


def start_proxy_process(ini: Path, port: int, log: Path) -> ProxyProcess:
    cmd = [sys.executable, "-m", "millpond.cli", "proxy", str(ini), "-v"]
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "listening" in log.read_text():
            return ProxyProcess(proc, port, ini, log)
        if proc.poll() is not None:
            raise RuntimeError(f"millpond proxy exited: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"millpond proxy did not start: {log.read_text()}")


ProxyFactory = Callable[..., ProxyProcess]


def _path_settings(data_path: str) -> dict[str, str]:
    """The lane with the door (which wants no per-login log lines), or Python only."""
    if data_path == "lane":
        return {"fast_lane": "1", "log_connections": "0", "log_disconnections": "0"}
    return {"fast_lane": "0"}


@pytest.fixture(scope="module", params=["lane", "python"])
def data_path(request: pytest.FixtureRequest) -> str:
    """Which data path the proxies of this run use: the compiled lane, or Python's."""
    return str(request.param)


@pytest.fixture
def proxy_factory(pg_cluster: PostgresCluster, data_path: str) -> Iterator[ProxyFactory]:
    """Start proxies with given [pgbouncer] settings; all are stopped after the test."""
    made: list[ProxyProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="millpond-proxy-"))

    def factory(databases: str | None = None, **settings: str) -> ProxyProcess:
        port = free_port()
        ini = tmp / f"pgbouncer-{port}.ini"
        settings = {**_path_settings(data_path), **settings}
        write_ini(ini, pg_cluster, port, settings, databases)
        proxy = start_proxy_process(ini, port, tmp / f"proxy-{port}.log")
        made.append(proxy)
        return proxy

    yield factory
    for proxy in made:
        proxy.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tx_proxy(pg_cluster: PostgresCluster, data_path: str) -> Iterator[ProxyProcess]:
    """A transaction-mode proxy shared by a module."""
    tmp = Path(tempfile.mkdtemp(prefix="millpond-proxy-"))
    port = free_port()
    write_ini(tmp / "pgbouncer.ini", pg_cluster, port, _path_settings(data_path))
    proxy = start_proxy_process(tmp / "pgbouncer.ini", port, tmp / "proxy.log")
    yield proxy
    proxy.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def pg_tool(cluster: PostgresCluster, name: str) -> str:
    """psql/pgbench: the cluster's own binary, else the one on PATH."""
    own = cluster.bin_dir / name
    if own.exists():
        return str(own)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


def run_tool(
    args: list[str], *, timeout: float = 60, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, input=stdin
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}): {result.stderr}")
    return result
