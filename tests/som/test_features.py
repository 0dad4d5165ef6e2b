"""Each feature on small hand-made histories whose answers are worked out by hand."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from gateway.som import kernels as K
from gateway.som.config import SomConfig, SomConfigError
from gateway.som.peers import peer_reference
from gateway.som.score import findings_of, kinds_of, reasons_frame, reasons_text, score_orders

from .conftest import lines, monthly


def _last(df: pl.DataFrame, config: SomConfig = SomConfig()) -> dict:
    return score_orders(df, config, keep_features=True).row(-1, named=True)


def test_size_against_the_customers_history() -> None:
    # 1,000 units on the 5th of every month of 2024, then 4,000 units on 15 January 2025.
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
               + [("AB1234563", "oxycodone", "2025-01-15", 4000)])
    out = score_orders(df, keep_features=True)
    assert not out["flag"][:-1].any()  # a steady history flags nothing
    r = out.row(-1, named=True)
    assert r["mean_line_12m"] == 1000 and r["size_ratio"] == 4.0
    assert r["max_line_6m"] == 1000 and r["max6_ratio"] == 4.0
    assert r["monthly_avg_12m"] == 1000 and r["month_ratio"] == 4.0
    # No spread in the history: the control limit uses the floor of 0.25 on log units.
    z = (math.log1p(4000) - math.log1p(1000)) / 0.25
    assert r["control_z"] == pytest.approx(z)
    assert r["control_limit"] == pytest.approx(math.expm1(math.log1p(1000) + 5 * 0.25))
    assert r["flag"]
    assert set(findings_of(r["findings"])) == {"size", "max6", "control", "month"}
    assert kinds_of(r["findings"]) == ("size",)
    assert r["score"] == pytest.approx(max(4 / 4, 4 / 3, z / 5, 4 / 4))
    assert "oxycodone: 4,000 units = 4.0x the trailing 12-month average order of 1,000" in r["reasons"]
    assert "oxycodone: 4,000 units this month = 4.0x the trailing 12-month monthly average of 1,000" in r["reasons"]
    assert r["reasons"].count("; ") == 3


def test_monthly_average_spans_only_the_months_since_the_first() -> None:
    # Three months of history: the average divides by 3, not 12.
    df = lines(monthly("AB1234563", "oxycodone", 900, "2024-10", 3)
               + [("AB1234563", "oxycodone", "2025-01-20", 3600)])
    r = _last(df)
    assert r["months_history"] == 3
    assert r["monthly_avg_12m"] == 900 and r["month_ratio"] == 4.0


def test_too_little_history_is_not_judged() -> None:
    df = lines(monthly("AB1234563", "oxycodone", 900, "2024-11", 2)
               + [("AB1234563", "oxycodone", "2025-01-20", 9000)])
    r = _last(df)
    assert r["months_history"] == 2
    assert math.isnan(r["size_ratio"]) and math.isnan(r["month_ratio"])
    assert not r["flag"]


def test_frequency_and_shrinking_interval() -> None:
    # Monthly on the 1st for a year, then weekly in January 2025.
    rows = monthly("AB1234563", "hydrocodone", 1000, "2024-01", 12, day=1)
    rows += [("AB1234563", "hydrocodone", d, 1000)
             for d in ("2025-01-01", "2025-01-08", "2025-01-15", "2025-01-22")]
    out = score_orders(lines(rows), keep_features=True)
    r = out.row(-1, named=True)
    assert r["orders_30d"] == 4 and r["usual_orders_month"] == 1.0
    assert r["frequency_ratio"] == 4.0
    assert r["recent_interval"] == 7.0
    assert r["usual_interval"] == pytest.approx(K.DAYS_PER_MONTH)
    assert r["interval_ratio"] == pytest.approx(K.DAYS_PER_MONTH / 7)
    assert {"frequency", "interval"} <= set(findings_of(r["findings"]))
    assert "hydrocodone: 4 order days in the last 30 days = 4.0x the usual 1.0 a month" in r["reasons"]
    assert "interval between orders shrank to 7.0 days from a usual 30.4" in r["reasons"]
    # Three order days in 30 are below the minimum of 4 for a frequency finding.
    r3 = out.row(-2, named=True)
    assert r3["orders_30d"] == 3 and math.isnan(r3["frequency_ratio"])


def test_frequency_needs_a_short_recent_interval() -> None:
    # Weekly orders: interval ratio 30.4 / 7 = 4.35. With the interval floor above that, the count
    # of order days alone is no frequency finding (it would echo after a burst is over).
    rows = monthly("AB1234563", "hydrocodone", 1000, "2024-01", 12, day=1)
    rows += [("AB1234563", "hydrocodone", d, 1000)
             for d in ("2025-01-01", "2025-01-08", "2025-01-15", "2025-01-22")]
    r = _last(lines(rows), SomConfig(frequency_min_interval_ratio=4.5))
    assert r["frequency_ratio"] == 4.0
    assert not r["findings"] & K.R_FREQ and r["findings"] & K.R_INTERVAL
    # Once ordinary intervals are back, the burst leaves nothing behind.
    rows += [("AB1234563", "hydrocodone", d, 1000) for d in ("2025-02-22", "2025-03-22",
                                                             "2025-04-22")]
    assert not _last(lines(rows))["flag"]


def _peers_with(extra: list[tuple], n: int = 6) -> pl.DataFrame:
    rows = []
    for c in range(n):
        rows += monthly(f"BC{c:07d}", "oxycodone", 1000 + 10 * c, "2024-01", 12)
    return lines(rows + extra)


def test_new_family_that_peers_do_not_order() -> None:
    df = _peers_with([("BC0000000", "fentanyl", "2024-11-20", 300)])
    out = score_orders(df, keep_features=True).filter(pl.col("family") == "fentanyl")
    r = out.row(0, named=True)
    # Only this customer orders fentanyl: one customer, below the 5 needed for any peer row.
    assert r["new_family_share"] == 0.0
    tenure = (dt.date(2024, 11, 20) - dt.date(2024, 1, 5)).days
    assert r["tenure_days"] == tenure
    assert r["findings"] & K.R_NEW_FAMILY
    assert r["score"] == 10.0
    assert r["reasons"] == (f"fentanyl: new family after {tenure} days as a customer, ordered by "
                            "0% of peers")


def test_new_family_that_peers_order_is_benign() -> None:
    rows = []
    for c in range(1, 6):
        rows += monthly(f"BC{c:07d}", "hydrocodone", 800, "2024-01", 12, day=9)
    df = _peers_with(rows + [("BC0000000", "hydrocodone", "2024-11-20", 800)])
    r = score_orders(df, keep_features=True).filter(
        (pl.col("customer") == "BC0000000") & (pl.col("family") == "hydrocodone")).row(0, named=True)
    assert r["new_family_share"] == 1.0  # all six customers of the cell order it
    assert not r["flag"]


def test_new_family_of_a_new_customer_is_not_a_pattern_finding() -> None:
    df = _peers_with([("BC0000009", "oxycodone", "2024-06-01", 1000),
                      ("BC0000009", "fentanyl", "2024-07-01", 300)])
    r = score_orders(df).filter(pl.col("family") == "fentanyl").row(0, named=True)
    assert not r["flag"]  # 30 days of tenure: below the 180 needed


def test_peer_reference_statistics() -> None:
    units = [100, 200, 400, 800, 1600]
    df = lines([(f"BC{c:07d}", "oxycodone", "2024-03-10", u) for c, u in enumerate(units)])
    ref = peer_reference(df)
    cell = ref.filter(pl.col("level") == "type_state").row(0, named=True)
    logs = np.log1p(units)
    assert cell["customers"] == 5 and cell["lines"] == 5 and cell["share"] == 1.0
    assert cell["line_log_mean"] == pytest.approx(logs.mean())
    assert cell["line_log_sd"] == pytest.approx(logs.std(ddof=1))
    assert cell["month_log_mean"] == pytest.approx(logs.mean())  # one month per customer
    assert cell["typical_line"] == pytest.approx(math.expm1(logs.mean()))
    assert set(ref["level"]) == {"type_state", "type", "family"}


def test_size_against_peers() -> None:
    rows = []
    for c in range(20):
        rows += monthly(f"BC{c:07d}", "oxycodone", 1000 + 20 * c, "2024-01", 2)
    rows.append(("BC0000099", "oxycodone", "2024-02-20", 50000))
    df = lines(rows)
    r = score_orders(df, keep_features=True).row(-1, named=True)
    ref = peer_reference(df).filter(pl.col("level") == "type_state").row(0, named=True)
    sd = max(ref["line_log_sd"], 0.25)
    assert r["peer_z"] == pytest.approx((math.log1p(50000) - ref["line_log_mean"]) / sd)
    assert r["findings"] & K.R_PEER
    assert "peers: RETAIL PHARMACY, OH" in r["reasons"]


def test_monthly_cap_for_a_customer_under_it() -> None:
    rows = monthly("AB1234563", "oxycodone", 5000, "2024-01", 12)
    rows += [("AB1234563", "oxycodone", "2025-01-05", 4000),
             ("AB1234563", "oxycodone", "2025-01-20", 5000)]
    out = score_orders(lines(rows), keep_features=True)
    r = out.row(-1, named=True)
    assert r["month_to_date"] == 9000 and r["cap_ratio"] == 9000 / 8000
    assert r["findings"] & K.R_CAP
    assert ("oxycodone: 9,000 units this month exceed the monthly cap of 8,000 (largest month of "
            "the trailing 12: 5,000)") in r["reasons"]
    # A customer whose ordinary month is above the cap has outgrown it.
    big = monthly("AB1234563", "oxycodone", 9000, "2024-01", 13)
    assert not score_orders(lines(big))["flag"].any()


def test_sustained_rise_and_a_single_restock() -> None:
    base = monthly("AB1234563", "oxycodone", 1000, "2024-01", 14)
    rise = base + [("AB1234563", "oxycodone", d, 2000)
                   for d in ("2025-03-05", "2025-04-05", "2025-05-05")]
    r = _last(lines(rise))
    # May 2025: the last three order days are 2,000 each (the largest left out: 2,000); the
    # trailing 12 months are May 2024 .. Apr 2025: 10 x 1,000 and 2 x 2,000 over 12 order days,
    # above the same season last year (May and June 2024: 1,000 a day).
    usual = (10 * 1000 + 2 * 2000) / 12
    assert r["recent_day_units"] == 2000 and r["usual_day_units"] == pytest.approx(usual)
    assert r["sustained_ratio"] == pytest.approx(2000 / usual)
    assert r["findings"] & K.R_SUSTAINED
    assert "oxycodone: the last order days average 2,000 units (the largest left out) = 1.7x" in r["reasons"]
    restock = base + [("AB1234563", "oxycodone", "2025-03-05", 2000),
                      ("AB1234563", "oxycodone", "2025-04-05", 1000)]
    out = score_orders(lines(restock), keep_features=True)
    assert not out["flag"].any()
    assert out.row(-1, named=True)["recent_day_units"] == 1000


def test_sustained_rise_is_judged_against_last_years_season() -> None:
    # Last winter December and January ran at 1,800; this winter's 2,000 is 1.57x the trailing
    # 12-month order day (16,600 / 13) but only 1.1x the same season last year: no finding.
    rows = [("AB1234563", "oxycodone", "2023-11-05", 1000),
            ("AB1234563", "oxycodone", "2023-12-05", 1800),
            ("AB1234563", "oxycodone", "2024-01-05", 1800)]
    rows += monthly("AB1234563", "oxycodone", 1000, "2024-02", 9)
    rows += [("AB1234563", "oxycodone", d, 2000) for d in ("2024-11-05", "2024-11-20", "2024-12-05")]
    r = _last(lines(rows))
    assert r["months_history"] == 12
    assert r["usual_day_units"] == pytest.approx(1800)
    assert r["sustained_ratio"] == pytest.approx(2000 / 1800)
    assert not r["findings"] & K.R_SUSTAINED
    assert 2000 / (16600 / 13) >= SomConfig().sustained_ratio  # what the yearly mean alone says


def test_family_mix_shift() -> None:
    rows = []
    for m in range(12):
        for d, fam, u in ((2, "oxycodone", 200), (9, "hydrocodone", 1800), (16, "hydrocodone", 1800),
                          (23, "hydrocodone", 1800)):
            rows.append(("AB1234563", fam, f"2024-{m + 1:02d}-{d:02d}", u))
    rows += [("AB1234563", "hydrocodone", "2025-01-03", 100),
             ("AB1234563", "oxycodone", "2025-01-10", 5000)]
    r = _last(lines(rows))
    share12 = 200 * 12 / (200 * 12 + 5400 * 12)
    share30 = 5000 / (5000 + 100 + 1800 * 2)  # Dec 16, Dec 23, Jan 3 and the line are in 30 days
    assert r["share_12m"] == pytest.approx(share12)
    assert r["share_30d"] == pytest.approx(share30)
    odds = lambda p: min(max(p, 0.05), 0.95) / (1 - min(max(p, 0.05), 0.95))  # noqa: E731
    assert r["mix_odds_ratio"] == pytest.approx(odds(share30) / odds(share12))
    assert r["findings"] & K.R_MIX


def test_controlled_share() -> None:
    rows = []
    for m in range(12):
        for d in (3, 10, 17, 24):
            rows.append(("AB1234563", "amoxicillin", f"2024-{m + 1:02d}-{d:02d}", 900, False))
        rows.append(("AB1234563", "oxycodone", f"2024-{m + 1:02d}-05", 100))
    for d in ("2025-01-06", "2025-01-13", "2025-01-20", "2025-01-27"):
        rows.append(("AB1234563", "oxycodone", d, 2000))
    rows.append(("AB1234563", "amoxicillin", "2025-01-28", 100, False))
    out = score_orders(lines(rows), keep_features=True)
    ctl = out.filter(pl.col("family") == "oxycodone").row(-1, named=True)
    assert ctl["controlled_12m"] == pytest.approx(1200 / (1200 + 3600 * 12))
    assert ctl["findings"] & K.R_CONTROLLED
    # Non-controlled lines inform the share but are never flagged themselves.
    assert not out.filter(~pl.col("controlled"))["flag"].any()


def test_thresholds_are_configuration() -> None:
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
               + [("AB1234563", "oxycodone", "2025-01-15", 4000)])
    lenient = SomConfig(size_ratio=5, size_over_max6=5, control_z=10, month_ratio=5,
                        sustained_ratio=5)
    assert not score_orders(df, lenient)["flag"][-1]
    assert SomConfig.from_dict({"size_ratio": "2.5"}).size_ratio == 2.5
    with pytest.raises(SomConfigError) as e:
        SomConfig.from_dict({"size_ratoi": 2})
    assert e.value.code == "som_config_invalid"
    with pytest.raises(SomConfigError):
        SomConfig(size_ratio=-1)


def test_config_takes_only_finite_numbers_and_whole_numbers_where_whole() -> None:
    """NaN never compares and inf never flags: neither is a threshold; a whole-number setting
    given 2.5 is refused, not cut to 2; anything but a table of settings is refused."""
    refused = [{"size_ratio": float("inf")}, {"size_ratio": float("nan")}, {"peer_z": "inf"},
               {"min_history_months": float("inf")},  # int(inf) raised OverflowError
               {"min_history_months": 10**400},  # beyond any float
               {"sustained_orders": 2.5}, {"sustained_orders": "3.5"}, {"recent_intervals": True},
               {"size_ratio": "4x"}, {"size_ratio": None}]
    for data in refused:
        with pytest.raises(SomConfigError) as e:
            SomConfig.from_dict(data)
        assert e.value.code == "som_config_invalid", data
    for data in (5, [1, 2], "size_ratio = 2", None):
        with pytest.raises(SomConfigError):
            SomConfig.from_dict(data)
    for changes in ({"size_ratio": float("nan")}, {"monthly_cap": float("inf")},
                    {"sustained_orders": 2.5}):
        with pytest.raises(SomConfigError):
            SomConfig(**changes)
    cfg = SomConfig.from_dict({"sustained_orders": 4.0, "min_history_months": "6",
                               "size_ratio": "2.5"})
    assert (cfg.sustained_orders, cfg.min_history_months, cfg.size_ratio) == (4, 6, 2.5)
    assert type(cfg.sustained_orders) is int


def test_config_from_toml(tmp_path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text("[som]\nmonthly_cap = 12000\nmin_history_months = 4\n")
    cfg = SomConfig.from_toml(p)
    assert cfg.monthly_cap == 12000 and cfg.min_history_months == 4
    assert cfg.size_ratio == SomConfig().size_ratio


def test_python_and_vectorised_reasons_agree(messy) -> None:
    out = score_orders(messy, keep_features=True)
    flagged = out.filter(pl.col("flag"))
    assert flagged.height > 20
    feats = flagged.select(K.FEATURES).to_numpy()
    peer = pl.Series(["peers: RETAIL PHARMACY, OH"] * flagged.height)
    fast = reasons_frame(flagged["findings"].to_numpy(), feats, flagged["family"], peer, 8000.0)
    for bits, f, fam, text in zip(flagged["findings"], feats, flagged["family"], fast):
        assert reasons_text(bits, f, fam, ("RETAIL PHARMACY", "OH"), 8000.0) == text
    assert all(out.filter(~pl.col("flag"))["reasons"] == "")


def test_rendered_reasons_match_python_on_awkward_numbers() -> None:
    """Rounding halves, negatives, thousands separators, non-ASCII names, and numbers too large
    for the Numba renderer (those lines fall back to the Python rendering): the same text."""
    rng = np.random.default_rng(9)
    values = np.array([0.0, 0.05, 0.45, 0.5, 2.25, 999.5, 999.95, 1234.5, -0.04, -0.06, -1234.56,
                       1e6 + 0.5, 123456789.25, 2.0 ** 52, 1e17, 7.5e18, 0.125, 0.995])
    m = 400
    bits = rng.integers(1, 1 << 13, m)
    feats = rng.choice(values, (m, K.NF))
    families = pl.Series(rng.choice(["oxycodone", "hydrocodone", "fentanyl", "morfina ñ é"], m))
    peers = pl.Series(rng.choice(["peers: RETAIL PHARMACY, OH", "peers: all customers"], m))
    fast = reasons_frame(bits, feats, families, peers, 8000.0)
    for b, f, fam, peer, text in zip(bits, feats, families, peers, fast):
        label = ("RETAIL PHARMACY", "OH") if "OH" in peer else ("", "")
        assert reasons_text(int(b), f, fam, label, 8000.0) == text
