"""`gateway som ...` end to end through click: synth -> score -> evaluate -> diligence, load-history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.som.incremental import SomState


def _run(home: Path, *args: str, ok: bool = True):
    result = CliRunner().invoke(cli, ["--home", str(home), "som", *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes else "")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("som_cli")


@pytest.fixture(scope="module")
def synth_file(workdir) -> Path:
    out = workdir / "history.parquet"
    result = _run(workdir / "home", "synth", "--out", str(out), "--customers", "60", "--days", "500",
                  "--seed", "4")
    assert "lines, 60 customers, 500 days" in result.output
    assert "labelled:" in result.output and "size" in result.output
    return out


@pytest.fixture(scope="module")
def scored_file(workdir, synth_file) -> Path:
    out = workdir / "scored.parquet"
    result = _run(workdir / "home", "score", str(synth_file), "--out", str(out), "--partitions", "2")
    assert "lines scored" in result.output and "2 partitions" in result.output
    return out


def test_synth_writes_labelled_history(workdir, synth_file) -> None:
    frame = pl.read_parquet(synth_file)
    assert {"label", "anomaly"} <= set(frame.columns)
    assert frame["customer"].n_unique() == 60
    later = workdir / "later.csv"
    _run(workdir / "home", "synth", "--out", str(later), "--customers", "5", "--days", "30", "--start", "2026-03-01")
    assert pl.read_csv(later, try_parse_dates=True)["date"].min().isoformat() >= "2026-03-01"
    result = _run(workdir / "home", "synth", "--out", str(workdir / "x.xlsx"), ok=False)
    assert result.exit_code == 2 and json.loads(result.stderr)["error"]["code"] == "som_unknown_format"


def test_score_keeps_columns_and_shows_progress(workdir, synth_file, scored_file) -> None:
    history = pl.read_parquet(synth_file)
    scored = pl.read_parquet(scored_file)
    assert scored.columns == history.columns + ["score", "flag", "reasons"]
    assert scored.height == history.height
    # The plain whole-file path gives the same flags; the progress bar goes to stderr.
    out = workdir / "scored_plain.csv"
    result = _run(workdir / "home", "score", str(synth_file), "--out", str(out), "--partitions", "1")
    assert "score" in result.stderr and "100%" in result.stderr
    plain = pl.read_csv(out, schema_overrides={"order_id": pl.String})
    joined = scored.join(plain, on=["order_id", "line"], suffix="_csv")
    assert joined.height == scored.height and (joined["flag"] == joined["flag_csv"]).all()


def test_score_on_dask(workdir, synth_file, scored_file) -> None:
    """--engine dask --workers 2: a LocalCluster of two processes, the same scores."""
    pytest.importorskip("distributed")
    out = workdir / "scored_dask.parquet"
    result = _run(workdir / "home", "score", str(synth_file), "--out", str(out), "--engine", "dask",
                  "--workers", "2", "--partitions", "2", "--quiet")
    assert "dask" in result.output
    a = pl.read_parquet(scored_file)
    b = pl.read_parquet(out)
    joined = a.join(b, on=["order_id", "line"], suffix="_d")
    assert joined.height == a.height and (joined["flag"] == joined["flag_d"]).all()


def test_score_with_thresholds_file(workdir, synth_file) -> None:
    strict = workdir / "strict.toml"
    strict.write_text("[som]\nsize_ratio = 1000.0\nmonth_ratio = 1000.0\nmonthly_cap = 1e9\n")
    out = workdir / "strict.parquet"
    _run(workdir / "home", "score", str(synth_file), "--out", str(out), "--partitions", "1", "--config", str(strict),
         "--quiet")
    bad = workdir / "bad.toml"
    bad.write_text("[som]\nno_such_threshold = 3\n")
    result = _run(workdir / "home", "score", str(synth_file), "--out", str(workdir / "x.parquet"),
                  "--config", str(bad), ok=False)
    assert result.exit_code == 2
    assert json.loads(result.stderr)["error"]["code"] == "som_config_invalid"
    assert not (workdir / "x.parquet").exists()


def test_evaluate_table_and_json(workdir, scored_file) -> None:
    table = _run(workdir / "home", "evaluate", str(scored_file)).output
    assert "precision" in table and "ROC AUC" in table and "avg12x3" in table and "size" in table
    data = json.loads(_run(workdir / "home", "evaluate", str(scored_file), "--json", "--no-rules").output)
    assert [r["method"] for r in data["results"]] == ["scorer"]
    overall = data["results"][0]["overall"]
    assert overall["positives"] == int(pl.read_parquet(scored_file)["label"].sum())
    assert 0.5 < overall["roc_auc"] <= 1.0


def test_arcos_history_scores_in_its_shape_and_evaluates_like_the_native(workdir, synth_file) -> None:
    """An ARCOS file (tab-separated, as the public releases are) scored by the command keeps its
    own columns, and `som evaluate` (rule sets included) reads the result."""
    native = pl.read_parquet(synth_file)
    arcos = native.select(
        BUYER_DEA_NO="customer", BUYER_BUS_ACT="customer_type", BUYER_STATE="state",
        DRUG_NAME="family", NDC_NO="ndc", DOSAGE_UNIT="dosage_units",
        TRANSACTION_DATE=pl.col("date").dt.strftime("%m%d%Y"), TRANSACTION_ID="order_id",
        label="label", anomaly="anomaly")
    source = workdir / "arcos.tsv"
    arcos.write_csv(source, separator="\t")
    out = workdir / "arcos_scored.parquet"
    _run(workdir / "home", "score", str(source), "--out", str(out), "--partitions", "1")
    scored = pl.read_parquet(out)
    assert scored.columns == [*arcos.columns, "score", "flag", "reasons"]
    assert scored["TRANSACTION_DATE"].equals(arcos["TRANSACTION_DATE"])
    mine = json.loads(_run(workdir / "home", "evaluate", str(out), "--json").output)
    native_in = workdir / "native_all_controlled.parquet"  # ARCOS lists controlled lines only
    native.drop("controlled").write_parquet(native_in)
    native_out = workdir / "native_scored.parquet"
    _run(workdir / "home", "score", str(native_in), "--out", str(native_out), "--partitions", "1")
    theirs = json.loads(_run(workdir / "home", "evaluate", str(native_out), "--json").output)
    assert [r["method"] for r in mine["results"]] == [r["method"] for r in theirs["results"]]
    assert [(r["method"], r["overall"]) for r in mine["results"]] == [
        (r["method"], r["overall"]) for r in theirs["results"]]


def test_evaluate_without_labels_is_a_coded_error(workdir, scored_file) -> None:
    unlabelled = workdir / "unlabelled.parquet"
    pl.read_parquet(scored_file).drop("label", "anomaly").write_parquet(unlabelled)
    result = _run(workdir / "home", "evaluate", str(unlabelled), ok=False)
    assert result.exit_code == 2
    assert json.loads(result.stderr)["error"]["code"] == "som_no_labels"


def test_diligence_page_for_a_flagged_line(workdir, scored_file) -> None:
    flagged = pl.read_parquet(scored_file).filter("flag").row(0, named=True)
    page = workdir / "page.html"
    _run(workdir / "home", "diligence", str(scored_file), "--order", flagged["order_id"], "--line",
         str(flagged["line"]), "--out", str(page))
    text = page.read_text()
    assert flagged["order_id"] in text and "<svg" in text
    assert f"{flagged['dosage_units']:,.0f}" in text
    result = _run(workdir / "home", "diligence", str(scored_file), "--order", "NOPE", "--line", "1",
                  "--out", str(workdir / "none.html"), ok=False)
    assert result.exit_code == 2 and json.loads(result.stderr)["error"]["code"] == "som_line_not_found"
    assert not (workdir / "none.html").exists()


def test_load_history_seeds_the_state(workdir) -> None:
    home = workdir / "home"
    small = workdir / "small.csv"
    _run(home, "synth", "--out", str(small), "--customers", "12", "--days", "200", "--seed", "9")
    result = _run(home, "load-history", str(small))
    state_file = home / "som" / "state.bin"
    assert state_file.exists() and str(state_file) in result.output
    state = SomState.load(state_file)
    history = pl.read_csv(small)
    assert len(state.customers) == history["customer"].n_unique()
    assert len(state.groups) == history.select("customer", "family").n_unique()


def test_load_history_takes_a_customers_class_from_its_earliest_line(workdir) -> None:
    """As line-by-line loading in date order does, whatever the order of the file."""
    home = workdir / "home_cells"
    history = workdir / "unordered.csv"
    history.write_text("customer,customer_type,state,family,date,dosage_units\n"
                       "AB1234563,CHAIN PHARMACY,OH,oxycodone,2024-05-02,100\n"
                       "AB1234563,RETAIL PHARMACY,WV,oxycodone,2024-04-01,100\n")
    _run(home, "load-history", str(history), "--quiet")
    assert SomState.load(home / "som" / "state.bin").cells["AB1234563"] == ("RETAIL PHARMACY", "WV")


def test_module_entry_point(workdir, synth_file) -> None:
    """The installed command line, as a user runs it."""
    out = workdir / "sub.parquet"
    proc = subprocess.run([sys.executable, "-m", "gateway", "--home", str(workdir / "home"), "som", "score",
                           str(synth_file), "--out", str(out), "--partitions", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(out).height == pl.read_parquet(synth_file).height


def test_loaded_state_scores_the_next_lines_as_batch_does(workdir) -> None:
    """The seeded state continues the history: new lines score as batch scoring of the whole."""
    import datetime as dt

    from gateway.som.io import read_orders
    from gateway.som.peers import peer_reference
    from gateway.som.score import score_orders
    from gateway.som.synth import synthesize

    home = workdir / "home_next"
    full = synthesize(customers=25, days=300, seed=13)
    cut = dt.date(2024, 9, 1)
    past = full.filter(pl.col("date") < cut)
    past_file = workdir / "past.parquet"
    past.write_parquet(past_file)
    _run(home, "load-history", str(past_file), "--quiet")
    state = SomState.load(home / "som" / "state.bin")
    batch = score_orders(full, peers=peer_reference(read_orders(past)))
    new = batch.filter(pl.col("date") >= cut).head(400)
    for row in new.iter_rows(named=True):
        got = state.update(row)
        assert got.score == pytest.approx(row["score"], rel=1e-9, abs=1e-9), row
        assert got.flag == row["flag"]
