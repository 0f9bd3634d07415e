"""The sizing advisor's figures against hand-computed cases (no network)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import pytest

from millpond.observe import advise, advisor
from millpond.observe.cli import add_arguments


def erlang_c_direct(c: int, a: float) -> float:
    """Erlang C from its textbook formula (factorials), independent of the recurrence."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def miss_direct(c: int, qps: float, s: float, t: float) -> float:
    a = qps * s
    return erlang_c_direct(c, a) * math.exp(-(c - a) * t / s)


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="millpond")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


# -- the formulas -----------------------------------------------------------------------


def test_the_issues_example_503_vs_50() -> None:
    r = advisor.size(1000, 0.050)  # 1000 queries/s of 50 ms, default W = 100 ms, R = 3
    assert r.article == pytest.approx(503)  # (1000 × 50 ms) / 100 ms + 3
    assert r.busy == pytest.approx(50)  # 1000/s × 0.05 s
    # 51 and 52 connections leave more than 1% of acquires waiting over 100 ms; 53 do not
    assert miss_direct(52, 1000, 0.05, 0.1) > 0.01 > miss_direct(53, 1000, 0.05, 0.1)
    assert r.recommended == 53
    assert r.wait_miss == pytest.approx(miss_direct(53, 1000, 0.05, 0.1))


@pytest.mark.parametrize(
    ("qps", "query_s", "wait_s", "reserve", "article", "busy"),
    [
        (1000, 0.050, 0.100, 3, 503, 50),
        (1000, 0.050, 0.050, 3, 1003, 50),  # halve the patience: twice the "connections"
        (100, 0.020, 0.100, 3, 23, 2),
        (250, 0.004, 0.010, 0, 100, 1),
        (0, 0.050, 0.100, 3, 3, 0),
    ],
)
def test_article_and_littles_law_by_hand(
    qps: float, query_s: float, wait_s: float, reserve: float, article: float, busy: float
) -> None:
    assert advisor.article_formula(qps, query_s, wait_s, reserve) == pytest.approx(article)
    assert advisor.littles_law(qps, query_s) == pytest.approx(busy)


def test_erlang_c_by_hand_and_against_the_textbook_formula() -> None:
    # c = 3, a = 2: B = (8/6) / (1 + 2 + 2 + 8/6) = 4/19; C = 3B / (3 - 2(1 - B)) = 4/9
    assert advisor.erlang_c(3, 2.0) == pytest.approx(4 / 9)
    assert advisor.erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    for c, a in [(2, 1.5), (10, 7.3), (53, 50.0), (120, 100.0)]:
        assert advisor.erlang_c(c, a) == pytest.approx(erlang_c_direct(c, a), rel=1e-9)
    assert advisor.erlang_c(5, 5.0) == 1.0  # saturated: everyone waits
    assert advisor.mean_wait(5, 100, 0.05) == math.inf
    # M/M/1 mean wait: rho / (mu - lambda) = 0.5 / (20 - 10) = 50 ms
    assert advisor.mean_wait(1, 10, 0.05) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("qps", "query_s", "wait_s"),
    [(1000, 0.05, 0.1), (200, 0.01, 0.1), (300, 0.01, 0.1), (5000, 0.002, 0.005), (3, 1.0, 2.0)],
)
def test_recommendation_is_the_smallest_that_meets_the_target(
    qps: float, query_s: float, wait_s: float
) -> None:
    c = advisor.servers_for_wait(qps, query_s, wait_s)
    assert c > qps * query_s
    assert miss_direct(c, qps, query_s, wait_s) <= 0.01
    if c - 1 > qps * query_s:
        assert miss_direct(c - 1, qps, query_s, wait_s) > 0.01


def test_database_ceiling_and_max_connections_warnings() -> None:
    r = advisor.size(1000, 0.05, cores=4, spindles=1, instances=4, max_connections=50)
    assert r.ceiling == 9  # 4 cores × 2 + 1 spindle
    assert r.per_instance == advisor.servers_for_wait(250, 0.05, 0.1)
    text = advisor.explain(r)
    assert "exceed what the server runs at once efficiently (cores × 2 + spindles = 9)" in text
    assert f"4 × {r.per_instance} = {4 * r.per_instance} connections exceed" in text
    with pytest.raises(ValueError, match="target wait"):
        advisor.article_formula(1, 1, 0, 0)
    with pytest.raises(ValueError, match="percentile"):
        advisor.size(1, 1, percentile=1.5)


def test_size_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli("size", "--query-ms", "50", "--qps", "1000", capsys=capsys)
    assert code == 0
    assert "((1000 × 50 ms) / 100 ms) + 3 = 503" in out
    assert "= 50 connections busy on average" in out
    assert "recommended: max_size = 53, min_size = 50" in out
    assert "Why they differ" in out
    code, out = cli("size", "--query-ms", "50", "--qps", "1000", "--json", capsys=capsys)
    data = json.loads(out)
    assert (data["article"], data["busy"], data["recommended"]) == (503, 50, 53)
    code, out = cli("size", "--query-ms", "0", "--qps", "10", capsys=capsys)
    assert code == 2
    assert "query time > 0" in out


# -- advise: telling a leak from an undersized pool -----------------------------------


def hist(count: float, mean: float, upper: float | None = None) -> dict[str, Any]:
    upper = mean if upper is None else upper
    return {"count": count, "sum": count * mean, "buckets": [[upper, count]] if count else []}


def pool_fields(**pool: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "key": "app", "name": "app", "acquires": 0, "timeouts": 0, "rejected": 0,
        "waiting": 0, "in_use": 0, "idle": 0, "size": 0, "max_size": 10, "min_size": 1,
        "leaks": 0, "oldest_lease_age": 0.0, "wait_time": hist(0, 0), "use_time": hist(0, 0),
    }  # fmt: skip
    base.update(pool)
    return base


def window(first: dict[str, Any], last: dict[str, Any], n: int = 11) -> list[dict[str, Any]]:
    """``n`` snapshots over 10 s, numbers moving linearly from ``first`` to ``last``."""
    a, b = pool_fields(**first), pool_fields(**last)

    def mix(x: Any, y: Any, f: float) -> Any:
        if isinstance(x, dict):
            return {k: mix(x[k], y[k], f) for k in x}
        if isinstance(x, list):
            if x and y:
                return [mix(p, q, f) for p, q in zip(x, y, strict=True)]
            return [[u, n * f] for u, n in y] if y else x
        if isinstance(x, str):
            return x
        return x + (y - x) * f

    return [{"time": 10 * i / (n - 1), "pools": [mix(a, b, i / (n - 1))]} for i in range(n)]


def test_advise_ok_load_known_answer() -> None:
    # 200 acquires/s holding 10 ms: busy 2; Erlang C for W = 100 ms says 3
    snaps = window(
        {"acquires": 0, "use_time": hist(0, 0.01), "wait_time": hist(0, 0, 1e-6),
         "in_use": 2, "idle": 3, "size": 5, "max_size": 5},
        {"acquires": 2000, "use_time": hist(2000, 0.01), "wait_time": hist(2000, 0, 1e-6),
         "in_use": 2, "idle": 3, "size": 5, "max_size": 5},
    )  # fmt: skip
    (a,) = advise.analyze(snaps)
    o = a.observation
    assert o.arrival_rate == pytest.approx(200)
    assert o.use_mean == pytest.approx(0.01)
    assert o.busy == pytest.approx(2)
    assert a.verdict == "ok"
    assert (a.min_size, a.max_size) == (2, 3)


def test_advise_oversized() -> None:
    snaps = window(
        {"use_time": hist(0, 0.01), "idle": 18, "in_use": 2, "size": 20, "max_size": 20},
        {"acquires": 2000, "use_time": hist(2000, 0.01), "idle": 18, "in_use": 2, "size": 20,
         "max_size": 20},
    )  # fmt: skip
    (a,) = advise.analyze(snaps)
    assert a.verdict == "oversized"
    assert a.max_size == 3


def test_advise_undersized() -> None:
    # 300/s arrive, 2 connections of 10 ms serve 200/s: 950 time out, the queue grows by 50
    snaps = window(
        {"use_time": hist(0, 0.01), "wait_time": hist(0, 0.5), "in_use": 2, "size": 2,
         "max_size": 2, "waiting": 0},
        {"acquires": 2000, "timeouts": 950, "use_time": hist(2000, 0.01),
         "wait_time": hist(2000, 0.5), "in_use": 2, "size": 2, "max_size": 2, "waiting": 50},
    )  # fmt: skip
    (a,) = advise.analyze(snaps)
    o = a.observation
    assert o.arrival_rate == pytest.approx(300)
    assert o.completed_rate == pytest.approx(200)
    assert o.full_share == 1
    assert a.verdict == "undersized"
    assert a.max_size == advisor.servers_for_wait(300, 0.01, 0.1)
    assert any("max_size 2 -> " in f for f in a.findings)


@pytest.mark.parametrize("leak_counter", [5, 0])
def test_advise_tells_a_leak_from_an_undersized_pool(leak_counter: int) -> None:
    # 50/s of 10 ms need 0.5 connections, yet 6 are in use all along and the pool is
    # full with callers waiting: 5 leases never come back (with or without leak_threshold)
    snaps = window(
        {"use_time": hist(0, 0.01), "in_use": 6, "size": 6, "max_size": 6, "waiting": 1,
         "oldest_lease_age": 30.0, "wait_time": hist(0, 0.2)},
        {"acquires": 500, "use_time": hist(500, 0.01), "in_use": 6, "size": 6, "max_size": 6,
         "waiting": 1, "oldest_lease_age": 40.0, "leaks": leak_counter,
         "wait_time": hist(500, 0.2)},
    )  # fmt: skip
    (a,) = advise.analyze(snaps)
    assert a.verdict == "leak"
    assert any("held and not returned" in f for f in a.findings)
    assert any("a bigger pool would only run out later" in f for f in a.findings)
    if leak_counter:
        assert any("5 lease(s) held past leak_threshold" in f for f in a.findings)


def test_advise_idle_and_fully_leaked() -> None:
    (a,) = advise.analyze(window({}, {}))
    assert a.verdict == "idle"
    stuck = window(
        {"in_use": 4, "size": 4, "max_size": 4, "oldest_lease_age": 5.0},
        {"in_use": 4, "size": 4, "max_size": 4, "oldest_lease_age": 15.0},
    )
    (a,) = advise.analyze(stuck)
    assert a.verdict == "leak"


def test_capacity_warnings() -> None:
    snaps = window(
        {"use_time": hist(0, 0.01), "max_size": 20, "size": 20, "idle": 20},
        {"acquires": 2000, "use_time": hist(2000, 0.01), "max_size": 20, "size": 20, "idle": 20},
    )
    advice = advise.analyze(snaps)
    warnings = advise.capacity_warnings(advice, instances=10, max_connections=100, reserved=3)
    assert len(warnings) == 1  # 20 × 10 = 200 configured > 97; 3 × 10 = 30 recommended fit
    assert "configured pool sizes x 10 instances = 200 connections" in warnings[0]
    assert advise.capacity_warnings(advice, 10, None) == []
    text = advise.report(advice, warnings)
    assert "pool app: OVERSIZED" in text
    assert "recommend: min_size = 2, max_size = 3" in text
