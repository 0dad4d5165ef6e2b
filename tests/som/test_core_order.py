"""The by-customer time order of prepare(): the parallel counting sort that carries the columns."""

from __future__ import annotations

import math

import numpy as np

from gateway.som import peers


def _check(ccode: np.ndarray, day: np.ndarray, ncust: int) -> None:
    n = len(ccode)
    rng = np.random.default_rng(3)
    fcode = rng.integers(0, 9, n).astype(np.int32)
    units = rng.random(n) * 100
    controlled = rng.random(n) < 0.8
    perm, start, (s_c, s_f, s_day, s_u, s_ctl, s_lu) = peers._order(ccode, ncust, fcode, day, units,
                                                             controlled)
    expect = np.lexsort((np.arange(n), day, ccode))
    assert np.array_equal(perm, expect)
    counts = np.bincount(ccode, minlength=ncust)
    assert np.array_equal(start, np.concatenate([[0], np.cumsum(counts)]))
    for got, col in ((s_c, ccode), (s_f, fcode), (s_day, day), (s_u, units), (s_ctl, controlled)):
        assert np.array_equal(got, col[expect])
    assert np.array_equal(s_lu, np.array([math.log1p(u) for u in units[expect]]))


def test_order_of_lines_in_time_order_is_stable_across_parts() -> None:
    rng = np.random.default_rng(4)
    n = 450_000  # above the size at which the input is split between threads
    ccode = rng.integers(0, 3000, n).astype(np.int32)
    day = np.sort(rng.integers(19000, 19700, n)).astype(np.int32)  # extracts come in date order
    _check(ccode, day, 3000)


def test_order_of_shuffled_lines_sorts_days_per_customer() -> None:
    rng = np.random.default_rng(5)
    for n in (0, 1, 5_000, 300_000):
        ccode = rng.integers(0, 700, n).astype(np.int32)
        day = rng.integers(19000, 19100, n).astype(np.int32)  # many ties: input order decides
        _check(ccode, day, 700)
