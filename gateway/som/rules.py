"""The threshold methods used in practice and in opioid litigation (domain.md §6), by name, so a
user can compare them with the scorer on their own data. Plain Polars, one function per method.

Each method compares, per (customer, family), a month-to-date (or day-to-date) total that
includes the line against the customer's own trailing history in that family:
  1. max6        month to date above the largest monthly total of the trailing 6 months;
  2. avg12x2     month to date above 2x the trailing 12-month monthly average;
  3. avg12x3     month to date above 3x that average ("extraordinary order");
  4. cap8000     more than 8,000 dosage units of the family in the calendar month;
  5. daily_max   day to date above the largest daily total of the trailing 6 months.
Trailing months are the calendar months before the line's month; the monthly average divides by
min(12, months since the family's first month), as the scorer does. Methods 1, 2, 3 and 5 need a
month of history; after it, months without orders count as 0 units (a threshold of 0 is exceeded
by any units, score inf). Output: the input columns plus score (the compared total / its threshold),
flag and reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl

from gateway.som.io import read_orders


class UnknownRuleSet(KeyError):
    code = "som_unknown_rule_set"


@dataclass(frozen=True)
class RuleSet:
    name: str
    description: str
    threshold: Callable[[], pl.Expr]  # the threshold expression over the prepared columns
    compared: str  # "mtd" or "dtd"
    text: str  # reason template: {fam}, {x} compared total, {t} threshold


def _month(e: pl.Expr) -> pl.Expr:
    return e.dt.year().cast(pl.Int32) * 12 + e.dt.month().cast(pl.Int32) - 1


def _series_key() -> pl.Expr:
    """One exact integer per (customer, family): the two columns' dictionary codes, combined.
    Sorting, windows and joins over it run several times faster than over two text columns."""
    def code(name: str) -> pl.Expr:
        return pl.col(name).cast(pl.String).cast(pl.Categorical).to_physical().cast(pl.UInt64)

    return code("customer") * (1 << 32) + code("family")


def _running_total(lines: pl.DataFrame, run: str) -> pl.Series:
    """Units summed line by line within each run of rows with the same `run` (the rows sorted so
    that a run is consecutive): what `cum_sum().over(run)` gives, bit for bit. A line alone in
    its run is its own total; only the longer runs are summed, since a window per run costs
    about a microsecond a run (most day runs are one line)."""
    shared = ((pl.col(run) == pl.col(run).shift(1)) | (pl.col(run) == pl.col(run).shift(-1))).fill_null(False)
    longer = (lines.select(run, "dosage_units").with_row_index("_i").filter(shared)
              .group_by(run, maintain_order=True)
              .agg(pl.col("_i"), pl.col("dosage_units").cum_sum())
              .explode("_i", "dosage_units"))
    return lines["dosage_units"].clone().scatter(longer["_i"], longer["dosage_units"])


def _history(df: pl.DataFrame) -> pl.DataFrame:
    """Per line: month to date, day to date, trailing 6-month max month, trailing 12-month
    average month, trailing 6-month max day (all per customer and family)."""
    lines = (df.select("customer", "family", "date", "dosage_units")
             .with_row_index("_row")
             .with_columns(_month(pl.col("date")).alias("_m"), _series_key().alias("_g"))
             .sort("_g", "date", "_row"))
    keys = ["_g"]
    # The lines are sorted: each (series, month) and (series, day) is one run of rows, numbered
    # by where it starts, and a series' first month is the month of its first row.
    def runs(*by: str) -> pl.Expr:
        starts = pl.any_horizontal(pl.col(c) != pl.col(c).shift(1) for c in by)
        return starts.fill_null(True).cum_sum()

    lines = lines.with_columns(runs("_g", "_m").alias("_sm"), runs("_g", "date").alias("_sd"))
    lines = lines.with_columns(
        _running_total(lines, "_sm").alias("mtd"),
        _running_total(lines, "_sd").alias("dtd"),
        pl.when((pl.col("_g") != pl.col("_g").shift(1)).fill_null(True)).then(pl.col("_m"))
        .forward_fill().alias("_first_m"),
    )
    # A run's last row carries its total: a day's and a month's units are summed line by line
    # in time order, so the history is the same to the last bit whatever the threads (a
    # group-by sum adds in an order that varies from run to run).
    def last_of(run: str) -> pl.Expr:
        return (pl.col(run) != pl.col(run).shift(-1)).fill_null(True)

    days = lines.filter(last_of("_sd")).select("_sm", pl.col("dtd").alias("_day"))
    months = (lines.filter(last_of("_sm")).select(*keys, "_m", pl.col("mtd").alias("_tot"))
              .with_columns(days.group_by("_sm", maintain_order=True).agg(pl.col("_day").max())["_day"]
                            .alias("_dmax")))
    lines = lines.drop("_sm", "_sd")
    # Trailing windows over calendar months (a month with no orders adds nothing): months
    # m-12 .. m-1 are the window (m-13, m-1], months m-6 .. m-1 the window (m-7, m-1].
    sum12 = months.rolling(index_column="_m", period="12i", offset="-13i", group_by=keys).agg(
        pl.col("_tot").sum().alias("_sum12"))
    max6 = months.rolling(index_column="_m", period="6i", offset="-7i", group_by=keys).agg(
        pl.col("_tot").max().alias("max6_month"), pl.col("_dmax").max().alias("max6_day"))
    stats = sum12.join(max6, on=[*keys, "_m"])
    lines = lines.join(stats, on=[*keys, "_m"], how="left").with_columns(
        pl.min_horizontal(pl.lit(12), pl.col("_m") - pl.col("_first_m")).alias("_nhist"))
    # With history, a trailing window without orders holds months of 0 units: its maximum and
    # average are 0, not missing (a series that comes back after 7 quiet months is above its
    # trailing 6-month maximum). The first month has no trailing months: no threshold.
    had = pl.col("_nhist") > 0
    lines = lines.with_columns(
        pl.when(had).then(pl.col("_sum12").fill_null(0.0) / pl.col("_nhist")).alias("avg12_month"),
        pl.when(had).then(pl.col("max6_month").fill_null(0.0)).alias("max6_month"),
        pl.when(had).then(pl.col("max6_day").fill_null(0.0)).alias("max6_day"))
    return lines.sort("_row").drop("_g")


RULE_SETS: dict[str, RuleSet] = {
    r.name: r for r in (
        RuleSet("max6", "monthly quantity above the trailing 6-month maximum",
                lambda: pl.col("max6_month"), "mtd",
                "{fam}: {x} units this month above the trailing 6-month maximum of {t}"),
        RuleSet("avg12x2", "monthly quantity above 2x the trailing 12-month average",
                lambda: 2 * pl.col("avg12_month"), "mtd",
                "{fam}: {x} units this month above 2x the trailing 12-month average ({t})"),
        RuleSet("avg12x3", "monthly quantity above 3x the trailing 12-month average",
                lambda: 3 * pl.col("avg12_month"), "mtd",
                "{fam}: {x} units this month above 3x the trailing 12-month average ({t})"),
        RuleSet("cap8000", "more than 8,000 dosage units a month of one family",
                lambda: pl.lit(8000.0), "mtd",
                "{fam}: {x} units this month above 8,000"),
        RuleSet("daily_max", "daily quantity above the trailing 6-month daily maximum",
                lambda: pl.col("max6_day"), "dtd",
                "{fam}: {x} units today above the trailing 6-month daily maximum of {t}"),
    )
}


def _int(e: pl.Expr) -> pl.Expr:
    return e.round(0).cast(pl.Int64).cast(pl.String)


def apply_rule_set(name: str, df: pl.DataFrame, *, history: pl.DataFrame | None = None
                   ) -> pl.DataFrame:
    """The input columns plus score, flag, reasons by the named method of RULE_SETS."""
    if name not in RULE_SETS:
        raise UnknownRuleSet(f"unknown rule set {name!r}; known: {', '.join(RULE_SETS)}")
    rule = RULE_SETS[name]
    df = read_orders(df)
    h = history if history is not None else _history(df)
    x = pl.col(rule.compared)
    t = rule.threshold()
    # A threshold of 0 (months of 0 units) is exceeded by any units: score inf, as x / 0.
    judged = h.select(
        pl.when(t > 0).then(x / t).when((t == 0) & (x > 0)).then(float("inf")).otherwise(0.0)
        .fill_null(0.0).alias("score"),
        x.alias("_x"), t.alias("_t"), pl.col("family"))
    judged = judged.with_columns((pl.col("score") > 1.0).alias("flag"))
    pieces = []
    for j, chunk in enumerate(rule.text.split("{")):
        if j:
            key, chunk = chunk.split("}", 1)
            pieces.append({"fam": pl.col("family"), "x": _int(pl.col("_x")),
                           "t": _int(pl.col("_t"))}[key])
        if chunk:
            pieces.append(pl.lit(chunk))
    # The text is built for the flagged lines only (a few in a hundred), then put in place.
    flagged = judged.with_row_index("_i").filter(pl.col("flag"))
    text = flagged.select(pl.concat_str(pieces).alias("reasons"))["reasons"]
    reasons = pl.Series("reasons", [""], pl.String).new_from_index(0, judged.height)
    if len(text):
        reasons = reasons.scatter(flagged["_i"], text)
    return df.with_columns(judged["score"], judged["flag"], reasons)


def apply_all(df: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Every rule set over the same data (the shared history is computed once)."""
    df = read_orders(df)
    h = _history(df)
    return {name: apply_rule_set(name, df, history=h) for name in RULE_SETS}
