"""Edges of the batch kernel's fast paths: the 1024-line score buffers (the final partial one
too), the doubled flagged-line buffers, whole-customer chunks, the threaded coding of customers
and families, the log1p table, the Numba rendering of the reasons, and tiny inputs."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gateway.som import kernels as K, peers as peers_mod, reference
from gateway.som.config import SomConfig
from gateway.som.io import SomInputError
from gateway.som.incremental import SomState, SomStateError
from gateway.som.peers import peer_reference
from gateway.som.score import (
    config_vector,
    reasons_frame,
    reasons_text,
    score_orders,
    score_prepared,
)

from .conftest import lines, messy_history, monthly


@pytest.fixture(scope="module")
def history() -> pl.DataFrame:
    return messy_history(customers=60, days=400, seed=11)


def _check_against_reference(df: pl.DataFrame) -> pl.DataFrame:
    """score_orders without features (non-controlled lines skipped), with features, and the
    plain Polars reference: the same scores, flags and findings; the same reasons both ways."""
    fast = score_orders(df)
    full = score_orders(df, keep_features=True)
    ref = reference.features(df)
    assert np.array_equal(fast["score"].to_numpy(), full["score"].to_numpy())
    assert fast["flag"].equals(full["flag"])
    assert fast["reasons"].equals(full["reasons"])
    assert np.allclose(full["score"].to_numpy(), ref["score"].to_numpy(), rtol=1e-9, atol=1e-9)
    assert full["flag"].equals(ref["flag"])
    assert np.array_equal(full["findings"].to_numpy(), ref["findings"].to_numpy())
    for name in K.FEATURES:
        assert np.allclose(full[name].to_numpy(), ref[name].to_numpy(), rtol=1e-9, atol=1e-9,
                           equal_nan=True), name
    return fast


# --- score buffers: 1024 lines, the last one partial ----------------------------------------


@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 1025, 2047, 2048, 2049, 3001])
def test_every_line_scored_at_buffer_boundaries(history, n: int) -> None:
    df = history[:n]
    fast = _check_against_reference(df)
    assert fast.height == n
    if n >= 2048:
        assert fast["flag"].sum() > 0


def test_one_customer_of_exactly_1024_and_1025_lines() -> None:
    """One customer's lines fill whole buffers exactly (1024) and leave one line over (1025)."""
    rows = []
    for fam in ("oxycodone", "hydrocodone", "fentanyl", "tramadol"):
        rows += monthly("C1", fam, 120.0, "2020-01-01", 64, day=3)
        rows += monthly("C1", fam, 80.0, "2020-01-01", 64, day=17)
        rows += monthly("C1", fam, 60.0, "2020-01-01", 64, day=25)
        rows += monthly("C1", fam, 60.0, "2020-01-01", 64, day=28)
    assert len(rows) == 1024
    rows[-1] = (*rows[-1][:3], 9000.0)  # a flagged line at the very end of the buffer
    out = _check_against_reference(lines(rows))
    assert out["flag"][-1] and out["reasons"][-1].startswith(
        "tramadol: 9,260 units this month exceed the monthly cap of 8,000 (largest month of the "
        "trailing 12: 320); ")
    rows.append(("C1", "oxycodone", "2025-04-29", 7000.0))  # the 1025th: alone in its buffer
    out = _check_against_reference(lines(rows))
    assert out["flag"][-1] and out["score"][-1] > 1.0


def _score_range(p, matrix, vectors, cfg, ranges, fcap, keep_features):
    """K.score_range over the given sorted ranges, into arrays that start as NaN / -1 so that a
    line nobody wrote is seen."""
    score = np.full(p.n, np.nan)
    bits = np.full(p.n, -1, np.int32)
    feats = np.full((p.n if keep_features else 0, K.NF), -7.0)
    s_c, s_f, s_day, s_u, s_ctl, s_lu = p.sorted
    fpos, ffeat = [], []
    for lo, hi in ranges:
        a, b = K.score_range(s_c, s_f, s_day, s_u, s_ctl, s_lu, lo, hi, p.perm,
                             max(len(p.families), 1), p.cust_ts, matrix, vectors, cfg,
                             keep_features, score, bits, feats, peers_mod.log1p_table(), fcap)
        fpos.append(a)
        ffeat.append(b)
    return score, bits, feats, np.concatenate(fpos), np.concatenate(ffeat)


@pytest.mark.parametrize("fcap", [-1, 0, 1, 3, 1024])
@pytest.mark.parametrize("keep_features", [False, True])
def test_score_range_in_chunks_writes_every_line_once(history, fcap: int,
                                                      keep_features: bool) -> None:
    """Whole-customer chunks of odd lengths (as the threads get them), flagged-line buffers that
    fill mid-way through a score buffer: every line written, the same as one pass and as the
    Polars reference. A capacity below 1 starts from 1 (0 doubled stays 0: it looped forever)."""
    df = history[:5000]
    p = peers_mod.prepare(df)
    peers = peer_reference(df)
    matrix, vectors, _ = peers_mod.peer_matrix(peers, p.cells, p.families, 5)
    cfg = config_vector(SomConfig())
    one = _score_range(p, matrix, vectors, cfg, [(0, p.n)], 1024, True)
    s_c = p.sorted[0]
    starts = np.flatnonzero(np.r_[True, s_c[1:] != s_c[:-1]])
    cuts = sorted({int(starts[np.searchsorted(starts, t)]) for t in (700, 1030, 1031, 2100,
                                                                       3500) if t < p.n})
    bounds = [0, *[c for c in cuts if 0 < c < p.n], p.n]
    ranges = list(zip(bounds, bounds[1:]))
    assert len(ranges) >= 4
    score, bits, feats, fpos, ffeat = _score_range(p, matrix, vectors, cfg, ranges, fcap,
                                                   keep_features)
    assert not np.isnan(score).any() and (bits >= 0).all()
    assert np.array_equal(score, one[0]) and np.array_equal(bits, one[1])
    assert np.array_equal(np.sort(fpos), np.flatnonzero(bits))
    assert np.array_equal(ffeat, one[2][fpos], equal_nan=True)
    if keep_features:
        assert np.array_equal(feats, one[2], equal_nan=True)
    ref = reference.features(df, peers=peers)
    assert np.allclose(score, ref["score"].to_numpy(), rtol=1e-9, atol=1e-9)
    assert np.array_equal(bits, ref["findings"].to_numpy())


def test_incremental_and_batch_agree_past_several_buffers(history) -> None:
    """The line-by-line scorer (no buffers, Python reasons) against the batch one on an input
    whose time order interleaves customers (so the scatter really permutes)."""
    df = history[:2600].sort("date", maintain_order=True)
    peers = peer_reference(df)
    batch = score_orders(df, peers=peers)
    got = SomState(peers=peers).update_many(df)
    assert np.allclose([g.score for g in got], batch["score"].to_numpy(), rtol=1e-12, atol=0)
    assert [g.reasons for g in got] == batch["reasons"].to_list()
    assert batch["flag"].sum() > 5


_NRT_CHECK = textwrap.dedent("""
    import numpy as np
    from numba.core.runtime import rtsys
    from gateway.som import kernels as K, peers as peers_mod
    from gateway.som.config import SomConfig
    from gateway.som.score import config_vector
    from tests.som.conftest import messy_history

    df = messy_history(customers=40, days=300, seed=5)
    p = peers_mod.prepare(df)
    matrix, vectors, _ = peers_mod.peer_matrix(peers_mod.peer_reference_prepared(p), p.cells,
                                               p.families, 5)
    cfg = config_vector(SomConfig())

    def run(fcap, kf):
        score = np.empty(p.n)
        bits = np.empty(p.n, np.int32)
        feats = np.empty((p.n if kf else 0, K.NF))
        return K.score_range(*p.sorted, 0, p.n, p.perm, len(p.families), p.cust_ts, matrix,
                             vectors, cfg, kf, score, bits, feats, peers_mod.log1p_table(), fcap)

    out = []
    for kf in (False, True):
        for fcap in (1, 1024):
            run(fcap, kf)
            s0 = rtsys.get_allocation_stats()
            for _ in range(3):
                r = run(fcap, kf)
            del r
            s1 = rtsys.get_allocation_stats()
            out.append((s1.alloc - s0.alloc, s1.free - s0.free, s1.mi_alloc - s0.mi_alloc,
                        s1.mi_free - s0.mi_free))
    print(repr((p.n, out)))
""")


def test_kernel_without_reference_counting_frees_what_it_allocates() -> None:
    """score_range (reference counted) around _score_lines / process_line_lu (not): as many
    frees as allocations, and a fixed number of them per call rather than per line."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, NUMBA_NRT_STATS="1", PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", _NRT_CHECK], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    n, stats = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert n > 2048  # three score buffers, the last partial
    for alloc, free, mi_alloc, mi_free in stats:
        assert alloc == free and mi_alloc == mi_free
        assert 0 < alloc < 3 * 100  # per call: the buffers and their doublings, not per line


# --- threads: customer and family codes, chunks ----------------------------------------------


@pytest.mark.parametrize("threads", ["2", "3", "16"])
def test_threaded_codes_in_order_of_first_appearance(monkeypatch, threads: str) -> None:
    """Keys whose first appearances sit on the parts' last and first positions, keys that first
    appear in a later part and come back in earlier ones' order, parts with no key of their own."""
    monkeypatch.setenv("GATEWAY_SOM_THREADS", threads)
    n = 200_003
    t = int(threads)
    bounds = [n * k // t for k in range(t + 1)]
    keys = np.full(n, 7, np.uint64)
    rng = np.random.default_rng(4)
    fresh = iter(rng.integers(10, 2**63, 10 * t, dtype=np.uint64).tolist())
    introduced = []
    for a, b in zip(bounds, bounds[1:]):
        first, last = next(fresh), next(fresh)
        keys[b - 1] = last  # new key on the part's last position
        keys[a + 1: b - 1] = rng.choice(np.array(introduced + [7], np.uint64), b - a - 2)
        keys[a] = first
        introduced += [first, last]
    keys[bounds[-2]:] = keys[: n - bounds[-2]]  # the last part: nothing new
    codes, first = peers_mod.dense_codes(keys)
    expect_codes, expect_first = K.dense_codes(keys)
    _, idx = np.unique(keys, return_index=True)
    assert np.array_equal(first, np.sort(idx))  # order of first appearance
    assert np.array_equal(codes, expect_codes) and np.array_equal(first, expect_first)
    assert codes[0] == 0 and np.array_equal(keys[first][codes], keys)


def _big(n_customers: int = 2600, seed: int = 2) -> pl.DataFrame:
    """About 200k lines, vectorised: enough for prepare() to code and order in threads and to
    cut the sorted lines into whole-customer chunks."""
    rng = np.random.default_rng(seed)
    per = rng.integers(60, 100, n_customers)
    n = int(per.sum())
    cust = np.repeat(np.arange(n_customers), per)
    fam = rng.integers(0, 6, n)
    day = 19000 + rng.integers(0, 500, n)
    units = np.round(rng.lognormal(5, 0.8, n))
    units[rng.random(n) < 0.01] *= 9
    units[rng.random(n) < 0.02] += 0.5  # not a whole number: log1p by libm
    units[rng.random(n) < 0.01] += 70_000  # beyond the table
    order = rng.permutation(n)
    return pl.DataFrame({
        "customer": pl.Series([f"K{c:05d}" for c in cust[order]]),
        "customer_type": pl.Series(np.array(["RETAIL PHARMACY", "HOSP/CLINIC"])[cust[order] % 2]),
        "state": pl.Series(np.array(["OH", "WV", "KY"])[cust[order] % 3]),
        "family": pl.Series(np.array(["oxy", "hydro", "fent", "alpr", "tram", "amox"])[fam[order]]),
        "date": pl.Series(day[order].astype(np.int32)).cast(pl.Date),
        "dosage_units": units[order],
        "controlled": fam[order] != 5,
    })


def test_threads_and_chunks_change_nothing(monkeypatch) -> None:
    df = _big()
    assert df.height >= 200_000
    monkeypatch.setenv("GATEWAY_SOM_THREADS", "1")
    p1 = peers_mod.prepare(df)
    # a fixed peer table: the peer sums of the chunks are added in another order with threads
    # (a few 1e-13 apart), which is older than the changes checked here
    peers = peers_mod.peer_reference_prepared(p1)
    one = score_orders(df, peers=peers)
    monkeypatch.setenv("GATEWAY_SOM_THREADS", "3")
    p3 = peers_mod.prepare(df)
    assert len(p1.chunks) == len(p3.chunks) == peers_mod.CHUNKS  # the cut ignores the threads
    assert np.array_equal(p1.ccode, p3.ccode) and np.array_equal(p1.fcode, p3.fcode)
    assert p1.families == p3.families and np.array_equal(p1.perm, p3.perm)
    for a, b in zip(p1.sorted, p3.sorted):
        assert np.array_equal(a, b)
    three = score_orders(df, peers=peers)
    assert np.array_equal(one["score"].to_numpy(), three["score"].to_numpy())
    assert one["reasons"].equals(three["reasons"]) and one["flag"].sum() > 100
    # and the cut itself changes nothing: all lines in one run
    whole = score_prepared(dataclasses.replace(p1, chunks=[(0, p1.n)]), peers=peers)
    assert np.array_equal(whole.score, one["score"].to_numpy())


# --- log1p table -----------------------------------------------------------------------------


def test_log1p_table_range() -> None:
    table = peers_mod.log1p_table()
    cases = [0.0, 1.0, 2.0, 100.0, 65534.0, 65535.0, 65535.5, 65535.999999, 65536.0, 65537.0,
             0.5, 1e-300, 5e-324, 3.0 + 2**-40, 2.0**53, 1e308, math.inf, -0.5, -1e-300]
    for x in cases:
        assert K._log1p(x, table) == math.log1p(x), x
    assert K._log1p(65535.0, table) == table[65535]
    assert math.isnan(K._log1p(math.nan, table))
    assert math.isnan(K._log1p(-2.0, table))  # math.log1p raises; Numba's gives NaN as before
    assert K._log1p(-1.0, table) == -math.inf
    assert K._log1p(-math.inf, table) != K._log1p(-math.inf, table)
    # no table (the incremental scorer): libm for everything
    assert K._log1p(3.0, np.empty(0)) == math.log1p(3.0)


def test_log1p_table_keeps_the_sign_of_zero() -> None:
    table = peers_mod.log1p_table()
    for x in (-0.0, 0.0):
        got = K._log1p(x, table)
        assert got == 0.0 and math.copysign(1.0, got) == math.copysign(1.0, math.log1p(x)), x


def test_negative_zero_units_batch_and_incremental_agree_bit_for_bit() -> None:
    """A line of -0.0 units (read_orders lets it through: it is not below 0): its log1p is -0.0
    in the batch (the table) as in the incremental scorer (libm), so every feature is the same."""
    rows = monthly("C1", "oxy", 100.0, "2023-01-01", 14) + [("C1", "oxy", "2024-03-22", -0.0),
                                                            ("C1", "oxy", "2024-03-23", 900.0)]
    df = lines(rows)
    p = peers_mod.prepare(df)
    assert math.copysign(1.0, p.sorted[5][p.perm == len(rows) - 2][0]) == -1.0  # s_lu of -0.0
    peers = peer_reference(df)
    batch = score_orders(df, peers=peers, keep_features=True)
    got = SomState(peers=peers).update_many(df)
    assert np.array_equal([g.score for g in got], batch["score"].to_numpy())
    for name in K.FEATURES:
        assert np.array_equal([g.features[name] for g in got], batch[name].to_numpy(),
                              equal_nan=True), name


def test_non_whole_and_large_units_score_like_the_reference() -> None:
    rows = monthly("C1", "oxy", 100.5, "2023-01-01", 14) + monthly("C1", "hyd", 70_000.0,
                                                                   "2023-01-01", 14)
    rows += [("C1", "oxy", "2024-03-20", 65535.0), ("C1", "hyd", "2024-03-21", 655360.0),
             ("C1", "oxy", "2024-03-22", -0.0)]
    _check_against_reference(lines(rows))


# --- reasons rendering -----------------------------------------------------------------------


def _render(bits: int, values: dict[int, float], family: str = "oxycodone",
            label: str = "peers: all customers") -> str:
    feats = np.full((1, K.NF), 1.0)
    for k, v in values.items():
        feats[0, k] = v
    text = reasons_frame(np.array([bits]), feats, pl.Series([family]), pl.Series([label]),
                         8000.0)[0]
    peer = ("", "") if label == "peers: all customers" else ("RETAIL PHARMACY", "OH")
    assert text == reasons_text(bits, feats[0], family, peer, 8000.0)
    return text


@pytest.mark.parametrize("units, size, mean, expected", [
    (0.0, 0.0, 0.0, "oxycodone: 0 units = 0.0x the trailing 12-month average order of 0"),
    (999.5, 999.95, 999.4999, "oxycodone: 1,000 units = 1,000.0x the trailing 12-month average "
                              "order of 999"),
    (1234567.5, 12.25, 100000.0, "oxycodone: 1,234,568 units = 12.3x the trailing 12-month "
                                 "average order of 100,000"),
    (-1000.5, -0.06, -999.5, "oxycodone: -1,000 units = -0.1x the trailing 12-month average "
                             "order of -999"),
    (-0.4, -0.04, -1234567.0, "oxycodone: 0 units = 0.0x the trailing 12-month average order "
                              "of -1,234,567"),
    (2.0**53 - 2, 123456.78, 1e15, "oxycodone: 9,007,199,254,740,990 units = 123,456.8x the "
                                   "trailing 12-month average order of 1,000,000,000,000,000"),
    # numbers the kernel does not round exactly: the Python rendering
    (2.0**53 - 1, 1e17, 1e20, "oxycodone: 9,007,199,254,740,992 units = 100,000,000,000,000,000.0x"
                              " the trailing 12-month average order of 100,000,000,000,000,000,000"),
])
def test_rendered_numbers(units: float, size: float, mean: float, expected: str) -> None:
    assert _render(K.R_SIZE, {K.F_UNITS: units, K.F_SIZE: size, K.F_MEAN12: mean}) == expected


def test_rendered_percent_and_several_clauses() -> None:
    text = _render(K.R_MIX | K.R_CONTROLLED | K.R_PEER,
                   {K.F_SHARE30: 0.125, K.F_SHARE12: -0.004, K.F_CTRL30: 12345.675,
                    K.F_CTRL12: -0.125, K.F_UNITS: 5000.0, K.F_PEER_LIM: 1999.5,
                    K.F_PEER_TYP: 300.0}, family="Ötztal-oxy", label="peers: RETAIL PHARMACY, OH")
    assert text == (
        "Ötztal-oxy: 5,000 units above the peer limit of 2,000 (peers: RETAIL PHARMACY, OH; "
        "typical order 300); Ötztal-oxy: 13% of the customer's units in the last 30 days "
        "against 0% over the trailing months; controlled share of the customer's units "
        "1234568% in the last 30 days against -12% over the trailing 12 months")


def test_rendering_empty_and_unflagged() -> None:
    assert reasons_frame(np.zeros(0, np.int64), np.zeros((0, K.NF)), pl.Series([], dtype=pl.String),
                         pl.Series([], dtype=pl.String), 8000.0).to_list() == []
    assert _render(0, {}) == ""


@pytest.mark.parametrize("family", ["oxy{peer}", "{fam}oxy{peer}{fam}", "{peer"])
def test_family_name_with_a_placeholder_renders_the_same_both_ways(family: str) -> None:
    """Placeholders are put in once, in one pass over the template: a family name holding
    "{peer}" or "{fam}" is quoted as it is, by the Python rendering as by the Numba one."""
    text = _render(K.R_SIZE | K.R_PEER, {}, family=family, label="peers: RETAIL PHARMACY, OH")
    assert text == (f"{family}: 1 units = 1.0x the trailing 12-month average order of 1; "
                    f"{family}: 1 units above the peer limit of 1 (peers: RETAIL PHARMACY, OH; "
                    f"typical order 1)")


def test_peer_label_with_a_placeholder_is_quoted_as_it_is() -> None:
    feats = np.full(K.NF, 1.0)
    text = reasons_text(K.R_PEER, feats, "oxy", ("RETAIL {fam}", "{peer}"), 8000.0)
    assert text == ("oxy: 1 units above the peer limit of 1 (peers: RETAIL {fam}, {peer}; "
                    "typical order 1)")
    assert reasons_frame(np.array([K.R_PEER]), feats[None], pl.Series(["oxy"]),
                         pl.Series(["peers: RETAIL {fam}, {peer}"]), 8000.0)[0] == text


@pytest.mark.parametrize("units", [math.inf, 1e13])
def test_infinite_or_absurd_units_are_refused_before_scoring(units: float) -> None:
    rows = monthly("a", "oxy", 100.0, "2023-01-01", 14) + [("a", "oxy", "2024-03-20", units)]
    with pytest.raises(SomInputError) as e:
        score_orders(lines(rows))
    assert e.value.code == "som_invalid_units" and "1 lines with" in e.value.message
    assert "dosage_units" in e.value.message


def test_month_to_date_cannot_overflow() -> None:
    """Two finite lines of 1e308 units in one month summed to inf: refused by the bound."""
    rows = monthly("a", "oxy", 100.0, "2023-01-01", 14) + [("a", "oxy", "2024-03-20", 1e308),
                                                           ("a", "oxy", "2024-03-21", 1e308)]
    with pytest.raises(SomInputError, match="2 lines with dosage_units above") as e:
        score_orders(lines(rows))
    assert e.value.code == "som_invalid_units"


def test_units_at_the_bound_are_scored_and_quoted() -> None:
    from gateway.som.io import MAX_DOSAGE_UNITS

    rows = monthly("a", "oxy", 100.0, "2023-01-01", 14) + [("a", "oxy", "2024-03-20",
                                                            MAX_DOSAGE_UNITS)]
    out = _check_against_reference(lines(rows))
    assert out["flag"][-1] and out["reasons"][-1].startswith(
        "oxy: 1,000,000,000,000 units this month exceed the monthly cap of 8,000")


@pytest.mark.parametrize("values, bits, expected", [
    ({K.F_UNITS: math.inf, K.F_SIZE: math.nan, K.F_MEAN12: -math.inf}, K.R_SIZE,
     "oxycodone: inf units = nanx the trailing 12-month average order of -inf"),
    ({K.F_SHARE30: math.nan, K.F_SHARE12: math.inf}, K.R_MIX,
     "oxycodone: nan% of the customer's units in the last 30 days against inf% over the "
     "trailing months"),
    # finite, but its product by 10 overflows a float: rounded exactly
    ({K.F_UNITS: 5.0, K.F_SIZE: 1e308, K.F_MEAN12: 0.5}, K.R_SIZE,
     f"oxycodone: 5 units = {int(1e308):,}.0x the trailing 12-month average order of 1"),
])
def test_non_finite_numbers_render_without_crashing(values, bits: int, expected: str) -> None:
    """The Numba renderer leaves a line with a number it cannot round exactly (not finite, or
    beyond 2**53) to the Python rendering, which writes inf, -inf and nan as such."""
    assert _render(bits, values) == expected


def test_incremental_scorer_refuses_infinite_units() -> None:
    """SomState.update does not go through read_orders: it applies the same bound itself."""
    rows = monthly("a", "oxy", 100.0, "2023-01-01", 14)
    state = SomState()
    state.update_many(lines(rows))
    with pytest.raises(SomStateError) as e:
        state.update({"customer": "a", "family": "oxy", "date": "2024-03-20",
                      "dosage_units": math.inf})
    assert e.value.code == "som_invalid_line"


# --- tiny inputs -----------------------------------------------------------------------------


def test_empty_input() -> None:
    empty = lines([("a", "oxy", "2024-01-01", 1.0)]).clear()
    out = score_orders(empty)
    assert out.height == 0 and out.columns[-3:] == ["score", "flag", "reasons"]
    full = score_orders(empty, keep_features=True)
    assert full.height == 0 and full.columns[-1] == "findings"
    assert peer_reference(empty).height == 0


def test_single_line() -> None:
    df = lines([("a", "oxy", "2024-01-31", 10.0)])
    out = _check_against_reference(df)
    assert out["score"].to_list() == [0.0] and out["reasons"].to_list() == [""]
    full = score_orders(df, keep_features=True).row(0, named=True)
    assert full["units"] == 10.0 and full["month_to_date"] == 10.0
    assert full["orders_30d"] == 1.0 and full["months_history"] == 0.0
    assert full["customer_days_30d"] == 1.0 and math.isnan(full["size_ratio"])


def test_all_lines_not_controlled() -> None:
    rows = [(c, fam, f"2024-{m:02d}-{d:02d}", 10.0 * m * d, False)
            for c in ("a", "b") for fam in ("amox", "ibu") for m in range(1, 13)
            for d in (3, 17)]
    rows += [("a", "amox", "2024-12-20", 1e6, False)]
    df = lines(rows)
    out = _check_against_reference(df)
    assert (out["score"] == 0.0).all() and not out["flag"].any()
    assert (out["reasons"] == "").all()
    full = score_orders(df, keep_features=True)
    assert full["size_ratio"][-1] > 100  # computed (with keep_features), not scored
    assert (full["findings"] == 0).all()


def test_non_controlled_lines_still_feed_the_controlled_share() -> None:
    """Non-controlled lines skip their features without keep_features, but their units still
    count in the customer's totals: the controlled-share finding is the same either way."""
    rows = []
    for m in range(1, 13):
        rows += [("a", "oxy", f"2023-{m:02d}-05", 100.0), ("a", "amox", f"2023-{m:02d}-06",
                                                            900.0, False)]
    rows += [("a", "amox", "2024-01-03", 900.0, False), ("a", "oxy", "2024-01-04", 100.0),
             ("a", "oxy", "2024-01-10", 2000.0), ("a", "oxy", "2024-01-11", 2000.0)]
    out = _check_against_reference(lines(rows))
    last = score_orders(lines(rows), keep_features=True).row(-1, named=True)
    assert last["findings"] & K.R_CONTROLLED
    assert last["controlled_12m"] == pytest.approx(0.1)
    assert "controlled share of the customer's units" in out["reasons"][-1]
