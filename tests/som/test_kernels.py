"""The Numba kernels against plain Python and against the plain Polars implementation."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from gateway.som import kernels as K, peers as peers_mod, reference
from gateway.som.config import SomConfig
from gateway.som.peers import peer_reference
from gateway.som.score import score_orders

from .conftest import messy_history, movers, same_day_kept


def test_month_of_day_matches_the_calendar() -> None:
    for day in list(range(-800, 800, 7)) + list(range(19000, 22000, 13)):
        d = dt.date(1970, 1, 1) + dt.timedelta(days=day)
        assert K.month_of_day(day) == d.year * 12 + d.month - 1


def test_dense_codes_in_order_of_first_appearance() -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**63, 300_000, dtype=np.uint64)[rng.integers(0, 150_000, 1_000_000)]
    codes, first = K.dense_codes(keys)
    _, uniq_first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    assert len(first) == len(uniq_first)
    # codes are a relabelling of the distinct keys, numbered in order of first appearance
    assert np.array_equal(np.sort(first), first)
    assert np.array_equal(keys[first][codes], keys)


def test_dense_codes_in_threads_match_one_pass(monkeypatch) -> None:
    from gateway.som import peers as peers_mod

    monkeypatch.setenv("GATEWAY_SOM_THREADS", "3")
    rng = np.random.default_rng(6)
    keys = rng.integers(0, 2**63, 20_000, dtype=np.uint64)[rng.integers(0, 20_000, 700_000)]
    keys[500_000:] = keys[:200_000]  # the last part has no key of its own
    codes, first = peers_mod.dense_codes(keys)
    expect_codes, expect_first = K.dense_codes(keys)
    assert codes.dtype == expect_codes.dtype and np.array_equal(codes, expect_codes)
    assert np.array_equal(first, expect_first)


def test_log1p_from_the_table_is_math_log1p() -> None:
    from gateway.som import peers as peers_mod

    table = peers_mod.log1p_table()
    assert len(table) == K.LOG1P_TABLE
    assert table.tolist() == [math.log1p(k) for k in range(K.LOG1P_TABLE)]
    for x in (0.0, 1.0, 2.5, 7.0, 65535.0, 65536.0, 1e9, 0.25, 1e-300, 123456.0):
        assert K._log1p(x, table) == math.log1p(x)


def test_order_by_customer_day_is_a_stable_sort() -> None:
    rng = np.random.default_rng(2)
    n = 50_000
    ccode = rng.integers(0, 500, n).astype(np.int32)
    day = rng.integers(19000, 19400, n).astype(np.int32)
    perm, start = K.order_by_customer_day(ccode, 500, day)
    assert np.array_equal(perm, np.lexsort((np.arange(n), day, ccode)))
    assert start[-1] == n


def _compare(batch: pl.DataFrame, ref: pl.DataFrame) -> None:
    for col in ["score", "findings", *K.FEATURES]:
        a = batch[col].cast(pl.Float64).to_numpy()
        b = ref[col].cast(pl.Float64).to_numpy()
        bad = ~np.isclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True)
        assert not bad.any(), f"{col}: {bad.sum()} lines differ, e.g. {a[bad][:3]} vs {b[bad][:3]}"
    assert batch["flag"].equals(ref["flag"])


@pytest.mark.parametrize("seed", [0, 1])
def test_numba_and_polars_agree_on_generated_data(seed: int) -> None:
    df = messy_history(customers=120, days=600, seed=seed)
    batch = score_orders(df, keep_features=True)
    assert batch["flag"].sum() > 10
    _compare(batch, reference.features(df))


def test_numba_and_polars_agree_under_another_configuration(messy) -> None:
    cfg = SomConfig(min_history_months=1, min_history_lines=1, recent_intervals=2,
                    sustained_orders=3, min_peer_customers=2, new_family_tenure_days=60)
    _compare(score_orders(messy, cfg, keep_features=True), reference.features(messy, cfg))


def test_numba_and_polars_agree_on_the_synthetic_set() -> None:
    synth = pytest.importorskip("gateway.som.synth")
    df = synth.synthesize(customers=300, days=500, seed=5)
    _compare(score_orders(df, keep_features=True), reference.features(df))


def test_peer_reference_numba_and_polars_agree(messy) -> None:
    a = peer_reference(messy).sort("level", "customer_type", "state", "family")
    b = reference.peer_reference_polars(messy).sort("level", "customer_type", "state", "family")
    assert a.columns == b.columns
    for col in a.columns:
        if a[col].dtype == pl.Float64:
            assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-9, equal_nan=True), col
        elif col in peers_mod.EXACT_COLUMNS:
            # The kernel rounds each term to the fixed point, Polars its float sum: the same
            # sums to about 1e-12, not the same last bits.
            if col.endswith("_whole"):
                name = col.removesuffix("_whole")

                def exact(t: pl.DataFrame) -> np.ndarray:
                    return (t[f"{name}_whole"].to_numpy()
                            + t[f"{name}_frac"].to_numpy() / K.PEER_SCALE)
                assert np.allclose(exact(a), exact(b), rtol=1e-9), name
        else:
            assert a[col].equals(b[col]), col


def test_input_order_does_not_change_scores(messy) -> None:
    a = score_orders(messy).with_row_index()
    shuffled = messy.with_row_index().sort("date", "customer", maintain_order=True)
    b = score_orders(shuffled.drop("index")).with_columns(shuffled["index"]).sort("index")
    # Same-day lines keep their relative input order, so scores are identical.
    assert np.allclose(a["score"].to_numpy(), b["score"].to_numpy())
    assert a["reasons"].equals(b["reasons"])


def test_a_customer_whose_class_or_state_changes_scores_the_same_in_any_row_order() -> None:
    """A customer's peer cell is that of its earliest line (as line-by-line scoring meets it),
    not that of its first row in the file: the same lines in another row order (a customer's
    same-day lines kept in their order) get the same scores, flags and reasons, bit for bit."""
    rows = movers(messy_history(customers=120, days=500, seed=7)).with_row_index("_row")
    assert rows.group_by("customer").agg(pl.col("state").n_unique() > 1)["state"].sum() >= 30
    base = score_orders(rows).sort("_row")
    assert base["flag"].sum() > 20
    for other in (rows.sort("date", maintain_order=True),
                  rows.sort("date", descending=True, maintain_order=True),
                  same_day_kept(rows, seed=1), same_day_kept(rows, seed=2)):
        got = score_orders(other).sort("_row")
        assert np.array_equal(got["score"].to_numpy(), base["score"].to_numpy())
        assert got["flag"].equals(base["flag"]) and got["reasons"].equals(base["reasons"])
    # The plain Polars implementation takes the same cells.
    _compare(score_orders(rows, keep_features=True), reference.features(rows))


def test_categorical_keys_score_like_text(messy) -> None:
    cat = messy.with_columns(pl.col("customer").cast(pl.Categorical),
                             pl.col("family").cast(pl.Categorical))
    a = score_orders(messy)
    b = score_orders(cat)
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    assert a["reasons"].equals(b["reasons"])


def test_flagged_lines_collected_past_the_first_buffer(messy) -> None:
    """score_range collects the flagged lines' features in a buffer it doubles when full: with a
    4-row first buffer, the flagged lines and their features are those of keep_features."""
    from gateway.som import peers as peers_mod
    from gateway.som.score import config_vector

    p = peers_mod.prepare(messy)
    matrix, vectors, _ = peers_mod.peer_matrix(peer_reference(messy), p.cells, p.families, 5)
    s_c, s_f, s_day, s_u, s_ctl, s_lu = p.sorted
    score = np.zeros(p.n)
    bits = np.zeros(p.n, np.int32)
    feats = np.empty((p.n, K.NF))
    fpos, ffeat = K.score_range(s_c, s_f, s_day, s_u, s_ctl, s_lu, 0, p.n, p.perm,
                                len(p.families), p.cust_ts, matrix, vectors,
                                config_vector(SomConfig()), True, score, bits, feats,
                                peers_mod.log1p_table(), 4)
    assert len(fpos) > 100
    assert np.array_equal(np.sort(fpos), np.flatnonzero(bits))
    assert np.array_equal(ffeat, feats[fpos], equal_nan=True)
    expected = score_orders(messy)
    assert np.array_equal(score, expected["score"].to_numpy())


def test_peer_reference_and_scores_are_the_same_bits_whatever_the_threads(monkeypatch) -> None:
    """Peer sums are exact (fixed point), so the reference and every score come out bit for bit
    the same on one thread or several, run after run: a score quoted as evidence can be
    reproduced."""
    df = messy_history(customers=3000, days=400, seed=4)
    assert df.height > 200_000  # past the size at which the lines are cut into runs
    monkeypatch.setenv("GATEWAY_SOM_THREADS", "1")
    ref = peer_reference(df)
    scores = score_orders(df, peers=None)["score"].to_numpy()
    for threads in ("2", "3", "2"):
        monkeypatch.setenv("GATEWAY_SOM_THREADS", threads)
        assert peer_reference(df).equals(ref)
        assert np.array_equal(score_orders(df)["score"].to_numpy(), scores)
