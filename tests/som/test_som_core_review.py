"""`gateway som score` fed the files a distributor's systems export: spreadsheet CSVs (semicolons,
thousands separators, blank lines at the end), returns, and the same input scored with any number of
partitions or workers. Each case runs the real command in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from gateway.som.synth import synthesize

REPO = Path(__file__).resolve().parents[2]


def _score(tmp_path: Path, source: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(tmp_path / "home"), "som", "score",
                           str(source), "--out", str(out), "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _error(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    return json.loads(run.stderr.strip().splitlines()[-1])["error"]


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)


@pytest.fixture(scope="module")
def history() -> pl.DataFrame:
    return synthesize(customers=20, days=200, seed=7).drop("label", "anomaly", "anomaly_detail")


def _verdicts(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, infer_schema=False).select("order_id", "line", "score", "flag", "reasons")


def test_a_semicolon_csv_with_quoted_thousands_is_read_like_the_plain_file(tmp_path, history) -> None:
    """What a spreadsheet writes where the comma is the decimal mark (`;` between cells) and what
    a number format writes ("1,200"): the same orders as the plain file, scored alike."""
    plain, sheet = tmp_path / "plain.csv", tmp_path / "sheet.csv"
    history.write_csv(plain)
    assert history["dosage_units"].max() >= 1000  # some cells do get a separator
    history.with_columns(pl.col("dosage_units").map_elements(lambda u: f"{u:,}", return_dtype=pl.String)
                         ).write_csv(sheet, separator=";", quote_style="always")
    _ok(_score(tmp_path, plain, tmp_path / "plain.out.csv"))
    _ok(_score(tmp_path, sheet, tmp_path / "sheet.out.csv"))
    assert _verdicts(tmp_path / "sheet.out.csv").equals(_verdicts(tmp_path / "plain.out.csv"))
    kept = pl.read_csv(tmp_path / "sheet.out.csv", infer_schema=False)["dosage_units"]
    assert kept.str.contains(",").any()  # the input's cells as written


def test_a_decimal_comma_is_refused_not_guessed(tmp_path, history) -> None:
    source = tmp_path / "in.csv"
    history.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("12,5"))
                         .otherwise(pl.col("dosage_units").cast(pl.String)).alias("dosage_units")
                         ).write_csv(source, separator=";")
    error = _error(_score(tmp_path, source, tmp_path / "out.csv"))
    assert error["code"] == "som_invalid_units" and "'12,5'" in error["message"]
    assert "12.5" in error["message"]  # says how to write it
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_blank_lines_a_spreadsheet_leaves_are_no_order_lines(tmp_path, history, partitions) -> None:
    """Blank lines at the end (and a line of separators only), with a BOM and CRLF line ends:
    the file's orders, not lines refused for want of a date."""
    plain, sheet = tmp_path / "plain.csv", tmp_path / "sheet.csv"
    history.write_csv(plain)
    text = plain.read_text().replace("\n", "\r\n")
    blank = "," * (history.width - 1)
    sheet.write_bytes(("\ufeff" + text + "\r\n" + blank + "\r\n\r\n").encode())
    _ok(_score(tmp_path, plain, tmp_path / "plain.out.csv", "--partitions", partitions))
    _ok(_score(tmp_path, sheet, tmp_path / "sheet.out.csv", "--partitions", partitions))
    assert _verdicts(tmp_path / "sheet.out.csv").equals(_verdicts(tmp_path / "plain.out.csv"))


def test_a_header_and_blank_lines_only_is_an_empty_input(tmp_path, history) -> None:
    source = tmp_path / "in.csv"
    source.write_text(",".join(history.columns) + "\n\n\n")
    assert _error(_score(tmp_path, source, tmp_path / "out.csv"))["code"] == "som_empty_input"


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_a_return_is_refused_and_named(tmp_path, history, partitions) -> None:
    """A return (negative units) is not an order received (21 CFR 1301.74(b)): the file is refused
    with the line to look at and why, and an existing output stays as it was."""
    source, out = tmp_path / "in.csv", tmp_path / "out.csv"
    row = history.row(5, named=True)
    history.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(-120).otherwise(pl.col("dosage_units"))
                         .alias("dosage_units")).write_csv(source)
    out.write_text("an earlier run's output\n")
    error = _error(_score(tmp_path, source, out, "--partitions", partitions))
    assert error["code"] == "som_invalid_units"
    assert row["customer"] in error["message"] and "-120" in error["message"]
    assert "return" in error["message"]
    assert out.read_text() == "an earlier run's output\n"


def test_the_output_file_does_not_depend_on_partitions_or_workers(tmp_path) -> None:
    """The same input makes the same bytes, in input order, with 1 or 3 partitions, on 1 or 2
    workers; enough lines for several Parquet row groups."""
    source = tmp_path / "in.parquet"
    frame = synthesize(customers=400, days=400, seed=3)
    assert frame.height > 140_000
    frame.write_parquet(source)
    digests = {}
    for name, args in {"whole": ["--partitions", "1"], "three": ["--partitions", "3"],
                       "workers": ["--workers", "2"]}.items():
        out = tmp_path / f"{name}.parquet"
        _ok(_score(tmp_path, source, out, *args))
        digests[name] = hashlib.sha256(out.read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
    got = pl.read_parquet(tmp_path / "whole.parquet")
    assert got.select(frame.columns).equals(frame)


@pytest.mark.parametrize("partitions", ["1", "3"])
def test_native_columns_in_upper_case_are_read_and_given_back_as_written(tmp_path, history, partitions) -> None:
    """A database export names the columns CUSTOMER, DATE, DOSAGE_UNITS...: the native shape,
    scored as the lower-case file is, the output keeping the input's names."""
    plain, upper = tmp_path / "plain.csv", tmp_path / "upper.csv"
    history.write_csv(plain)
    history.rename({c: c.upper() for c in history.columns}).write_csv(upper)
    _ok(_score(tmp_path, plain, tmp_path / "plain.out.csv", "--partitions", partitions))
    _ok(_score(tmp_path, upper, tmp_path / "upper.out.csv", "--partitions", partitions))
    got = pl.read_csv(tmp_path / "upper.out.csv", infer_schema=False)
    assert got.columns == [c.upper() for c in history.columns] + ["score", "flag", "reasons"]
    want = pl.read_csv(tmp_path / "plain.out.csv", infer_schema=False)
    assert got.rename({c.upper(): c for c in history.columns}).equals(want)


def test_two_columns_differing_only_in_case_are_refused(tmp_path, history) -> None:
    source = tmp_path / "in.csv"
    history.rename({"date": "Date"}).with_columns(pl.col("Date").alias("DATE")).write_csv(source)
    error = _error(_score(tmp_path, source, tmp_path / "out.csv"))
    assert error["code"] == "som_duplicate_column" and "Date" in error["message"] and "DATE" in error["message"]


def test_spreadsheet_day_numbers_are_refused_with_what_they_are(tmp_path, history) -> None:
    """45292 is 2024-01-01 in a workbook counting from 1900 and 2028-01-02 in one counting from
    1904: refused, never guessed, and the message says what the numbers look like."""
    source = tmp_path / "in.csv"
    history.with_columns((pl.col("date") - pl.date(1899, 12, 30)).dt.total_days().alias("date")).write_csv(source)
    error = _error(_score(tmp_path, source, tmp_path / "out.csv"))
    assert error["code"] == "som_invalid_date" and "day number" in error["message"]


def test_a_read_only_mount_is_named_as_such(tmp_path, history) -> None:
    """An output directory on a read-only mount: som_output_unwritable saying so (not "permission
    denied", which sends the user to chmod), nothing written, the input untouched."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    source, ro = tmp_path / "in.csv", tmp_path / "ro"
    history.write_csv(source)
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        for out in (ro / "out.parquet", ro / "new" / "out.csv"):
            error = _error(_score(tmp_path, source, out))
            assert error["code"] == "som_output_unwritable" and "read-only file system" in error["message"]
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_utf16_export_is_refused_with_its_encoding(tmp_path, history) -> None:
    """A spreadsheet's "Unicode text" (UTF-16, tabs): som_unreadable naming the encoding, not
    som_unknown_format quoting garbled column names."""
    source = tmp_path / "in.txt"
    source.write_bytes(history.write_csv(separator="\t").encode("utf-16"))
    error = _error(_score(tmp_path, source, tmp_path / "out.csv"))
    assert error["code"] == "som_unreadable" and "UTF-16" in error["message"]


def test_evaluate_reads_a_scored_file_with_upper_case_native_columns(tmp_path) -> None:
    """The scorer reads CUSTOMER, DATE... and keeps them as written; evaluate's rule sets then
    found "no columns" in its output (som_unknown_format)."""
    labelled = synthesize(customers=20, days=200, seed=7)
    native = [c for c in labelled.columns if c not in ("label", "anomaly", "anomaly_detail")]
    plain, upper = tmp_path / "plain.parquet", tmp_path / "upper.parquet"
    labelled.write_parquet(plain)
    labelled.rename({c: c.upper() for c in native}).write_parquet(upper)
    reports = []
    for source in (plain, upper):
        out = tmp_path / f"{source.stem}.scored.parquet"
        _ok(_score(tmp_path, source, out))
        run = subprocess.run([sys.executable, "-m", "gateway", "--home", str(tmp_path / "home"), "som",
                              "evaluate", str(out), "--json"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        _ok(run)
        reports.append(json.loads(run.stdout))
    assert reports[0] == reports[1]
