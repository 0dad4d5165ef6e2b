"""Helpers for SOM tests: hand-made histories and a small messy generator."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from gateway.som import kernels

FEATURE = {name: k for k, name in enumerate(kernels.FEATURES)}


def lines(rows: list[tuple], *, customer_type: str = "RETAIL PHARMACY", state: str = "OH"
          ) -> pl.DataFrame:
    """A native table from (customer, family, 'YYYY-MM-DD', units[, controlled]) tuples."""
    out = []
    for i, r in enumerate(rows):
        customer, family, date, units = r[:4]
        controlled = r[4] if len(r) > 4 else True
        out.append({"order_id": f"26X{i:06d}", "line": 1, "customer": customer,
                    "customer_type": customer_type, "state": state, "family": family,
                    "ndc": "", "date": dt.date.fromisoformat(date), "dosage_units": float(units),
                    "controlled": controlled})
    return pl.DataFrame(out, schema_overrides={"line": pl.Int32})


def monthly(customer: str, family: str, units: float, start: str, months: int, day: int = 5
            ) -> list[tuple]:
    """One line a month on `day`, `months` months from the month of `start`."""
    y, m = int(start[:4]), int(start[5:7])
    rows = []
    for k in range(months):
        yy, mm = y + (m - 1 + k) // 12, (m - 1 + k) % 12 + 1
        rows.append((customer, family, f"{yy:04d}-{mm:02d}-{day:02d}", units))
    return rows


def messy_history(customers: int = 150, days: int = 500, seed: int = 0) -> pl.DataFrame:
    """A history with what breaks naive code: input not in time order, several lines on one day,
    families started late, non-controlled lines, small peer groups, bursts and big orders."""
    rng = np.random.default_rng(seed)
    fams = np.array(["oxycodone", "hydrocodone", "fentanyl", "alprazolam", "tramadol",
                     "amoxicillin"])
    types = np.array(["RETAIL PHARMACY", "CHAIN PHARMACY", "HOSP/CLINIC", "PRACTITIONER"])
    states = np.array(["OH", "WV", "KY", "TN"])
    start = (dt.date(2024, 1, 1) - dt.date(1970, 1, 1)).days
    cols: dict[str, list] = {k: [] for k in ("customer", "customer_type", "state", "family",
                                             "day", "units", "controlled")}
    for c in range(customers):
        ctype, cstate = types[c % 4], states[(c // 4) % 4]
        for f in rng.choice(len(fams), rng.integers(1, 5), replace=False):
            every = int(rng.integers(3, 40))
            base = float(rng.lognormal(5.5, 1.0))
            first = int(rng.integers(0, days // 2)) if rng.random() < 0.3 else int(
                rng.integers(0, every))
            d = first
            while d < days:
                n_same_day = 2 if rng.random() < 0.05 else 1
                for _ in range(n_same_day):
                    u = round(base * rng.lognormal(0, 0.3))
                    if rng.random() < 0.01:
                        u *= int(rng.integers(3, 9))
                    cols["customer"].append(f"B{c:07d}")
                    cols["customer_type"].append(ctype)
                    cols["state"].append(cstate)
                    cols["family"].append(fams[f])
                    cols["day"].append(start + d)
                    cols["units"].append(float(max(u, 1)))
                    cols["controlled"].append(fams[f] != "amoxicillin")
                gap = every if rng.random() > 0.03 else max(1, every // 4)
                d += max(1, gap + int(rng.integers(-2, 3)))
    n = len(cols["day"])
    order = rng.permutation(n)  # not in time order
    df = pl.DataFrame({
        "order_id": [f"26X{i:06d}" for i in range(n)],
        "line": pl.Series(np.ones(n, np.int32)),
        "customer": cols["customer"], "customer_type": cols["customer_type"],
        "state": cols["state"], "family": cols["family"],
        "ndc": [""] * n,
        "date": pl.Series(cols["day"], dtype=pl.Int32).cast(pl.Date),
        "dosage_units": cols["units"], "controlled": cols["controlled"],
    })
    return df[order]


def movers(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with customers whose cell changes halfway through the history: every third moves to
    another state, the next in every three changes class of trade (rows stay where they are)."""
    cut = df["date"].min() + (df["date"].max() - df["date"].min()) / 2
    number = pl.col("customer").str.slice(1).cast(pl.Int64)
    later = pl.col("date") >= cut
    return df.with_columns(
        pl.when(later & (number % 3 == 0)).then(pl.lit("PA")).otherwise("state").alias("state"),
        pl.when(later & (number % 3 == 1)).then(pl.lit("HOSP/CLINIC")).otherwise("customer_type")
        .alias("customer_type"))


def same_day_kept(rows: pl.DataFrame, seed: int) -> pl.DataFrame:
    """The rows (with a `_row` column) in a random order, except that each customer's lines of
    one day keep their relative order (the one order scoring depends on)."""
    shuffled = rows.sample(fraction=1.0, shuffle=True, seed=seed).with_row_index("_pos")
    slots = shuffled.select("customer", "date", "_pos").sort("customer", "date", "_pos")
    return (rows.sort("customer", "date", "_row").with_columns(slots["_pos"]).sort("_pos")
            .drop("_pos"))


@pytest.fixture(scope="session")
def messy() -> pl.DataFrame:
    return messy_history()


def assert_same_state(a, b) -> None:
    """Two SomStates hold the same customers, cells and groups, to the bit (NaN equal to NaN)."""
    assert a.customers.keys() == b.customers.keys() and a.cells == b.cells
    assert a.groups.keys() == b.groups.keys()
    for name in a.customers:
        assert np.array_equal(a.customers[name], b.customers[name], equal_nan=True), name
    for key in a.groups:
        assert np.array_equal(a.groups[key], b.groups[key], equal_nan=True), key
