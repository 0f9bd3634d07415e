"""Throwaway PostgreSQL clusters for tests, benchmarks and ``millpond demo``.

A :class:`PostgresCluster` lives in a fresh temporary directory, listens on a random
port of 127.0.0.1 and disappears on :meth:`PostgresCluster.cleanup`. Run as root, it
drops to an unprivileged ``millpond`` account, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final, Self
from urllib.parse import quote

__all__ = ["ClusterError", "PostgresCluster", "candidate_bin_dirs", "find_bin_dir"]

BIN_DIR_ENV = "MILLPOND_PG_BIN_DIR"
_REQUIRED = ("initdb", "pg_ctl", "postgres")
_MODES = frozenset({"fast", "immediate", "smart"})
_PORT_ATTEMPTS = 8
_TIMEOUT = 60
_CLASH_MARKERS = ("Address already in use", "could not create any TCP/IP sockets")


class ClusterError(RuntimeError):
    """A throwaway cluster could not be found, set up, started or stopped."""


def _usable(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED)


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``."""
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def _pg_config_dir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip())


def _pgserver_dir() -> Path | None:
    """The binaries bundled in the ``pgserver`` wheel, found without importing it."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def candidate_bin_dirs() -> list[Path]:
    """Every usable PostgreSQL bin directory, best first."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    found: list[Path] = []
    for path in [*system, _pg_config_dir(), _pgserver_dir()]:
        if path is not None and _usable(path) and path.resolve() not in found:
            found.append(path.resolve())
    return found


def find_bin_dir() -> Path:
    """The bin directory to use: ``$MILLPOND_PG_BIN_DIR`` or the best candidate."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        if not _usable(Path(override)):
            raise ClusterError(f"{BIN_DIR_ENV}={override} lacks one of {', '.join(_REQUIRED)}")
        return Path(override)
    candidates = candidate_bin_dirs()
    if not candidates:
        raise ClusterError(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: "
            "`pip install millpond[embedded]` for bundled ones, or install PostgreSQL "
            f"(e.g. `apt-get install postgresql`), or set {BIN_DIR_ENV}"
        )
    return candidates[0]


@functools.cache
def _service_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as; None when we are not root."""
    if os.geteuid() != 0:
        return None

    def lookup(name: str) -> pwd.struct_passwd | None:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            return None

    account = lookup("millpond")
    if account is None and shutil.which("useradd"):
        cmd = ["useradd", "--system", "--no-create-home", "millpond"]
        subprocess.run(cmd, capture_output=True, check=False, timeout=30)
        account = lookup("millpond")  # a concurrent process may have won the race
    account = account or lookup("nobody")
    if account is None:
        raise ClusterError("running as root and found no unprivileged user to run PostgreSQL")
    return account


def _check_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Fail early if ``account`` cannot reach ``path`` (e.g. binaries under /root)."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        bit = 0o100 if st.st_uid == account.pw_uid else 0o010 if st.st_gid == account.pw_gid else 1
        if not st.st_mode & bit:
            raise ClusterError(
                f"user {account.pw_name!r}, which runs PostgreSQL because we are root, cannot "
                f"enter {directory}: run as another user, or use binaries it can reach"
            )


@functools.cache
def _server_version(postgres: Path) -> int:
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"\(PostgreSQL\) (\d+)", out.stdout)
    if match is None:
        raise ClusterError(f"cannot read the version from {out.stdout!r}")
    return int(match.group(1))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_conf(value: str | int) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with test-friendly settings."""

    def __init__(
        self,
        *,
        max_connections: int = 300,
        settings: Mapping[str, str | int] | None = None,
        hba_lines: Sequence[str] = (),
        port: int | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.bin_dir: Final = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        self._account = _service_account()
        if self._account is not None:
            _check_reachable(self.bin_dir, self._account)
        self._fixed_port = port is not None
        self._port = port if port is not None else _free_port()
        self._settings: dict[str, str | int] = {"max_connections": max_connections}
        self._settings.update(settings or {})
        self._hba_lines = list(hba_lines)
        base = "/tmp" if self._account and os.path.isdir("/tmp") else None
        self._root = Path(tempfile.mkdtemp(prefix="millpond-pg-", dir=base))
        self.data_dir: Final = self._root / "data"
        self.socket_dir: Final = self._root / "sock"
        self.logfile: Final = self._root / "postgres.log"
        self._root.chmod(0o755)
        self._chown(self._root)
        self.socket_dir.mkdir(mode=0o755)
        self._chown(self.socket_dir)
        self._cleaned = False
        self._creator_pid = os.getpid()
        atexit.register(self.cleanup)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """The TCP port; chosen again if another process grabbed it first."""
        return self._port

    @property
    def version(self) -> int:
        """The server's major version, e.g. 16."""
        return _server_version(self.bin_dir / "postgres")

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self._port}, data_dir={str(self.data_dir)!r})"

    def start(self) -> None:
        """Start the server (creating the cluster the first time); no-op if it runs."""
        if self._cleaned:
            raise ClusterError("this cluster was cleaned up; make a new one")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            return
        for _ in range(_PORT_ATTEMPTS):
            self._write_config()
            log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
            result = self._pg_ctl("start", "-w", "-t", str(_TIMEOUT), "-l", str(self.logfile))
            if result.returncode == 0:
                return
            if self._fixed_port or not self._port_clash(log_offset):
                break
            self._port = _free_port()
        raise self._failure("start", result)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is fast, immediate or smart."""
        if not self.is_running():
            return
        result = self._pg_ctl("stop", "-m", self._mode(mode), "-w", "-t", str(_TIMEOUT))
        if result.returncode != 0:
            raise self._failure("stop", result)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (or start it if it is down)."""
        if not self.is_running():
            self.start()
            return
        log = str(self.logfile)
        result = self._pg_ctl(
            "restart", "-m", self._mode(mode), "-w", "-t", str(_TIMEOUT), "-l", log
        )
        if result.returncode != 0:
            raise self._failure("restart", result)

    def reload(self) -> None:
        """Make the server re-read its configuration files."""
        result = self._pg_ctl("reload")
        if result.returncode != 0:
            raise self._failure("reload", result)

    def kill(self) -> None:
        """Stop at once, like a crash; with synchronous_commit=off the last commits may go."""
        self.stop(mode="immediate")

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._pg_ctl("status").returncode == 0

    def cleanup(self) -> None:
        """Stop the server and delete every file of the cluster; safe to call twice."""
        if self._cleaned or os.getpid() != self._creator_pid:
            return
        self._cleaned = True
        atexit.unregister(self.cleanup)
        try:
            self.stop(mode="immediate")
        except (ClusterError, OSError, subprocess.SubprocessError):
            self._kill_postmaster()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def dsn(
        self, user: str = "postgres", dbname: str = "postgres", password: str | None = None
    ) -> str:
        """A ``postgresql://`` URL for this server over TCP."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run ``sql`` through psql over the unix socket and return its unaligned output."""
        binary = self.bin_dir / "psql"
        psql = str(binary) if binary.exists() else shutil.which("psql")
        if psql is None:
            raise ClusterError("psql not found next to the server binaries nor on PATH")
        argv = [psql, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.socket_dir), "-p", str(self._port), "-U", user, "-d", dbname]
        result = self._run(argv, as_owner=False, stdin=sql)
        if result.returncode != 0:
            raise ClusterError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, owner: str | None = None) -> None:
        owned = f" OWNER {_ident(owner)}" if owner else ""
        self.psql(f"CREATE DATABASE {_ident(name)}{owned}")

    def create_user(self, name: str, password: str | None = None, superuser: bool = False) -> None:
        """Create a login role; a password is stored as the server's default (scram)."""
        sql = f"CREATE ROLE {_ident(name)} LOGIN"
        if superuser:
            sql += " SUPERUSER"
        if password is not None:
            sql += " PASSWORD " + _quote_conf(password)
        self.psql(sql)

    def logfile_tail(self, n: int = 40) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _initdb(self) -> None:
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust"]
        argv += ["-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"]
        if self.version >= 13:
            argv.append("--no-instructions")
        result = self._run(argv, as_owner=True, timeout=120)
        if result.returncode != 0:
            raise ClusterError(f"initdb failed ({result.returncode}):\n{result.stderr.strip()}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'millpond.conf'\n")
        hba = [*self._hba_lines, "local all all trust", "local replication all trust"]
        hba += ["host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _write_config(self) -> None:
        settings: dict[str, str | int] = {
            "port": self._port,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "shared_buffers": "32MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "hot_standby": "on",
            "logging_collector": "off",
        }
        settings.update(self._settings)
        conf = self.data_dir / "millpond.conf"
        conf.write_text("".join(f"{k} = {_quote_conf(v)}\n" for k, v in settings.items()))
        self._chown(conf)

    def _port_clash(self, log_offset: int) -> bool:
        try:
            with self.logfile.open("rb") as log:
                log.seek(log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return False
        return any(marker in text for marker in _CLASH_MARKERS)

    def _failure(self, action: str, result: subprocess.CompletedProcess[str]) -> ClusterError:
        detail = (result.stderr or result.stdout).strip()
        return ClusterError(
            f"pg_ctl {action} failed ({result.returncode}) for {self!r}: {detail}\n"
            f"--- server log tail ({self.logfile}) ---\n{self.logfile_tail()}"
        )

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop the server: SIGKILL the postmaster."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    @staticmethod
    def _mode(mode: str) -> str:
        if mode not in _MODES:
            raise ValueError(f"shutdown mode must be one of {sorted(_MODES)}, not {mode!r}")
        return mode

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return self._run(argv, as_owner=True, timeout=_TIMEOUT + 30)

    def _run(
        self, argv: list[str], *, as_owner: bool, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool; ``as_owner`` runs it as the cluster's owner."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        account = self._account if as_owner else None
        if account is not None:
            env.update(HOME=str(self._root), USER=account.pw_name, LOGNAME=account.pw_name)
        try:
            return subprocess.run(
                argv,
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                cwd=self._root,
                timeout=timeout,
                check=False,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{argv[0]} timed out after {timeout}s for {self!r}") from exc

    def _chown(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster, print its DSN and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m millpond.embedded", description=main.__doc__)
    parser.add_argument("--port", type=int, help="TCP port (default: a random free one)")
    parser.add_argument("--max-connections", type=int, default=300)
    parser.add_argument("-c", "--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    settings = dict(item.split("=", 1) for item in args.set)
    with PostgresCluster(
        port=args.port, max_connections=args.max_connections, settings=settings
    ) as pg:
        print(pg.dsn(), flush=True)
        print(f"PostgreSQL {pg.version}, data in {pg.data_dir}; Ctrl-C stops it", file=sys.stderr)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
