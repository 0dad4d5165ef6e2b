"""The due-diligence page: the numbers of the line, its history and thresholds; escaped text."""

from __future__ import annotations

import datetime as dt
import re
from xml.etree import ElementTree

import polars as pl
import pytest

from gateway.som.diligence import DiligenceError, diligence_data, diligence_page
from gateway.som.errors import SomError


def _history() -> pl.DataFrame:
    """One pharmacy ordering 1,000 units of oxycodone a month for a year, then 5,000 in one order;
    six peers ordering 800-1,300 a month."""
    rows = []
    for m in range(1, 13):
        rows.append(("25X0000%02d" % m, 1, "BP1234563", "RETAIL PHARMACY", "WV", "oxycodone", dt.date(2024, m, 10),
                     1000.0 + 10 * m, 1.0, False, ""))
    rows.append(("25X000099", 2, "BP1234563", "RETAIL PHARMACY", "WV", "oxycodone", dt.date(2025, 1, 12),
                 5000.0, 4.2, True, "oxycodone: 5,000 units = 4.2x <the trailing> average & more"))
    for p in range(6):
        for m in range(1, 13):
            rows.append((f"25P{p}{m:05d}", 1, f"BX{p}000000", "RETAIL PHARMACY", "WV", "oxycodone",
                         dt.date(2024, m, 5), 800.0 + 100 * p, 0.5, False, ""))
        rows.append((f"25P{p}99999", 1, f"BX{p}000000", "RETAIL PHARMACY", "WV", "oxycodone", dt.date(2025, 1, 5),
                     800.0 + 100 * p, 0.5, False, ""))
    return pl.DataFrame(rows, schema=["order_id", "line", "customer", "customer_type", "state", "family", "date",
                                      "dosage_units", "score", "flag", "reasons"], orient="row")


def test_figures_of_the_flagged_month() -> None:
    d = diligence_data(_history(), "25X000099", 2)
    assert d.flagged_month == dt.date(2025, 1, 1)
    assert len(d.months) == 13
    p = d.flagged_point
    assert p.units == 5000.0
    assert d.month_to_date == 5000.0
    # Trailing 12 months: 1,010 .. 1,120 -> average 1,065; 6-month max 1,120.
    assert p.avg12 == pytest.approx(1065.0)
    assert p.max6 == pytest.approx(1120.0)
    assert p.control_limit == pytest.approx(1065.0 + 3 * pl.Series([1000.0 + 10 * m for m in range(1, 13)]).std())
    # Six peers at 800..1,300 a month.
    assert p.peer_low == pytest.approx(pl.Series([800.0 + 100 * k for k in range(6)]).quantile(0.1, "linear"))
    assert p.peer_median == pytest.approx(1050.0)
    assert d.peer_group == "RETAIL PHARMACY, WV (6 customers)"
    assert d.recent[-1]["order_id"] == "25X000099"


def test_page_shows_numbers_chart_and_escapes() -> None:
    page = diligence_page(_history(), "25X000099", 2)
    assert page.startswith("<!DOCTYPE html>")
    for number in ("5,000", "1,065", "2,130", "3,195", "1,120", "8,000", "1,050"):
        assert number in page, number
    # Reasons are escaped, never raw markup.
    assert "&lt;the trailing&gt; average &amp; more" in page
    assert "<the trailing>" not in page
    # Self-contained: inline SVG, no script, no external reference.
    assert "<svg" in page and "<script" not in page
    assert not re.search(r'(src|href)\s*=\s*"(http|//)', page)
    svg = page[page.index("<svg"):page.index("</svg>") + 6]
    root = ElementTree.fromstring(svg)  # well-formed
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
    assert any("2025-01: 5,000 units" in r.find("{http://www.w3.org/2000/svg}title").text for r in bars)
    assert 'fill="#c0392b"' in svg  # the flagged month highlighted
    assert "exceeded" in page


def test_hostile_identifiers_are_escaped() -> None:
    hostile = _history().with_columns(
        pl.when(pl.col("customer") == "BP1234563").then(pl.lit('"><script>alert(1)</script>'))
        .otherwise(pl.col("customer")).alias("customer"),
        pl.lit("oxy<b>codone</b>").alias("family"))
    page = diligence_page(hostile, "25X000099", 2)
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_unknown_line() -> None:
    with pytest.raises(DiligenceError) as err:
        diligence_data(_history(), "25X000099", 7)
    assert err.value.code == "som_line_not_found"
    with pytest.raises(DiligenceError) as err:
        diligence_data(_history().drop("family"), "25X000099", 2)
    assert err.value.code == "som_missing_column"


def test_lazy_scan_gives_the_same_page(tmp_path) -> None:
    path = tmp_path / "scored.parquet"
    _history().write_parquet(path)
    assert diligence_page(pl.scan_parquet(path), "25X000099", 2) == diligence_page(_history(), "25X000099", 2)


def _on_the_line(column: str, value: object) -> pl.DataFrame:
    h = _history()
    return h.with_columns(pl.when(pl.col("order_id") == "25X000099").then(pl.lit(value, h.schema[column]))
                          .otherwise(pl.col(column)).alias(column))


@pytest.mark.parametrize("column, value, code", [
    ("dosage_units", None, "som_invalid_units"),  # float(None): a traceback
    ("dosage_units", float("inf"), "som_invalid_units"),  # a traceback drawing the axis
    ("dosage_units", float("nan"), "som_invalid_units"),  # a chart of "nan" coordinates
    ("dosage_units", -5000.0, "som_invalid_units"),
    ("date", None, "som_invalid_date"),  # a traceback
    ("date", dt.date(1, 1, 1), "som_invalid_date"),  # 24,000 months of bars
    ("customer", None, "som_missing_value"),  # a traceback
    ("family", None, "som_missing_value"),
])
def test_a_line_the_scorer_would_refuse_gets_its_code(column, value, code) -> None:
    with pytest.raises(SomError) as err:
        diligence_page(_on_the_line(column, value), "25X000099", 2)
    assert err.value.code == code


def test_text_dates_are_read_as_the_scorer_reads_them() -> None:
    text = _history().with_columns(pl.col("date").dt.strftime("%Y-%m-%d"))
    assert diligence_page(text, "25X000099", 2) == diligence_page(_history(), "25X000099", 2)
    ambiguous = text.with_columns(pl.when(pl.col("order_id") == "25X000099").then(pl.lit("12/01/2025"))
                                  .otherwise(pl.col("date")).alias("date"))
    with pytest.raises(SomError) as err:  # was a traceback
        diligence_page(ambiguous, "25X000099", 2)
    assert err.value.code == "som_ambiguous_date"


def test_a_line_written_false_is_not_called_held() -> None:
    """A scored CSV holds `flag` as the text `false`, which bool() took for True: the page of
    an unflagged line said "held as suspicious"."""
    text = _history().with_columns(pl.col("flag").cast(pl.String).str.to_lowercase(),
                                   pl.col("score").cast(pl.String))
    unflagged = text.filter(pl.col("order_id") == "25X000012").row(0, named=True)
    assert unflagged["flag"] == "false"
    page = diligence_page(text, "25X000012", 1)
    assert page == diligence_page(_history(), "25X000012", 1)
    assert "held" not in page.split("<h2>")[0] and "not flagged" in page
    assert "held as suspicious" in diligence_page(text, "25X000099", 2)
    with pytest.raises(SomError) as err:
        diligence_page(text.with_columns(pl.lit("perhaps").alias("flag")), "25X000012", 1)
    assert err.value.code == "som_invalid_value"
    with pytest.raises(SomError) as err:
        diligence_page(text.with_columns(pl.lit("high").alias("score")), "25X000012", 1)
    assert err.value.code == "som_invalid_value"


def test_a_line_that_is_there_twice_is_not_picked_at_random() -> None:
    twice = pl.concat([_history(), _history().filter(pl.col("order_id") == "25X000099")
                       .with_columns(pl.lit(0.1).alias("score"), pl.lit(False).alias("flag"))])
    with pytest.raises(DiligenceError) as err:
        diligence_data(twice, "25X000099", 2)
    assert err.value.code == "som_duplicate_line"
