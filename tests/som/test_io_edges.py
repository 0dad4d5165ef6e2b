"""Input files the scorer must refuse with a code, or take without changing what they say."""

from __future__ import annotations

import datetime as dt
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import polars as pl
import pytest

from gateway.som.io import SomInputError, atomic_output, read_orders
from gateway.som.score import score_file

from .conftest import lines, monthly


def _history() -> pl.DataFrame:
    return lines(monthly("AB1234563", "oxycodone", 1000, "2024-01", 12)
                 + [("AB1234563", "oxycodone", "2025-01-15", 4000)])


def _code(source) -> str:
    with pytest.raises(SomInputError) as e:
        read_orders(source)
    return e.value.code


def test_day_month_dates_are_refused_not_guessed(tmp_path) -> None:
    """01/05/2024 is 5 January to one writer and 1 May to another: a guess moved orders by
    months and changed flags without a word."""
    df = _history().with_columns(pl.col("date").dt.strftime("%m/%d/%Y"))
    df.write_csv(tmp_path / "us.csv")
    with pytest.raises(SomInputError) as e:
        read_orders(tmp_path / "us.csv")
    assert e.value.code == "som_ambiguous_date" and "YYYY-MM-DD" in str(e.value)
    assert "01/" in str(e.value)  # the message quotes a value
    df.with_columns(pl.lit("2024-02-30").alias("date")).write_csv(tmp_path / "bad.csv")
    assert _code(tmp_path / "bad.csv") == "som_invalid_date"


def test_iso_dates_with_a_time_of_day_are_taken() -> None:
    df = _history().with_columns(pl.col("date").dt.strftime("%Y-%m-%dT08:30:00"))
    assert read_orders(df)["date"].equals(_history()["date"])


@pytest.mark.parametrize("day", [dt.date(1, 1, 1), dt.date(1969, 12, 31), dt.date(2100, 1, 1)])
def test_dates_outside_any_order_history_are_refused(day: dt.date) -> None:
    df = _history()
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(day))
                         .otherwise(pl.col("date")).alias("date"))
    assert _code(df) == "som_invalid_date"


def test_csv_columns_are_not_typed_from_their_first_rows(tmp_path) -> None:
    """A fraction of a unit on line 1,500 was refused (the column had been typed whole numbers
    from the first 100 rows), and ZIP codes lost their leading zero in the output."""
    base = _history()
    df = pl.concat([base.with_columns(pl.lit(f"C{k:04d}").alias("customer")) for k in range(130)])
    df = df.with_columns(pl.col("dosage_units").cast(pl.Int64).cast(pl.String),
                         pl.lit("02134").alias("zip"))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 1500).then(pl.lit("2.5"))
                         .otherwise(pl.col("dosage_units")).alias("dosage_units"))
    df.write_csv(tmp_path / "in.csv")
    score_file(tmp_path / "in.csv", tmp_path / "out.csv")
    out = pl.read_csv(tmp_path / "out.csv", infer_schema=False)
    written = pl.read_csv(tmp_path / "in.csv", infer_schema=False)
    assert out.select(written.columns).equals(written)  # every input column as written
    assert out["zip"].unique().to_list() == ["02134"] and out["dosage_units"][1500] == "2.5"


def test_units_that_are_not_numbers_are_named(tmp_path) -> None:
    df = _history().with_columns(pl.col("dosage_units").cast(pl.String))
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("12 boxes"))
                         .otherwise(pl.col("dosage_units")).alias("dosage_units"))
    df.write_csv(tmp_path / "in.csv")
    with pytest.raises(SomInputError) as e:
        read_orders(tmp_path / "in.csv")
    assert e.value.code == "som_invalid_units" and "12 boxes" in str(e.value)


def test_controlled_flags_spelled_as_text(tmp_path) -> None:
    df = _history().with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("Y")).otherwise(pl.lit("n"))
        .alias("controlled"))
    assert read_orders(df)["controlled"].to_list() == [k % 2 == 0 for k in range(df.height)]
    with pytest.raises(SomInputError) as e:
        read_orders(df.with_columns(pl.lit("maybe").alias("controlled")))
    assert e.value.code == "som_invalid_value" and "maybe" in str(e.value)


def test_columns_named_twice_are_refused(tmp_path) -> None:
    df = _history()
    text = df.write_csv()
    header, rest = text.split("\n", 1)
    (tmp_path / "twice.csv").write_text(header + ",dosage_units\n"
                                        + "\n".join(r + ",-1" for r in rest.splitlines()) + "\n")
    assert _code(tmp_path / "twice.csv") == "som_duplicate_column"
    table = df.to_arrow()
    table = pa.Table.from_arrays([*table.columns, table.column("customer")],
                                 names=[*table.column_names, "customer"])
    pq.write_table(table, tmp_path / "twice.parquet")
    assert _code(tmp_path / "twice.parquet") == "som_duplicate_column"


def test_shape_is_native_when_the_native_columns_are_there_and_arcos_names_do_not_clash() -> None:
    df = _history().with_columns(pl.lit("XX").alias("BUYER_DEA_NO"))
    assert read_orders(df)["customer"].to_list() == _history()["customer"].to_list()
    arcos = pl.DataFrame({"BUYER_DEA_NO": ["AB1234563"], "DRUG_NAME": ["oxycodone"],
                          "TRANSACTION_DATE": ["01022024"], "DOSAGE_UNIT": [100.0]})
    assert read_orders(arcos)["date"].to_list() == [dt.date(2024, 1, 2)]
    for extra in ("customer", "date", "family"):  # renaming would overwrite the file's own
        assert _code(arcos.with_columns(pl.lit("2020-01-01").alias(extra))) == "som_column_conflict"


def test_files_that_are_not_what_their_name_says(tmp_path) -> None:
    (tmp_path / "garbage.parquet").write_bytes(b"this is not parquet at all")
    assert _code(tmp_path / "garbage.parquet") == "som_unreadable"
    good = tmp_path / "good.parquet"
    _history().write_parquet(good)
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:200])
    assert _code(tmp_path / "cut.parquet") == "som_unreadable"
    (tmp_path / "empty.csv").write_bytes(b"")
    assert _code(tmp_path / "empty.csv") == "som_empty_input"
    (tmp_path / "header.csv").write_text("customer,family,date,dosage_units\n")
    assert _code(tmp_path / "header.csv") == "som_empty_input"
    _history().head(0).write_parquet(tmp_path / "none.parquet")
    assert _code(tmp_path / "none.parquet") == "som_empty_input"


def test_two_writers_of_one_output_each_leave_a_whole_file(tmp_path) -> None:
    """Each run writes its own temporary file: a fixed name let two runs interleave into a
    file that was neither's."""
    out = tmp_path / "o.txt"
    names: list[str] = []
    inside = threading.Barrier(2)

    def write(text: str) -> None:
        with atomic_output(out) as tmp:
            names.append(tmp.name)
            inside.wait()
            tmp.write_text(text * 1000)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2
    assert out.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["o.txt"]


def test_outputs_get_the_usual_file_mode(tmp_path) -> None:
    """The temporary file of a run is made private (0600); the output must not stay so."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "o.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    from gateway.som import io as som_io
    assert stat.S_IMODE((tmp_path / "o.txt").stat().st_mode) == 0o666 & ~som_io._UMASK


def test_spreadsheet_spellings_that_are_valid(tmp_path) -> None:
    """A line number written 1.0, flags written 1.0/0.0, trailing commas in every row (unnamed
    columns): valid files, not refused."""
    df = _history()
    got = read_orders(df.with_columns(pl.col("line").cast(pl.Float64).cast(pl.String)))
    assert got["line"].dtype == pl.Int64 and got["line"].to_list() == df["line"].to_list()
    with pytest.raises(SomInputError) as e:
        read_orders(df.with_columns(pl.lit("1.5").alias("line")))
    assert e.value.code == "som_invalid_value" and "1.5" in str(e.value)
    flags = read_orders(df.with_columns(
        (pl.int_range(pl.len()) % 2).cast(pl.Float64).alias("controlled")))["controlled"]
    assert flags.to_list() == [k % 2 == 1 for k in range(df.height)]
    text = df.write_csv()
    (tmp_path / "commas.csv").write_text("\n".join(r + ",," for r in text.splitlines()) + "\n")
    assert read_orders(tmp_path / "commas.csv").height == df.height


def test_dictionary_encoded_dates_and_units_are_read_as_their_text() -> None:
    df = _history()
    coded = df.with_columns(pl.col("date").dt.strftime("%Y-%m-%d").cast(pl.Categorical),
                            pl.col("dosage_units").cast(pl.String).cast(pl.Categorical))
    got = read_orders(coded)
    assert got["date"].equals(df["date"]) and got["dosage_units"].to_list() == df["dosage_units"].to_list()
    bad = coded.with_columns(pl.lit("lots").cast(pl.Categorical).alias("dosage_units"))
    assert _code(bad) == "som_invalid_units"


@pytest.mark.parametrize("units", [
    pl.Series("dosage_units", [dt.date(2024, 1, 2)]),  # was scored as 19,724 units (days since 1970)
    pl.Series("dosage_units", [dt.timedelta(days=3)]),  # was 259,200,000,000 (microseconds)
    pl.Series("dosage_units", [True]),  # was 1 unit
    pl.Series("dosage_units", [{"a": 1}]),  # was a traceback
], ids=["date", "duration", "boolean", "struct"])
def test_units_of_a_type_that_is_not_a_number_are_refused(tmp_path, units) -> None:
    frame = pl.DataFrame({"customer": ["AB1234563"], "family": ["oxycodone"],
                          "date": [dt.date(2024, 1, 2)]}).with_columns(units)
    path = tmp_path / "typed.parquet"
    frame.write_parquet(path)
    with pytest.raises(SomInputError) as e:
        read_orders(path)
    assert e.value.code == "som_invalid_units" and str(units.dtype) in e.value.message
    out = tmp_path / "out.parquet"
    with pytest.raises(SomInputError):
        score_file(str(path), str(out))
    assert not out.exists()


def test_a_line_number_with_a_fraction_is_refused_from_parquet_as_from_csv(tmp_path) -> None:
    frame = _history().with_columns(pl.col("line").cast(pl.Float64))
    assert read_orders(frame)["line"].to_list() == [1.0] * frame.height  # 1.0 is line 1
    with pytest.raises(SomInputError) as e:
        read_orders(frame.with_columns(pl.lit(1.5).alias("line")))
    assert e.value.code == "som_invalid_value" and "1.5" in e.value.message


def test_arcos_dates_typed_by_a_converter_are_read(tmp_path) -> None:
    """TRANSACTION_DATE as a date, a timestamp, or the float pandas makes of a column of
    MMDDYYYY numbers with a gap: all were refused as lines without a date."""
    base = pl.DataFrame({"BUYER_DEA_NO": ["AB1234563", "AB1234563"], "DRUG_NAME": ["OXYCODONE"] * 2,
                         "DOSAGE_UNIT": [100.0, 200.0]})
    want = [dt.date(2012, 1, 6), dt.date(2012, 12, 31)]
    for written in (pl.Series(want), pl.Series([dt.datetime(2012, 1, 6, 10), dt.datetime(2012, 12, 31)]),
                    pl.Series([1062012.0, 12312012.0]), pl.Series([" 1062012", "12312012 "])):
        path = tmp_path / "arcos.parquet"
        base.with_columns(written.alias("TRANSACTION_DATE")).write_parquet(path)
        assert read_orders(path)["date"].to_list() == want, written.dtype
    path = tmp_path / "fraction.parquet"
    base.with_columns(pl.Series("TRANSACTION_DATE", [1062012.5, 12312012.0])).write_parquet(path)
    assert _code(path) == "som_invalid_date"


def test_an_arcos_date_that_is_no_date_is_quoted(tmp_path) -> None:
    path = tmp_path / "arcos.csv"
    path.write_text("BUYER_DEA_NO,DRUG_NAME,DOSAGE_UNIT,TRANSACTION_DATE\n"
                    "AB1234563,OXY,100,01062012\nAB1234563,OXY,100,02302024\n")
    with pytest.raises(SomInputError) as e:
        read_orders(path)
    assert e.value.code == "som_invalid_date"
    assert "'02302024'" in e.value.message and "MMDDYYYY" in e.value.message


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_scored_file_scored_again_gets_this_runs_verdicts(tmp_path, suffix) -> None:
    """The output's score, flag and reasons were the input's own when the input had them (a
    scored file scored again with other thresholds): the command counted the new flags and
    the file held the old ones."""
    from gateway.som.config import SomConfig

    source = tmp_path / f"in{suffix}"
    first = tmp_path / f"scored{suffix}"
    _history().write_parquet(source) if suffix == ".parquet" else _history().write_csv(source)
    assert score_file(str(source), str(first)) == 1
    again = tmp_path / f"again{suffix}"
    lax = SomConfig.from_dict({"size_ratio": 1e6, "size_over_max6": 1e6, "control_z": 1e6,
                               "month_ratio": 1e6, "peer_z": 1e6, "peer_month_z": 1e6,
                               "monthly_cap": 1e9})
    assert score_file(str(first), str(again), lax) == 0
    read = pl.read_parquet if suffix == ".parquet" else lambda p: pl.read_csv(p, infer_schema=False)
    out = read(again)
    assert out.columns == read(first).columns  # one of each, where they were
    assert out["flag"].cast(pl.String).to_list() == ["false"] * out.height
    assert out["reasons"].fill_null("").to_list() == [""] * out.height
