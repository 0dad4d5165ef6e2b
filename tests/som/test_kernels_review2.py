"""Scoring core on hand-made histories whose right answers are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from gateway.som import reference
from gateway.som.score import score_orders

from .conftest import lines, monthly


def _last(df: pl.DataFrame, **kw) -> dict:
    return score_orders(df, keep_features=True, **kw).row(-1, named=True)


def test_the_30_day_window_has_no_residue_of_a_fractional_line_that_left() -> None:
    # oxy in the 30 days to 2024-03-01: 449 + 14 + 37 = 500 units, exactly the mix minimum
    # (min_mix_units 500); the 49.3 of 2024-01-25 has left the window. Subtracting it left
    # 499.99999999999994 and the mix finding was not judged.
    rows = monthly("B1", "hydro", 1000, "2023-01", 13, day=15) + [
        ("B1", "oxy", "2023-01-10", 10), ("B1", "oxy", "2024-01-25", 49.3),
        ("B1", "oxy", "2024-02-05", 449), ("B1", "oxy", "2024-02-20", 14),
        ("B1", "oxy", "2024-03-01", 37)]
    df = lines(rows)
    last = _last(df)
    assert last["share_30d"] == 1.0  # the customer's 500 units are all oxy
    assert not math.isnan(last["mix_odds_ratio"]) and "100% of the customer's units" in last["reasons"]
    ref = reference.features(df).row(-1, named=True)
    assert last["flag"] == ref["flag"] and last["findings"] == ref["findings"]


def test_days_of_zero_units_have_no_controlled_share_made_of_residues() -> None:
    # The last 30 days to 2024-02-12 hold three order days of 0 units (0.1 and 0.2 have left):
    # no units, so no share to judge. 0.1 + 0.2 - 0.1 - 0.2 is 2.8e-17, not 0, and that residue
    # was "100% controlled against 9%": a flag on a line of 0 units.
    rows = ([r + (False,) for r in monthly("B1", "amox", 1000, "2023-01", 12)]
            + monthly("B1", "oxy", 100, "2023-01", 12)
            + [("B1", "oxy", d, u) for d, u in (("2024-01-08", 0.1), ("2024-01-10", 0.2),
                                               ("2024-01-25", 0), ("2024-02-05", 0),
                                               ("2024-02-12", 0))])
    last = _last(lines(rows))
    assert last["customer_days_30d"] == 3
    assert math.isnan(last["controlled_30d"]) and math.isnan(last["controlled_odds_ratio"])
    assert "controlled share" not in last["reasons"]


def test_a_frequency_reason_says_what_its_ratio_divides_by() -> None:
    # Every other month for a year: 0.5 order days a month. Then 4 order days in 30 days: the
    # ratio divides by at least 1, so it is 4.0x; the reason quoted "4.0x the usual 0.5 a month"
    # (which reads as 8x) without saying so. Batch and incremental render the same text.
    from gateway.som.incremental import SomState
    from gateway.som.peers import peer_reference

    rows = [("B1", "oxy", f"2023-{m:02d}-05", 100) for m in (1, 3, 5, 7, 9, 11)] + [
        ("B1", "oxy", d, 100) for d in ("2024-01-02", "2024-01-06", "2024-01-10", "2024-01-14")]
    df = lines(rows)
    last = _last(df)
    assert last["frequency_ratio"] == 4.0 and last["usual_orders_month"] == 0.5
    assert ("oxy: 4 order days in the last 30 days = 4.0x the usual 0.5 a month "
            "(counted as 1 when fewer)") in last["reasons"]
    state = SomState(peers=peer_reference(df))
    assert state.update_many(df)[-1].reasons == last["reasons"]


def test_frequency_without_a_recent_interval_is_not_judged_by_either_implementation() -> None:
    # recent_intervals 5 and only 5 order days: no recent interval, so frequency is not judged
    # (it needs the recent interval short as well). The Polars reference judged it (NaN >= 1.5
    # is true in Polars) and flagged what the kernels do not.
    from gateway.som.config import SomConfig
    from gateway.som.kernels import R_FREQ

    cfg = SomConfig(recent_intervals=5, min_orders_30d=2, min_history_months=1)
    df = lines(monthly("B1", "oxy", 100, "2024-01", 3) + [("B1", "oxy", "2024-04-01", 100),
                                                          ("B1", "oxy", "2024-04-03", 100)])
    kern = score_orders(df, cfg, keep_features=True).row(-1, named=True)
    ref = reference.features(df, cfg).row(-1, named=True)
    assert kern["orders_30d"] == ref["orders_30d"] == 3 and math.isnan(ref["interval_ratio"])
    assert not kern["findings"] & R_FREQ and not ref["findings"] & R_FREQ
    assert kern["score"] == pytest.approx(ref["score"])


def test_a_line_under_half_a_unit_is_quoted_with_its_decimal_not_as_0() -> None:
    # 0.4 units a month for a year, then 2.4: "2 units = 6.0x the trailing 12-month average
    # order of 0" was quoted (6 times nothing). A positive number under half a unit keeps one
    # decimal; the rest read as before. Both renderings agree.
    from gateway.som import kernels as K
    from gateway.som.score import reasons_frame, reasons_text

    rows = monthly("B1", "fent", 0.4, "2023-01", 12) + [("B1", "fent", "2024-01-05", 2.4)]
    last = _last(lines(rows))
    assert last["reasons"].startswith(
        "fent: 2 units = 6.0x the trailing 12-month average order of 0.4; ")
    feats = np.full((1, K.NF), np.nan)
    for units, mean, expected in ((9.96, 0.04, "oxy: 10 units = 2.0x the trailing 12-month "
                                   "average order of 0.0"),
                                  (1234.56, 0.5, "oxy: 1,235 units = 2.0x the trailing 12-month "
                                   "average order of 1"),
                                  (0.0, 0.25, "oxy: 0 units = 2.0x the trailing 12-month average "
                                   "order of 0.3")):
        feats[0, [K.F_UNITS, K.F_SIZE, K.F_MEAN12]] = units, 2.0, mean
        fast = reasons_frame(np.array([K.R_SIZE]), feats, pl.Series(["oxy"]),
                             pl.Series(["peers: all customers"]), 8000.0)[0]
        assert fast == reasons_text(K.R_SIZE, feats[0], "oxy", ("", ""), 8000.0) == expected


def test_a_month_over_the_cap_is_flagged_when_it_becomes_unusual() -> None:
    # A usual month of 7,000 units (4 x 1,750), cap 8,000, unusual from 1.4 x 7,000 = 9,800.
    # January crosses the cap at its 5th line (8,750: still usual, not flagged) and becomes
    # unusual at its 6th (10,500). That line was never flagged: "already over the cap" silenced
    # every line after the crossing, though none of them had been flagged.
    from gateway.som.config import SomConfig
    from gateway.som.kernels import R_CAP

    cfg = SomConfig(monthly_cap=8000)
    rows = [("B1", "oxy", f"2023-{m:02d}-{d:02d}", 1750) for m in range(1, 13) for d in (3, 10, 17, 24)]
    rows += [("B1", "oxy", f"2024-01-{d:02d}", 1750) for d in (2, 4, 6, 8, 10, 12, 14)]
    df = lines(rows)
    out = score_orders(df, cfg, keep_features=True).tail(7)
    flagged = [bool(b & R_CAP) for b in out["findings"]]
    assert flagged == [False, False, False, False, False, True, False], out["reasons"].to_list()
    assert "10,500 units this month" in out["reasons"][5] or "10500" in out["reasons"][5]
    ref = reference.features(df, cfg).tail(7)
    assert ref["findings"].to_list() == out["findings"].to_list()
