"""Pure parts of read/write splitting: topology decisions, balancing, settings."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from millpond import Pool
from millpond.errors import ConfigError
from millpond.routing import GroupConfig, Member, PoolGroup
from millpond.routing.balance import LeastInUse, RoundRobin, make_balancer
from millpond.routing.members import MemberState, Role
from millpond.routing.topology import Probe, Topology, format_bytes, parse_lsn, record_end

MB = 1024 * 1024


def members(n: int, weights: list[float] | None = None) -> list[MemberState]:
    weights = weights or [1.0] * n
    return [
        MemberState(
            i,
            f"m{i}",
            Pool(driver="memory"),
            Role.PRIMARY if i == 0 else Role.REPLICA,
            weights[i],
        )
        for i in range(n)
    ]


def primary(lsn: int, at: float = 1.0) -> Probe:
    return Probe(at, in_recovery=False, lsn=lsn)


def replica(
    lsn: int, *, age: float | None = 0.0, receive: int | None = None, at: float = 1.0
) -> Probe:
    return Probe(at, in_recovery=True, lsn=lsn, receive_lsn=receive, replay_age=age, paused=False)


def down(at: float = 1.0) -> Probe:
    return Probe(at, error="connection refused")


# -- LSNs ------------------------------------------------------------------------------


def test_parse_lsn() -> None:
    assert parse_lsn("0/3000028") == 0x3000028
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert parse_lsn(None) is None


def test_record_end_skips_page_headers() -> None:
    assert record_end(0x3000028) == 0x3000000  # segment start: long header
    assert record_end(0x3002018) == 0x3002000  # page start: short header
    assert record_end(0x3001110) == 0x3001110


def test_format_bytes() -> None:
    assert format_bytes(10) == "10 B"
    assert format_bytes(3 * MB // 2) == "1.5 MB"


# -- topology --------------------------------------------------------------------------


def test_roles_and_rotation() -> None:
    ms = members(3)
    topo = Topology(ms, GroupConfig())
    events = topo.apply([primary(100), replica(100), replica(100)], now=1.0)
    assert topo.writer is ms[0]
    assert topo.readable == (ms[1], ms[2])
    assert [m.reason for m in ms] == ["primary", "ok", "ok"]
    assert any("primary is 'm0'" in text for _, text in events)


def test_idle_caught_up_replica_has_no_lag_however_old_its_last_replay() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig(max_lag=1.0))
    topo.apply([primary(500), replica(500, age=3600.0)], now=1.0)
    assert ms[1].lag_seconds == 0.0
    assert ms[1].in_rotation


def test_lagging_replica_leaves_and_returns() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig(max_lag=1.0))
    topo.apply([primary(900), replica(500, age=2.5)], now=1.0)
    assert not ms[1].in_rotation
    assert ms[1].reason == "lagging 2.5s (max 1s)"
    assert ms[1].lag_bytes == 400
    topo.apply([primary(900), replica(900, age=3.0)], now=2.0)
    assert ms[1].in_rotation


def test_byte_bound() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig(max_lag=None, max_lag_bytes=MB))
    topo.apply([primary(3 * MB), replica(MB, age=None)], now=1.0)
    assert ms[1].reason == "lagging 2.0 MB (max 1.0 MB)"
    topo.apply([primary(3 * MB), replica(2 * MB + 1, age=None)], now=1.0)
    assert ms[1].in_rotation


def test_unknown_lag_is_out_when_bounded() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig(max_lag=5.0))
    topo.apply([primary(900), replica(500, age=None)], now=1.0)
    assert ms[1].reason == "replay lag unknown"


def test_lag_without_replay_timestamp_comes_from_past_checks() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig(max_lag=1.0))
    topo.apply([primary(100, at=1.0), replica(100, age=None, at=1.0)], now=1.0)
    assert ms[1].in_rotation
    topo.apply([primary(200, at=2.0), replica(100, age=None, at=2.0)], now=2.5)
    assert ms[1].lag_seconds == 0.5  # the primary went past it at the check begun at 2.0
    assert ms[1].in_rotation
    topo.apply([primary(300, at=3.0), replica(150, age=None, at=3.0)], now=3.5)
    assert ms[1].reason == "lagging 1.5s (max 1s)"


def test_without_primary_replicas_compare_with_what_they_received() -> None:
    ms = members(3)
    topo = Topology(ms, GroupConfig(max_lag=1.0))
    topo.apply(
        [down(), replica(700, age=99.0, receive=700), replica(600, age=99.0, receive=700)], 1
    )
    assert topo.writer is None
    assert ms[1].in_rotation  # replayed all it got: as fresh as it can be
    assert not ms[2].in_rotation
    assert ms[0].reason == "unreachable: connection refused"


def test_failover_changes_the_writer_and_counts_it() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([primary(100), replica(100)], now=1.0)
    topo.apply([down(), replica(100)], now=2.0)
    assert topo.writer is None
    events = topo.apply([down(), primary(200)], now=3.0)
    assert topo.writer is ms[1]
    assert topo.primary_changes == 1
    assert any("primary is now 'm1' (was 'm0')" in text for _, text in events)
    assert ms[1].role is Role.PRIMARY


def test_sticky_writer_when_two_members_are_writable() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([down(), primary(100)], now=1.0)
    topo.apply([primary(50), primary(120)], now=2.0)  # the old primary came back writable
    assert topo.writer is ms[1]
    assert not ms[0].in_rotation
    assert "not the primary" in ms[0].reason


def test_fenced_primary_is_no_writer() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    fenced = Probe(1.0, in_recovery=False, lsn=100, read_only=True)
    topo.apply([fenced, primary(120)], now=1.0)
    assert topo.writer is ms[1]
    assert ms[0].role is Role.PRIMARY
    assert "read-only" in ms[0].reason


def test_demoted_primary_becomes_a_replica() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([primary(100), replica(100)], now=1.0)
    topo.apply([replica(300), primary(300)], now=2.0)
    assert topo.writer is ms[1]
    assert topo.readable == (ms[0],)


def test_mark_failed_holds_until_a_later_check() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([primary(100), replica(100)], now=1.0)
    topo.mark_failed(ms[1], now=5.0, error="gone")
    assert topo.readable == ()
    assert ms[1].reason == "request failed: gone"
    topo.apply([primary(100), replica(100, at=4.0)], now=6.0)  # began before the failure
    assert not ms[1].in_rotation
    topo.apply([primary(100), replica(100, at=7.0)], now=8.0)
    assert ms[1].in_rotation


def test_lsn_after_returns_the_first_check_after_the_write() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([primary(100, at=1.0), replica(100)], now=1.0)
    topo.apply([primary(200, at=2.0), replica(100)], now=2.0)
    topo.apply([primary(300, at=3.0), replica(100)], now=3.0)
    assert topo.lsn_after(1.5) == 200
    assert topo.lsn_after(3.0) is None


def test_drop_writer() -> None:
    ms = members(2)
    topo = Topology(ms, GroupConfig())
    topo.apply([primary(100), replica(100)], now=1.0)
    assert not topo.drop_writer(ms[1])
    assert topo.drop_writer(ms[0])
    assert topo.writer is None


# -- balancing -------------------------------------------------------------------------


def test_round_robin_is_smooth_and_weighted() -> None:
    ms = members(3, [1, 2, 1])[1:]
    rr = RoundRobin()
    order = [rr.pick(ms).name for _ in range(6)]
    assert order == ["m1", "m2", "m1", "m1", "m2", "m1"]


def test_round_robin_even() -> None:
    ms = members(4)[1:]
    rr = RoundRobin()
    assert Counter(rr.pick(ms).name for _ in range(300)) == {"m1": 100, "m2": 100, "m3": 100}


def test_least_in_use_prefers_the_idle_then_weights() -> None:
    ms = members(3, [1, 1, 3])[1:]
    lu = LeastInUse()
    ms[0].in_flight = 2
    assert lu.pick(ms) is ms[1]
    ms[0].in_flight = 0
    ms[1].in_flight = 3  # 3 per unit of weight 3 = 1.0, more than 0
    assert lu.pick(ms) is ms[0]
    ms[1].in_flight = 0
    picks = Counter(lu.pick(ms).name for _ in range(400))
    assert picks == {"m1": 100, "m2": 300}  # all idle: by weight


def test_make_balancer() -> None:
    assert make_balancer("least_in_use").name == "least_in_use"
    with pytest.raises(ConfigError):
        make_balancer("random")


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("balance", "random"),
        ("max_lag", -1),
        ("max_lag_bytes", 1.5),
        ("check_interval", 0),
        ("check_timeout", None),
        ("no_replica", "replica"),
        ("read_your_writes", "always"),
        ("read_your_writes", 0),
        ("wait_for_primary", -1),
        ("read_attempts", 0),
        ("cache_size", True),
        ("read_only_functions", "lower"),
    ],
)
def test_bad_group_settings_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        GroupConfig(**{setting: value})
    assert info.value.setting == setting


def test_read_your_writes_modes() -> None:
    assert GroupConfig(read_your_writes=2).ryw_window == 2.0
    assert GroupConfig(read_your_writes="lsn").ryw_lsn
    assert GroupConfig().ryw_window is None


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        GroupConfig().max_lag = 3  # type: ignore[misc]


def test_unknown_group_setting() -> None:
    with pytest.raises(ConfigError) as info:
        PoolGroup("postgresql://a/b", max_lagg=3)
    assert info.value.setting == "max_lagg"


def test_bad_pool_setting_of_a_member() -> None:
    with pytest.raises(ConfigError) as info:
        PoolGroup("postgresql://a/b", [Member("postgresql://c/d", max_size=0)])
    assert info.value.setting == "max_size"


def test_member_weight_and_ready_pools() -> None:
    with pytest.raises(ConfigError) as info:
        Member("postgresql://a/b", weight=0)
    assert info.value.setting == "weight"
    with pytest.raises(ConfigError):
        Member(Pool(driver="memory"), max_size=3)


def test_member_names() -> None:
    assert Member("postgresql://u@db1:5433/app").label(0) == "db1:5433"
    assert Member("postgresql://u@db1/app", name="main").label(0) == "main"
    assert Member(Pool(driver="memory", name="p")).label(3) == "p"
    group = PoolGroup("postgresql://u@db1/app", ["postgresql://u@db1/app"])
    assert [m.name for m in group.stats().members] == ["db1:5432", "db1:5432#1"]


def test_mixed_drivers_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        PoolGroup("postgresql://a/b", [Member("postgresql://c/d", driver="memory")])
    assert info.value.setting == "driver"
