"""Reading order histories (Parquet, CSV; native and ARCOS shapes) and writing scores."""

from __future__ import annotations

import datetime as dt
import numpy as np
import polars as pl
import pytest

from gateway.som.io import SomInputError, detect_shape, read_orders, write_scored
from gateway.som.score import score_orders

from .conftest import lines, monthly


def _to_arcos(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(
        pl.col("customer").alias("BUYER_DEA_NO"), pl.col("customer_type").alias("BUYER_BUS_ACT"),
        pl.col("state").alias("BUYER_STATE"), pl.col("family").alias("DRUG_NAME"),
        pl.col("ndc").alias("NDC_NO"), pl.col("dosage_units").alias("DOSAGE_UNIT"),
        pl.col("date").dt.strftime("%m%d%Y").alias("TRANSACTION_DATE"),
        pl.col("order_id").alias("TRANSACTION_ID"),
        pl.lit("FOO").alias("REPORTER_DEA_NO"))


def test_arcos_shape_scores_like_the_native_shape(messy, tmp_path) -> None:
    native = messy.drop("controlled")
    arcos = _to_arcos(native)
    assert detect_shape(arcos.columns) == "arcos"
    a = score_orders(native)
    for path in (tmp_path / "arcos.parquet", tmp_path / "arcos.csv"):
        (arcos.write_parquet if path.suffix == ".parquet" else arcos.write_csv)(path)
        b = score_orders(read_orders(path))
        assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())
        assert a["reasons"].equals(b["reasons"])
        assert "REPORTER_DEA_NO" in b.columns  # columns neither shape knows are kept


def test_arcos_dates_read_as_numbers_lose_no_leading_zero(tmp_path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("BUYER_DEA_NO,DRUG_NAME,DOSAGE_UNIT,TRANSACTION_DATE\n"
                    "AB1234563,OXYCODONE,100,1062012\nAB1234563,OXYCODONE,100,12312012\n")
    df = read_orders(path)
    assert df["date"].to_list() == [dt.date(2012, 1, 6), dt.date(2012, 12, 31)]
    assert df["customer"].to_list() == ["AB1234563"] * 2 and df["family"][0] == "OXYCODONE"


def test_arcos_input_comes_out_in_its_own_shape(messy, tmp_path) -> None:
    """Parquet in, Parquet out with the input columns kept: an ARCOS file keeps its names, its
    order and its TRANSACTION_DATE as written (here a number that lost its leading zero), and
    the due-diligence page reads the result."""
    from gateway.som.diligence import diligence_data
    from gateway.som.score import score_file

    native = messy.drop("controlled")
    arcos = _to_arcos(native).with_columns(
        pl.col("TRANSACTION_DATE").cast(pl.Int64), pl.col("DOSAGE_UNIT").cast(pl.Int64))
    source = tmp_path / "arcos.parquet"
    arcos.write_parquet(source)
    flagged = score_file(str(source), str(tmp_path / "out.parquet"))
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.columns == [*arcos.columns, "score", "flag", "reasons"]
    assert out.select(arcos.columns).equals(arcos)  # values and types as they came in
    native_scores = score_orders(native)
    assert np.array_equal(out["score"].to_numpy(), native_scores["score"].to_numpy())
    assert int(out["flag"].sum()) == flagged > 0
    hit = out.filter(pl.col("flag")).row(0, named=True)
    page = diligence_data(out, hit["TRANSACTION_ID"], 1)
    assert page.line["customer"] == hit["BUYER_DEA_NO"] and page.line["reasons"] == hit["reasons"]


def test_native_parquet_and_csv_round_trip(tmp_path) -> None:
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
               + [("AB1234563", "oxycodone", "2025-01-15", 4000)])
    df.write_parquet(tmp_path / "in.parquet")
    df.write_csv(tmp_path / "in.csv")
    a = score_orders(read_orders(tmp_path / "in.parquet"))
    b = score_orders(read_orders(tmp_path / "in.csv"))
    assert a.columns == [*df.columns, "score", "flag", "reasons"]
    assert a["score"].equals(b["score"]) and a["flag"][-1]
    out = write_scored(a, tmp_path / "out.parquet")
    back = pl.read_parquet(out)
    assert back.equals(a)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("frame, code", [
    (pl.DataFrame({"a": [1]}), "som_unknown_format"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-13-45"],
                   "dosage_units": [1.0]}), "som_invalid_date"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [-1.0]}), "som_invalid_units"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [None]}, schema_overrides={"dosage_units": pl.Float64}),
     "som_invalid_units"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [float("inf")]}), "som_invalid_units"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [float("-inf")]}), "som_invalid_units"),
    (pl.DataFrame({"customer": ["A"], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [1e12 + 1]}), "som_invalid_units"),
    (pl.DataFrame({"customer": [None], "family": ["x"], "date": ["2024-01-02"],
                   "dosage_units": [1.0]}, schema_overrides={"customer": pl.String}),
     "som_missing_value"),
    (pl.DataFrame({"BUYER_DEA_NO": ["A"], "DOSAGE_UNIT": [1.0], "TRANSACTION_DATE": ["01022024"]}),
     "som_missing_column"),
])
def test_bad_input_has_a_code(frame: pl.DataFrame, code: str) -> None:
    with pytest.raises(SomInputError) as e:
        score_orders(frame)
    assert e.value.code == code


def test_non_finite_and_absurd_units_are_refused_with_their_count(tmp_path) -> None:
    """+inf units (NaN, null and negative ones were already refused) and more than
    MAX_DOSAGE_UNITS on a line: a coded error naming the column and the number of bad lines,
    from a CSV (native or ARCOS) as from a frame, and no output file written."""
    from gateway.som.io import MAX_DOSAGE_UNITS
    from gateway.som.score import score_file

    assert MAX_DOSAGE_UNITS == 1e12
    ok = read_orders(lines([("A", "x", "2024-01-02", MAX_DOSAGE_UNITS)]))  # the bound itself: fine
    assert ok["dosage_units"].to_list() == [1e12]
    native = tmp_path / "in.csv"
    native.write_text("customer,family,date,dosage_units\nA,x,2024-01-02,100\nA,x,2024-01-03,inf\n"
                      "B,x,2024-01-03,Infinity\nB,x,2024-01-04,5\n")
    arcos = tmp_path / "arcos.csv"
    arcos.write_text("BUYER_DEA_NO,DRUG_NAME,DOSAGE_UNIT,TRANSACTION_DATE\n"
                     "AB1,OXY,1e308,01062012\nAB1,OXY,1e308,01072012\nAB1,OXY,3,01082012\n")
    for path, count, what in ((native, 2, "infinite dosage_units"),
                              (arcos, 2, "dosage_units above 1,000,000,000,000")):
        with pytest.raises(SomInputError) as e:
            read_orders(path)
        assert e.value.code == "som_invalid_units"
        assert e.value.message.startswith(f"{count} lines with {what}")
        out = tmp_path / "out.parquet"
        with pytest.raises(SomInputError):
            score_file(str(path), str(out))
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_missing_file_and_unknown_suffix(tmp_path) -> None:
    with pytest.raises(SomInputError) as e:
        read_orders(tmp_path / "nope.parquet")
    assert e.value.code == "som_file_not_found"
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SomInputError) as e:
        read_orders(tmp_path / "x.json")
    assert e.value.code == "som_unknown_format"


def test_empty_input_scores_to_an_empty_table() -> None:
    df = lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 1)).clear()
    out = score_orders(df)
    assert out.height == 0 and out.columns[-3:] == ["score", "flag", "reasons"]


def test_som_errors_survive_pickling_with_their_code() -> None:
    """Worker processes (local or Dask) send errors back pickled: code and message must survive."""
    import pickle

    from gateway.som.evaluate import EvaluationError
    from gateway.som.incremental import SomStateError
    from gateway.som.io import SomInputError
    from gateway.som.partition import PartitionError

    for cls in (SomInputError, PartitionError, SomStateError, EvaluationError):
        err = pickle.loads(pickle.dumps(cls("some_code", "what went wrong")))
        assert type(err) is cls and err.code == "some_code" and str(err) == "what went wrong"
