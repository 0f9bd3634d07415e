"""Zero wrong results: the differential workload through transaction pooling (issue 5)."""

from __future__ import annotations

from millpond.embedded import PostgresCluster
from tests.e2e.conftest import ProxyFactory
from tests.e2e.differential import run_differential
from tests.helpers import run


def test_no_wrong_results_under_random_load(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(default_pool_size="4")
    report = run(
        run_differential(
            proxy.url(), pg_cluster.dsn(), "postgres", clients=40, ops=8000, seed=7, kill_every=None
        ),
        timeout=240,
    )
    assert report.mismatches == []
    assert report.ops >= 8000
    assert not any(k.startswith("connection lost") for k in report.outcomes), report.outcomes


def test_no_wrong_results_while_servers_are_killed(
    pg_cluster: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(default_pool_size="4")
    report = run(
        run_differential(
            proxy.url(), pg_cluster.dsn(), "postgres", clients=40, ops=8000, seed=11, kill_every=0.3
        ),
        timeout=240,
    )
    assert report.kills > 0
    assert report.mismatches == []
