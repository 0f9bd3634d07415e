"""Rates and windowed percentiles between snapshots, and ``millpond top``'s frames."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from rich.console import Console

from millpond.observe import top
from millpond.observe.series import ALL, History, bucket_delta, derive, quantiles


def pool(key: str, t_acquires: int, waits: list[list[float]], **extra: Any) -> dict[str, Any]:
    count = sum(n for _, n in waits)
    return {
        "key": key, "name": key, "size": 4, "idle": 1, "in_use": 3, "connecting": 0,
        "resetting": 0, "waiting": 2, "max_size": 4, "min_size": 1, "acquires": t_acquires,
        "timeouts": 0, "connect_errors": 0, "breaker_state": "closed",
        "wait_time": {"count": count, "sum": sum(u * n for u, n in waits), "buckets": waits},
        "use_time": {"count": t_acquires, "sum": t_acquires / 100, "buckets": [[0.01, t_acquires]]},
        **extra,
    }  # fmt: skip


def test_bucket_delta_and_quantiles() -> None:
    old = [[0.001, 10], [0.01, 5]]
    new = [[0.001, 110], [0.01, 5], [0.1, 1]]
    delta = bucket_delta(new, old)
    assert delta == {0.001: 100.0, 0.1: 1.0}
    assert quantiles(delta) == [0.001, 0.001, 0.001]  # 100 of 101 under 1 ms
    assert quantiles({0.001: 50, 0.1: 50}, (0.5, 0.51)) == [0.001, 0.1]
    assert quantiles({}) == [None, None, None]


def test_derive_rates_and_window_percentiles() -> None:
    old = {"time": 100.0, "pools": [pool("a", 1000, [[0.0, 1000]]), pool("b", 10, [[0.0, 10]])]}
    new = {
        "time": 102.0,
        "pools": [
            pool("a", 1400, [[0.0, 1000], [0.001, 300], [0.1, 100]]),
            pool("b", 30, [[0.0, 30]]),
        ],
    }
    point = derive(new, old)
    a, b, total = point["pools"]["a"], point["pools"]["b"], point["pools"][ALL]
    assert point["seconds"] == 2.0
    assert a["acquire_rate"] == 200.0  # 400 in 2 s
    assert b["acquire_rate"] == 10.0
    assert total["acquire_rate"] == 210.0
    assert (a["wait_p50"], a["wait_p90"], a["wait_p99"]) == (0.001, 0.1, 0.1)  # this window only
    assert b["wait_p99"] == 0.0
    assert total["in_use"] == 6
    assert total["waiting"] == 4
    # the aggregate's percentiles come from the merged buckets: 320 of 420 at or under 1 ms
    assert total["wait_p50"] == 0.001
    assert total["wait_p99"] == 0.1
    assert a["use_mean"] == pytest.approx(0.01)
    first = derive(old, None)  # no earlier snapshot: rates 0, percentiles since start
    assert first["pools"]["a"]["acquire_rate"] is None
    assert first["pools"]["a"]["wait_p99"] == 0.0


def test_history_keeps_the_last_points() -> None:
    history = History(size=3)
    for i in range(5):
        history.sample({"time": float(i), "pools": [pool("a", i * 10, [[0.0, i * 10]])]})
    assert history.seq == 5
    assert [p["seq"] for p in history.since(0)] == [3, 4, 5]
    assert [p["seq"] for p in history.since(4)] == [5]
    assert history.since(5) == []
    assert history.points[-1]["pools"]["a"]["acquire_rate"] == 10.0


def test_sparkline_and_formats() -> None:
    assert top.sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert top.sparkline([0, 0]) == "▁▁"
    assert top.duration(None) == "–"
    assert top.duration(0.0000321) == "32µs"
    assert top.duration(0.0123) == "12.3ms"
    assert top.duration(2.5) == "2.5s"
    assert top.uptime(3725) == "1h 2m"


def test_frame_shows_the_numbers() -> None:
    old = {"time": 100.0, "kind": "proxy", "pools": [pool("db/u", 100, [[0.0, 100]])]}
    new = {
        "time": 101.0,
        "kind": "proxy",
        "version": "9.9",
        "uptime": 65,
        "proxy": {"clients": {"active": 3, "waiting": 2, "idle": 0}},
        "health": {"ready": False, "reasons": ["proxy is shutting down (safe)"]},
        "pools": [
            pool(
                "db/u",
                150,
                [[0.0, 130], [0.002, 20]],
                timeouts=2,
                breaker_state="open",
                proxy={"mode": "transaction", "xacts": 500, "clients": {}},
            ),
        ],
    }
    old["pools"][0]["proxy"] = {"mode": "transaction", "xacts": 300, "clients": {}}
    point = derive(new, old)
    console = Console(record=True, width=120, color_system=None)
    console.print(top.render(new, point, {"db/u": deque([1.0, 5.0])}, "http://x:1"))
    text = console.export_text()
    assert "proxy 9.9 at http://x:1" in text
    assert "up 1m 5s" in text
    assert "clients 5 (3 active, 2 waiting)" in text
    assert "NOT READY" in text
    row = next(line for line in text.splitlines() if line.startswith("db/u"))
    assert row.split()[:8] == ["db/u", "transaction", "3", "1", "4/4", "2", "200", "0"]
    assert "2ms" in row  # p99 of this second's waits
    assert "db/u: 2 timeouts, circuit breaker open (since start)" in text
    assert "not ready: proxy is shutting down (safe)" in text
