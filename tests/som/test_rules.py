"""The litigation methods of domain.md §6 on hand-made histories."""

from __future__ import annotations

import polars as pl
import pytest

from gateway.som.rules import RULE_SETS, UnknownRuleSet, apply_all, apply_rule_set

from .conftest import lines, monthly


def _flags(df: pl.DataFrame) -> dict[str, list[bool]]:
    return {name: out["flag"].to_list() for name, out in apply_all(df).items()}


def test_the_five_methods_are_available_by_name() -> None:
    assert list(RULE_SETS) == ["max6", "avg12x2", "avg12x3", "cap8000", "daily_max"]
    with pytest.raises(UnknownRuleSet) as e:
        apply_rule_set("nope", lines(monthly("AB1234563", "oxycodone", 10, "2024-01", 1)))
    assert e.value.code == "som_unknown_rule_set"


def test_month_over_the_history() -> None:
    # 1,000 a month for a year, then January 2025: 2,500 in one order.
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
               + [("AB1234563", "oxycodone", "2025-01-10", 2500)])
    f = _flags(df)
    assert not any(any(v[:-1]) for v in f.values())  # a steady history flags nothing
    assert f["max6"][-1] and f["avg12x2"][-1] and not f["avg12x3"][-1]
    assert not f["cap8000"][-1]
    assert f["daily_max"][-1]
    out = apply_rule_set("avg12x2", df)
    assert out["score"][-1] == pytest.approx(2500 / 2000)
    assert out["reasons"][-1] == ("oxycodone: 2500 units this month above 2x the trailing 12-month "
                                  "average (2000)")
    assert out.columns[:-3] == df.columns


def test_month_to_date_builds_up() -> None:
    # Two orders of 1,800 in January: the second one takes the month to 3,600 > 3 x 1,000.
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
               + [("AB1234563", "oxycodone", "2025-01-03", 1800),
                  ("AB1234563", "oxycodone", "2025-01-20", 1800)])
    f = _flags(df)
    assert f["avg12x3"][-2:] == [False, True]


def test_fixed_cap() -> None:
    df = lines([("AB1234563", "oxycodone", "2024-03-01", 5000),
                ("AB1234563", "oxycodone", "2024-03-15", 3000),
                ("AB1234563", "oxycodone", "2024-03-20", 1),
                ("AB1234563", "oxycodone", "2024-04-02", 7999)])
    out = apply_rule_set("cap8000", df)
    assert out["flag"].to_list() == [False, False, True, False]
    assert out["reasons"][2] == "oxycodone: 8001 units this month above 8,000"


def test_trailing_months_skip_empty_months_and_the_first_month_has_no_history() -> None:
    df = lines([("AB1234563", "oxycodone", "2024-01-10", 1000),
                ("AB1234563", "oxycodone", "2024-04-10", 1500)])
    h = apply_all(df)
    assert not h["max6"]["flag"][0]  # nothing to compare with
    # April: trailing months Jan..Mar hold 1,000 in total over 3 months since the first.
    assert h["avg12x3"]["score"][1] == pytest.approx(1500 / (3 * 1000 / 3))
    assert h["max6"]["flag"][1]


def test_daily_maximum() -> None:
    rows = [("AB1234563", "oxycodone", f"2024-0{m}-0{d}", 300) for m in (1, 2, 3) for d in (1, 2)]
    rows += [("AB1234563", "oxycodone", "2024-04-05", 200), ("AB1234563", "oxycodone", "2024-04-05", 200)]
    out = apply_rule_set("daily_max", lines(rows))
    assert out["flag"].to_list()[-2:] == [False, True]  # 400 that day > the largest day of 300


def test_the_windows_end_twelve_and_six_months_back() -> None:
    """For February 2025 the 12-month window is February 2024 .. January 2025 (January 2024
    falls out) and the 6-month window August 2024 .. January 2025 (July falls out)."""
    df = lines([("AB1234563", "oxycodone", "2024-01-10", 10_000),
                ("AB1234563", "oxycodone", "2024-02-10", 1_200),
                ("AB1234563", "oxycodone", "2024-07-10", 9_000),
                ("AB1234563", "oxycodone", "2024-08-10", 600),
                ("AB1234563", "oxycodone", "2025-02-10", 700),
                ("AB1234563", "hydrocodone", "2025-02-10", 50)])  # another series, no history
    h = apply_all(df)
    assert h["max6"]["score"][4] == pytest.approx(700 / 600)
    # (1,200 + 9,000 + 600) over min(12, 13 months since the first) months.
    assert h["avg12x2"]["score"][4] == pytest.approx(700 / (2 * 10_800 / 12))
    assert h["max6"]["score"][5] == 0.0 and not h["max6"]["flag"][5]


def test_rule_sets_give_the_same_bits_on_every_run() -> None:
    """Day and month totals are summed line by line in time order, not by a group-by whose
    order of addition varies between runs: fractional units give identical scores each time."""
    from .conftest import messy_history

    df = messy_history(customers=40, days=400, seed=3).with_columns(pl.col("dosage_units") / 7)
    first = apply_all(df)
    for _ in range(3):
        again = apply_all(df)
        for name, out in first.items():
            assert out["score"].equals(again[name]["score"]), name
