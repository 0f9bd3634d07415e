"""The histogram behind wait-time and use-time percentiles."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from millpond.pool.stats import Histogram, PyHistogramBase, _bucket, _bucket_upper_us


def test_percentiles_within_bucket_resolution() -> None:
    hist = Histogram()
    rng = random.Random(7)
    samples = [rng.uniform(0.0001, 0.1) for _ in range(10_000)]
    for s in samples:
        hist.record(s)
    snap = hist.snapshot()
    samples.sort()
    for q, got in ((0.5, snap.p50), (0.9, snap.p90), (0.99, snap.p99)):
        exact = samples[int(q * len(samples)) - 1]
        assert exact * 0.99 <= got <= exact * 1.30, (q, exact, got)
    assert snap.count == 10_000
    assert abs(snap.sum - sum(samples)) < 1e-6
    assert snap.max == max(samples)


def test_empty_histogram() -> None:
    snap = Histogram().snapshot()
    assert (snap.count, snap.p50, snap.p99, snap.mean) == (0, 0.0, 0.0, 0.0)


@given(st.integers(min_value=0, max_value=2**40))
def test_bucket_bounds_contain_value(us: int) -> None:
    idx = _bucket(us)
    assert us <= _bucket_upper_us(idx) or idx == len(Histogram().buckets) - 1
    if idx > 0 and us < 2**36:
        assert us > _bucket_upper_us(idx - 1)


def test_zeros_counted_elsewhere_join_the_first_bucket() -> None:
    h = Histogram()
    for seconds in (0.002, 0.004, 0.008):
        h.record(seconds)
    snap = h.snapshot(zeros=97)
    assert snap.count == 100
    assert snap.buckets[0] == 97
    assert sum(snap.buckets) == snap.count  # exporters need the buckets to add up
    assert snap.p50 == 0.0  # most waits took nothing
    assert snap.p99 >= 0.004
    assert snap.sum == h.sum
    assert snap.max == 0.008
    assert h.count == 3  # the live histogram is left as it was


@given(st.lists(st.floats(0, 100), max_size=50))
def test_recorded_samples_land_in_buckets(samples: list[float]) -> None:
    h = Histogram()
    for seconds in samples:
        h.record(seconds)
    snap = h.snapshot()
    assert snap.count == len(samples) == sum(snap.buckets)


# -- the compiled twin (millpond.pool._histogram) ---------------------------------------


def _compiled_base() -> type:
    try:
        from millpond.pool._histogram import HistogramBase
    except ImportError:  # fail (not skip): CI builds the extension, so this is a bug
        pytest.fail("millpond was installed without its compiled helpers (a C compiler?)")
    return HistogramBase  # type: ignore[no-any-return]


def test_histogram_uses_the_compiled_base() -> None:
    assert issubclass(Histogram, _compiled_base())


durations = st.one_of(
    st.floats(min_value=-1.0, max_value=1e7, allow_nan=False),  # past the last bucket too
    st.floats(min_value=1e7, max_value=1e300),  # past what a 64-bit count of us holds
    st.floats(min_value=0.0, max_value=1e-5),  # the first, linear buckets
    st.integers(min_value=0, max_value=2**40).map(lambda us: us / 1e6),  # bucket edges
)


@given(st.lists(durations, max_size=60))
def test_compiled_record_matches_python(samples: list[float]) -> None:
    """Same buckets, count, sum and max as the pure-Python reference, for any samples."""
    ours, reference = _compiled_base()(), PyHistogramBase()
    for s in samples:
        ours.record(s)
        reference.record(s)
    assert list(ours.buckets) == list(reference.buckets)
    assert (ours.count, ours.sum, ours.max) == (reference.count, reference.sum, reference.max)


def test_compiled_record_of_huge_durations_matches_python() -> None:
    """Beyond what a 64-bit count of microseconds holds (~9.2e12 s), too."""
    samples = [1e6, 1e12, 9.3e12, 5e14, 1e15, 1e20, 1e300]
    ours, reference = _compiled_base()(), PyHistogramBase()
    for s in samples:
        ours.record(s)
        reference.record(s)
    assert list(ours.buckets) == list(reference.buckets)
    assert ours.buckets[-1] == len(samples)
