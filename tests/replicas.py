"""Streaming replicas of a throwaway primary, for the read/write splitting tests.

:class:`ReplicaCluster` is a :class:`~millpond.embedded.PostgresCluster` whose data
directory is made by ``pg_basebackup -R`` from a running primary instead of by
``initdb``; everything else (its own temporary directory, a free loopback port, running
as the unprivileged ``millpond`` user when we are root, ``stop``/``start``/``cleanup``,
``dsn``, ``psql``) is the parent's. It adds :meth:`promote` and a few helpers for
pausing replay and waiting for it to catch up.

The primary needs nothing special: the embedded clusters already run with
``wal_level=replica``, ``max_wal_senders`` and ``replication`` lines in ``pg_hba.conf``.
"""

from __future__ import annotations

import time
from typing import Any

from millpond.embedded import ClusterError, PostgresCluster
from millpond.routing.topology import parse_lsn, record_end

_BASEBACKUP_TIMEOUT = 120


class ReplicaCluster(PostgresCluster):
    """A hot standby streaming from ``primary``, on a port of its own."""

    def __init__(self, primary: PostgresCluster, **kwargs: Any) -> None:
        kwargs.setdefault("bin_dir", primary.bin_dir)
        super().__init__(**kwargs)
        self.primary = primary

    def __repr__(self) -> str:
        return f"ReplicaCluster(port={self.port}, primary={self.primary.port})"

    def _initdb(self) -> None:
        """Called by ``start()`` when the data directory is empty: copy the primary."""
        primary = self.primary
        argv = [str(self.bin_dir / "pg_basebackup"), "-D", str(self.data_dir)]
        argv += ["-h", str(primary.socket_dir), "-p", str(primary.port), "-U", "postgres"]
        argv += ["-X", "stream", "-c", "fast", "-R", "--no-sync"]
        result = self._run(argv, as_owner=True, timeout=_BASEBACKUP_TIMEOUT)
        if result.returncode != 0:
            raise ClusterError(f"pg_basebackup failed ({result.returncode}): {result.stderr}")

    def promote(self) -> None:
        """Make this standby a primary (``pg_ctl promote``, waiting until it is done)."""
        result = self._pg_ctl("promote", "-w", "-t", "60")
        if result.returncode != 0:
            raise self._failure("promote", result)

    def pause_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> str:
        return self.psql("SELECT pg_last_wal_replay_lsn()").strip()

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed the primary's current WAL position."""
        insert = parse_lsn(self.primary.psql("SELECT pg_current_wal_insert_lsn()").strip())
        target = format_lsn(record_end(insert or 0))
        deadline = time.monotonic() + timeout
        sql = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
        while self.psql(sql).strip() != "t":
            if time.monotonic() > deadline:
                raise ClusterError(f"{self!r} did not replay {target} within {timeout}s")
            time.sleep(0.05)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def start_replica(primary: PostgresCluster, **kwargs: Any) -> ReplicaCluster:
    """A started standby of ``primary`` that has caught up with it."""
    replica = ReplicaCluster(primary, **kwargs)
    try:
        replica.start()
        replica.wait_caught_up()
    except BaseException:
        replica.cleanup()
        raise
    return replica
