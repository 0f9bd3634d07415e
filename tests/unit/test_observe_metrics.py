"""Prometheus collectors over library pools (memory driver, no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

import millpond
from millpond.observe import PoolCollector
from millpond.observe.metrics import EXPORT_BOUNDS, export_buckets, render
from millpond.observe.remote import snapshot_from_metrics
from millpond.observe.snapshot import PoolsSource, dsn_labels, view_json
from millpond.pool.stats import Histogram
from tests.helpers import run

DSN = "postgresql://app@db.example:6432/shop"


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (name, labels), parsed back from the text."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels``."""
    hits = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_in_use_waiting_and_wait_count_under_a_known_load() -> None:
    async def main() -> None:
        pool = millpond.create_pool(DSN, driver="memory", name="shop", min_size=2, max_size=5)
        async with pool:
            registry = CollectorRegistry()
            registry.register(PoolCollector(pool, {"role": "primary"}))
            held = [await pool.acquire() for _ in range(5)]  # every connection lent
            waiters = [asyncio.create_task(pool.fetchval("SELECT 1")) for _ in range(3)]
            await asyncio.sleep(0.01)
            found = samples(registry)
            assert value(found, "db_client_connection_count", state="used") == 5
            assert value(found, "db_client_connection_count", state="idle") == 0
            assert value(found, "millpond_pool_connections", state="in_use") == 5
            assert value(found, "db_client_connection_pending_requests") == 3
            assert value(found, "db_client_connection_max") == 5
            assert value(found, "db_client_connection_idle_min") == 2
            assert value(found, "millpond_pool_size") == 5
            for conn in held:
                await pool.release(conn)
            assert await asyncio.gather(*waiters) == [1, 1, 1]
            for _ in range(20):
                await pool.fetchval("SELECT 1")
            stats = pool.stats()
            found = samples(registry)
            acquires = value(found, "millpond_pool_acquires_total")
            assert acquires == stats.acquires == 5 + 3 + 20
            # every acquire records its wait (0 when a connection was idle)
            assert value(found, "db_client_connection_wait_time_seconds_count") == acquires
            assert value(found, "db_client_connection_wait_time_seconds_bucket", le="+Inf") == (
                acquires
            )
            assert value(found, "db_client_connection_use_time_seconds_count") == acquires
            # min_size=2 were idle: 3 of the first 5 waited for a connect, then the 3 waiters
            assert value(found, "millpond_pool_waits_total") == stats.waits == 6
            assert value(found, "db_client_connection_count", state="used") == 0
            assert value(found, "db_client_connection_wait_time_seconds_sum") == pytest.approx(
                stats.wait_time.sum
            )

    run(main())


def test_labels_come_from_the_dsn_and_can_be_overridden() -> None:
    assert dsn_labels(DSN) == {"database": "shop", "user": "app", "host": "db.example:6432"}
    assert dsn_labels("host=h port=5 dbname=d user=u") == {
        "database": "d",
        "user": "u",
        "host": "h:5",
    }
    assert dsn_labels(None) == {}

    async def main() -> None:
        async with millpond.create_pool(DSN, driver="memory", name="p1") as pool:
            registry = CollectorRegistry()
            registry.register(PoolCollector(pool, {"role": "replica", "host": "r1"}))
            found = samples(registry)
            labels = dict(
                next(ls for (n, ls) in found if n == "millpond_pool_size")  # one pool
            )
            assert labels == {
                "pool_name": "p1",
                "database": "shop",
                "user": "app",
                "host": "r1",
                "role": "replica",
            }

    run(main())


def test_one_collector_many_pools_and_no_duplicates() -> None:
    async def main() -> None:
        a = await millpond.create_pool(DSN, driver="memory", name="a")
        b = await millpond.create_pool(DSN, driver="memory", name="b")
        try:
            collector = PoolCollector([a, b])
            registry = CollectorRegistry()
            registry.register(collector)
            with pytest.raises(ValueError, match="Duplicated"):
                registry.register(PoolCollector(a))  # a second collector: refused
            names = {
                dict(ls)["pool_name"] for (n, ls) in samples(registry) if n == "millpond_pool_size"
            }
            assert names == {"a", "b"}
            with pytest.raises(ValueError, match="same labels"):
                collector.add(await millpond.create_pool(DSN, driver="memory", name="a"))
            collector.remove(b)
            names = {
                dict(ls)["pool_name"] for (n, ls) in samples(registry) if n == "millpond_pool_size"
            }
            assert names == {"a"}
        finally:
            await a.close()
            await b.close()

    run(main())


def test_openmetrics_exposition_parses_and_has_units() -> None:
    async def main() -> str:
        async with millpond.create_pool(DSN, driver="memory", name="om") as pool:
            await pool.fetchval("SELECT 1")
            registry = CollectorRegistry()
            registry.register(PoolCollector(pool))
            return generate_openmetrics(registry).decode()

    text = run(main())
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_om(text)}
    assert families["db_client_connection_wait_time_seconds"].type == "histogram"
    assert families["db_client_connection_wait_time_seconds"].unit == "seconds"
    assert families["millpond_pool_connections_closed"].type == "counter"
    assert families["millpond_pool_breaker_state"].type == "gauge"
    assert "# UNIT db_client_connection_use_time_seconds seconds" in text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=300, allow_nan=False), max_size=60))
def test_exported_buckets_are_exact_to_the_microsecond(durations: list[float]) -> None:
    h = Histogram()
    for d in durations:
        h.record(d)
    exported = export_buckets(h.snapshot())
    assert exported[-1] == ("+Inf", float(len(durations)))
    for (le, count), bound in zip(exported, EXPORT_BOUNDS, strict=False):
        limit_us = round(bound * 1_000_000)
        assert float(le) == pytest.approx(bound)
        assert count == sum(1 for d in durations if int(d * 1_000_000) < limit_us), le
    counts = [c for _, c in exported]
    assert counts == sorted(counts)


def test_breaker_and_resilience_fields_are_read_defensively() -> None:
    async def main() -> None:
        async with millpond.create_pool(DSN, driver="memory", name="old") as pool:
            source = PoolsSource()
            source.add(pool)
            view = source.view()
            stats = view.pools[0].stats
            # a PoolStats from before the breaker/retry fields existed
            older = SimpleNamespace(
                **{
                    f.name: getattr(stats, f.name)
                    for f in dataclasses.fields(stats)
                    if not f.name.startswith(("breaker", "retr"))
                }
            )
            pool_view = dataclasses.replace(view.pools[0], stats=older)  # type: ignore[arg-type]
            families = {m.name: m for m in render(dataclasses.replace(view, pools=(pool_view,)))}
            breaker = {
                s.labels["state"]: s.value for s in families["millpond_pool_breaker_state"].samples
            }
            assert breaker["disabled"] == 1
            assert breaker["open"] == 0
            assert families["millpond_pool_retries"].samples[0].value == 0

    run(main())


def test_metrics_rebuild_the_snapshot_for_top_and_advise() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with millpond.create_pool(DSN, driver="memory", name="shop", max_size=4) as pool:
            held = [await pool.acquire() for _ in range(3)]
            for conn in held[:1]:
                await pool.release(conn)
            collector = PoolCollector(pool)
            registry = CollectorRegistry()
            registry.register(collector)
            text = generate_latest(registry).decode()
            direct = view_json(collector.source.view())
            for conn in held[1:]:
                await pool.release(conn)
            return snapshot_from_metrics(text), direct

    rebuilt, direct = run(main())
    (a,), (b,) = rebuilt["pools"], direct["pools"]
    for field in ("in_use", "idle", "size", "max_size", "min_size", "acquires", "waiting"):
        assert a[field] == b[field], field
    assert a["labels"] == b["labels"]
    assert a["wait_time"]["count"] == b["wait_time"]["count"] == 3
    assert rebuilt["kind"] == "app"
    assert rebuilt["version"] == millpond.__version__


def test_pool_group_members_are_labelled_with_their_role() -> None:
    async def main() -> None:
        async with (
            millpond.create_pool(driver="memory", name="g:a", min_size=2) as a,
            millpond.create_pool(driver="memory", name="g:b", min_size=1) as b,
        ):
            await a.fetchval("SELECT 1")

            def member(name: str, role: str, declared: str, pool: millpond.Pool) -> Any:
                return SimpleNamespace(
                    name=name, role=role, declared_role=declared, pool=pool.stats(),
                    in_rotation=role == "replica", reason="ok", lag_seconds=0.5, weight=1.0,
                )  # fmt: skip

            class Group:  # what millpond.routing.PoolGroup.stats() tells
                name = "g"

                def stats(self) -> Any:
                    members = (member("a", "replica", "primary", a),  # after a failover
                               member("b", "unknown", "replica", b))  # fmt: skip
                    return SimpleNamespace(name="g", members=members)

            registry = CollectorRegistry()
            registry.register(PoolCollector(Group()))
            found = samples(registry)
            roles = {
                dict(ls)["pool_name"]: dict(ls)["role"]
                for (n, ls) in found
                if n == "millpond_pool_size"
            }
            assert roles == {"g:a": "replica", "g:b": "replica"}  # unknown: the declared role
            assert value(found, "millpond_pool_acquires_total", pool_name="g:a") == 1
            assert value(found, "millpond_pool_ready", pool_name="g:b") == 1

    run(main())


def test_scraped_from_another_thread_the_snapshot_is_taken_in_the_loop() -> None:
    # prometheus_client's start_http_server scrapes from its own thread
    async def main() -> None:
        async with millpond.create_pool(DSN, driver="memory", name="t", max_size=3) as pool:
            collector = PoolCollector(pool)
            registry = CollectorRegistry()
            registry.register(collector)
            threads = []
            real_view = collector.source.view

            def view() -> Any:
                threads.append(threading.get_ident())
                return real_view()

            collector.source.view = view  # type: ignore[method-assign]
            held = [await pool.acquire() for _ in range(2)]
            text = (await asyncio.to_thread(generate_latest, registry)).decode()
            assert threads == [threading.get_ident()]  # the loop's thread, not the scraper's
            assert 'state="used",user="app"} 2.0' in text
            for conn in held:
                await pool.release(conn)

    run(main())
