"""The benchmarks' statistics (bench/_common.py): the median's confidence interval."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType

import pytest


def _common() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


median_interval = _common().median_interval


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= true median <= x_(n-k+1)) = 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def test_textbook_ranks() -> None:
    # n = 20: the 6th and 15th values, 95.86% (the usual table)
    values = [float(v) for v in range(1, 21)]
    random.Random(1).shuffle(values)
    low, high, coverage = median_interval(values)
    assert (low, high) == (6.0, 15.0)
    assert coverage == pytest.approx(0.958611, abs=1e-6)
    # n = 10: the 2nd and 9th; n = 5: all of them, and that covers only 93.75%
    assert median_interval(list(range(10, 0, -1)))[:2] == (2, 9)
    assert median_interval([5, 1, 4, 2, 3]) == (1, 5, pytest.approx(0.9375))


@pytest.mark.parametrize("n", range(6, 61))
def test_the_narrowest_interval_that_covers(n: int) -> None:
    values = list(range(n))
    low, high, coverage = median_interval(values)
    k = low + 1
    assert high == n - k  # symmetric ranks
    assert coverage == pytest.approx(_coverage(n, k))
    assert coverage >= 0.95
    if k < (n + 1) // 2:  # one rank narrower would not cover 95%
        assert _coverage(n, k + 1) < 0.95


def test_no_values() -> None:
    low, high, coverage = median_interval([])
    assert math.isnan(low)
    assert math.isnan(high)
    assert coverage == 0.0
