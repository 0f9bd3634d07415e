"""Fixtures giving tests a real, throwaway PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from millpond.embedded import PostgresCluster
from tests.helpers import ClusterFactory


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One cluster shared by the whole run; tests must not stop or reconfigure it."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster: PostgresCluster) -> str:
    """Superuser DSN of the shared cluster."""
    return pg_cluster.dsn()


@pytest.fixture
def own_cluster() -> Iterator[ClusterFactory]:
    """Factory for private started clusters (fault tests); all are removed after the test."""
    made: list[PostgresCluster] = []

    def factory(**kwargs: Any) -> PostgresCluster:
        cluster = PostgresCluster(**kwargs)
        made.append(cluster)
        cluster.start()
        return cluster

    yield factory
    for cluster in made:
        cluster.cleanup()
