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
month of history. Output: the input columns plus score (the compared total / its threshold),
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


def _history(df: pl.DataFrame) -> pl.DataFrame:
    """Per line: month to date, day to date, trailing 6-month max month, trailing 12-month
    average month, trailing 6-month max day (all per customer and family)."""
    lines = (df.select("customer", "family", "date", "dosage_units")
             .with_row_index("_row")
             .with_columns(_month(pl.col("date")).alias("_m"), _series_key().alias("_g"))
             .sort("_g", "date", "_row"))
    keys = ["_g"]
    # The lines are sorted: each (series, month) and (series, day) is one run of rows, numbered
    # by where it starts; windows over one run number are cheaper than over two keys.
    def runs(*by: str) -> pl.Expr:
        starts = pl.any_horizontal(pl.col(c) != pl.col(c).shift(1) for c in by)
        return starts.fill_null(True).cum_sum()

    lines = lines.with_columns(runs("_g", "_m").alias("_sm"), runs("_g", "date").alias("_sd"))
    lines = lines.with_columns(
        pl.col("dosage_units").cum_sum().over("_sm").alias("mtd"),
        pl.col("dosage_units").cum_sum().over("_sd").alias("dtd"),
        pl.col("_m").min().over(keys).alias("_first_m"),
    ).drop("_sm", "_sd")
    days = lines.group_by([*keys, "_m", "date"]).agg(pl.col("dosage_units").sum().alias("_day"))
    months = (days.group_by([*keys, "_m"])
              .agg(pl.col("_day").sum().alias("_tot"), pl.col("_day").max().alias("_dmax")))
    # Trailing windows over calendar months by shifted self-joins (months with no orders are 0).
    trail = months.select(*keys, "_m")
    parts = []
    for k in range(1, 13):
        parts.append(months.with_columns((pl.col("_m") + k).alias("_m"), pl.lit(k).alias("_k")))
    shifted = pl.concat(parts).join(trail, on=[*keys, "_m"], how="semi")
    stats = shifted.group_by([*keys, "_m"]).agg(
        pl.col("_tot").sum().alias("_sum12"),
        pl.col("_tot").filter(pl.col("_k") <= 6).max().alias("max6_month"),
        pl.col("_dmax").filter(pl.col("_k") <= 6).max().alias("max6_day"),
    )
    lines = lines.join(stats, on=[*keys, "_m"], how="left").with_columns(
        pl.min_horizontal(pl.lit(12), pl.col("_m") - pl.col("_first_m")).alias("_nhist"))
    lines = lines.with_columns(
        pl.when(pl.col("_nhist") > 0).then(pl.col("_sum12").fill_null(0.0) / pl.col("_nhist"))
        .alias("avg12_month"))
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
    judged = h.select(
        pl.when(t > 0).then(x / t).otherwise(0.0).fill_null(0.0).alias("score"),
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
    judged = judged.with_columns(
        pl.when(pl.col("flag")).then(pl.concat_str(pieces)).otherwise(pl.lit("")).alias("reasons"))
    return df.with_columns(judged["score"], judged["flag"], judged["reasons"])


def apply_all(df: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Every rule set over the same data (the shared history is computed once)."""
    df = read_orders(df)
    h = _history(df)
    return {name: apply_rule_set(name, df, history=h) for name in RULE_SETS}
