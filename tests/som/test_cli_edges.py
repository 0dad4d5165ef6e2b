"""`gateway som score|synth|evaluate` on bad input and failing outputs: a coded error (exit 2,
`{"error": {"code": ...}}` on stderr), the input untouched and nothing half-written left behind."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.som.synth import synthesize

REPO = Path(__file__).resolve().parents[2]

# The three ways a file is scored: all in memory, by partitions in process, on worker processes.
PATHS = {"plain": ["--partitions", "1"], "partitions": ["--partitions", "3"],
         "workers": ["--partitions", "2", "--workers", "2"]}


def _som(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), "som", *args], catch_exceptions=False)


def _code(result) -> str:
    """The code of a coded error; fails on anything else (a traceback, a success)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    return json.loads(result.stderr.strip().splitlines()[-1])["error"]["code"]


def _listing(directory: Path) -> list[str]:
    """What a directory holds (the gateway home the commands are given aside)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "home")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gateway(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def history() -> pl.DataFrame:
    return synthesize(customers=20, days=150, seed=5)


@pytest.fixture()
def source(tmp_path, history) -> Path:
    path = tmp_path / "in" / "history.parquet"
    path.parent.mkdir()
    history.write_parquet(path)
    return path


# 1. The output is the input --------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
@pytest.mark.parametrize("how", list(PATHS))
def test_output_that_is_the_input_is_refused(tmp_path, source, spelling, how) -> None:
    out = {"same": source, "dotted": source.parent / "." / ".." / "in" / source.name,
           "symlink": source.parent / "link.parquet"}[spelling]
    if spelling == "symlink":
        out.symlink_to(source.name)
    before, files = _digest(source), _listing(source.parent)
    assert _code(_som(tmp_path / "home", "score", str(source), "--out", str(out), "--quiet",
                      *PATHS[how])) == "som_output_is_input"
    assert _digest(source) == before and _listing(source.parent) == files
    assert not out.is_symlink() or os.readlink(out) == source.name


# 2. SIGTERM -------------------------------------------------------------------------------------

def _terminate_when(directory: Path, ready, *args: str) -> tuple[int, str]:
    """Run `som score` in a subprocess, send it SIGTERM as soon as `ready(names in directory)`;
    its exit status and stderr."""
    proc = _gateway("--home", str(directory.parent / "home"), "som", "score", *args, "--quiet")
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(os.listdir(directory)):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Big enough that scoring and writing take a noticeable time (about 500,000 lines)."""
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    synthesize(customers=800, days=730, seed=2).write_parquet(path)
    return path


@pytest.mark.parametrize("how", ["plain", "partitions", "workers"])
def test_sigterm_leaves_nothing_behind(tmp_path, big_source, how) -> None:
    work = tmp_path / "run"
    work.mkdir()
    source = work / "big.parquet"
    shutil.copyfile(big_source, source)
    if how == "plain":
        # Killed while the output is being written: its temporary file is there.
        out = work / "scored.csv"
        rc, err = _terminate_when(work, lambda names: any(n.endswith(".tmp") for n in names),
                                  str(source), "--out", str(out), *PATHS[how])
    else:
        # Killed while the partitions are scored: the scratch directory is there.
        out = work / "scored.parquet"
        rc, err = _terminate_when(work, lambda names: any(".parts-" in n for n in names),
                                  str(source), "--out", str(out), *PATHS[how])
    assert rc == 143, err
    assert "Traceback" not in err
    assert _listing(work) == ["big.parquet"]


def test_sigterm_handler_is_restored(tmp_path, source) -> None:
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "scored.parquet"
    assert _som(tmp_path / "home", "score", str(source), "--out", str(out), "--quiet").exit_code == 0
    assert _code(_som(tmp_path / "home", "score", str(source), "--out", str(source), "--quiet")) \
        == "som_output_is_input"
    assert signal.getsignal(signal.SIGTERM) is before


# 3. synth's output ------------------------------------------------------------------------------

def test_synth_creates_a_missing_directory(tmp_path) -> None:
    out = tmp_path / "new" / "sub" / "history.parquet"
    result = _som(tmp_path / "home", "synth", "--out", str(out), "--customers", "3", "--days", "40")
    assert result.exit_code == 0, result.stderr
    assert pl.read_parquet(out).height > 0
    assert _listing(out.parent) == ["history.parquet"]


def test_synth_under_a_file_is_a_coded_error(tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = _som(tmp_path / "home", "synth", "--out", str(blocker / "h.csv"), "--customers", "3",
                  "--days", "40")
    assert _code(result) == "som_output_unwritable"
    assert "not a directory" in result.stderr.lower()
    assert _listing(tmp_path) == ["afile"] and blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_synth_into_a_read_only_directory_is_a_coded_error(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _som(tmp_path / "home", "synth", "--out", str(locked / "h.parquet"), "--customers", "3",
                      "--days", "40")
        assert _code(result) == "som_output_unwritable"
        assert _listing(locked) == []
    finally:
        locked.chmod(0o700)


def _small_disk(limit: int):
    """For a subprocess: files may not grow past `limit` bytes (a full disk, as far as the writer
    can tell: the write fails with EFBIG)."""
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def test_synth_on_a_full_disk_keeps_the_previous_file(tmp_path) -> None:
    out = tmp_path / "history.csv"
    out.write_text("previous\n")
    proc = _gateway("--home", str(tmp_path / "home"), "som", "synth", "--out", str(out), "--customers", "50",
                    "--days", "300", preexec_fn=_small_disk(64_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert json.loads(err.strip().splitlines()[-1])["error"]["code"] == "som_output_unwritable"
    assert out.read_text() == "previous\n"
    assert _listing(tmp_path) == ["history.csv"]


# 4. score's output ------------------------------------------------------------------------------

@pytest.mark.parametrize("how", list(PATHS))
def test_score_under_a_file_is_refused_up_front(tmp_path, source, how) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = _som(tmp_path / "home", "score", str(source), "--out", str(blocker / "sub" / "o.parquet"),
                  "--quiet", *PATHS[how])
    assert _code(result) == "som_output_unwritable"
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("how", ["plain", "partitions"])
def test_nested_columns_to_csv_are_refused_up_front(tmp_path, source, history, how) -> None:
    nested = tmp_path / "in" / "nested.parquet"
    history.with_columns(tags=pl.concat_list("family", "state"),
                         extra=pl.struct("customer", "line")).write_parquet(nested)
    out = tmp_path / "new" / "scored.csv"
    result = _som(tmp_path / "home", "score", str(nested), "--out", str(out), "--quiet", *PATHS[how])
    assert _code(result) == "som_output_unsupported"
    assert "tags" in result.stderr and "extra" in result.stderr
    assert not out.parent.exists()
    # Parquet keeps them.
    out = tmp_path / "new" / "scored.parquet"
    result = _som(tmp_path / "home", "score", str(nested), "--out", str(out), "--quiet", *PATHS[how])
    assert result.exit_code == 0, result.stderr
    key = ["order_id", "line"]
    assert pl.read_parquet(out).select(*key, "tags", "extra").sort(key).equals(
        pl.read_parquet(nested).select(*key, "tags", "extra").sort(key))


@pytest.mark.parametrize("how", ["plain", "partitions"])
def test_full_disk_while_writing_is_a_coded_error(tmp_path, source, how) -> None:
    out = tmp_path / "scored.csv"
    out.write_text("previous\n")
    proc = _gateway("--home", str(tmp_path / "home"), "som", "score", str(source), "--out", str(out),
                    "--quiet", *PATHS[how], preexec_fn=_small_disk(64_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert json.loads(err.strip().splitlines()[-1])["error"]["code"] == "som_output_unwritable"
    assert out.read_text() == "previous\n"
    assert _listing(tmp_path) == ["in", "scored.csv"]


@pytest.mark.parametrize("how", list(PATHS))
def test_failed_run_leaves_no_new_directory(tmp_path, source, history, how) -> None:
    # Unreadable: found before anything is created.
    garbage = tmp_path / "in" / "garbage.parquet"
    garbage.write_bytes(os.urandom(3000))
    out = tmp_path / "new" / "deeper" / "scored.parquet"
    assert _code(_som(tmp_path / "home", "score", str(garbage), "--out", str(out), "--quiet",
                      *PATHS[how])) == "som_unreadable"
    assert not (tmp_path / "new").exists()
    # A bad value deep in the file: found while reading it all; the directories made go again.
    bad = tmp_path / "in" / "bad_units.parquet"
    history.with_columns(dosage_units=pl.when(pl.int_range(pl.len()) == history.height - 1)
                         .then(-5).otherwise("dosage_units")).write_parquet(bad)
    assert _code(_som(tmp_path / "home", "score", str(bad), "--out", str(out), "--quiet",
                      *PATHS[how])) == "som_invalid_units"
    assert not (tmp_path / "new").exists()
    assert _listing(tmp_path) == ["in"]


# 5./6. Unreadable and empty input ---------------------------------------------------------------

def _inputs(directory: Path, history: pl.DataFrame) -> dict[str, tuple[Path, str]]:
    directory.mkdir(exist_ok=True)
    whole = directory / "whole.parquet"
    history.write_parquet(whole)
    data = whole.read_bytes()
    cases = {
        "garbage.parquet": (os.urandom(5000), "som_unreadable"),
        "text.parquet": (b"customer,family\nA,B\n", "som_unreadable"),
        "truncated.parquet": (data[: len(data) // 2], "som_unreadable"),
        "zero_bytes.parquet": (b"", "som_empty_input"),
        "zero_bytes.csv": (b"", "som_empty_input"),
    }
    out = {}
    for name, (content, code) in cases.items():
        (directory / name).write_bytes(content)
        out[name] = (directory / name, code)
    history.head(0).write_parquet(directory / "no_rows.parquet")
    out["no_rows.parquet"] = (directory / "no_rows.parquet", "som_empty_input")
    (directory / "header_only.csv").write_text(",".join(history.columns) + "\n")
    out["header_only.csv"] = (directory / "header_only.csv", "som_empty_input")
    whole.unlink()
    return out


@pytest.mark.parametrize("how", [*PATHS, "default"])
def test_unreadable_and_empty_input_are_coded_errors(tmp_path, history, how) -> None:
    args = PATHS.get(how, [])
    for name, (path, code) in _inputs(tmp_path / "in", history).items():
        out = tmp_path / "out" / "scored.parquet"
        result = _som(tmp_path / "home", "score", str(path), "--out", str(out), "--quiet", *args)
        assert _code(result) == code, (name, result.stderr)
        assert not (tmp_path / "out").exists(), name
    assert _listing(tmp_path) == ["in"]


def test_evaluate_unreadable_and_empty_input_are_coded_errors(tmp_path, history) -> None:
    for name, (path, code) in _inputs(tmp_path / "in", history).items():
        assert _code(_som(tmp_path / "home", "evaluate", str(path))) == code, name


def test_default_partitions_on_bad_parquet_is_a_coded_error(tmp_path, history) -> None:
    from gateway.som.io import SomInputError
    from gateway.som.partition import default_partitions

    for name, (path, code) in _inputs(tmp_path / "in", history).items():
        if name.endswith(".csv") or code != "som_unreadable":
            continue
        with pytest.raises(SomInputError) as err:
            default_partitions(path)
        assert err.value.code == code


# 7. A column named like the partition key -------------------------------------------------------

def test_a_column_named_part_is_kept(tmp_path, history) -> None:
    source = tmp_path / "with_part.parquet"
    history.with_columns(_part=pl.format("p{}", pl.int_range(pl.len()))).write_parquet(source)
    outputs = {}
    for how in ("plain", "partitions"):
        out = tmp_path / f"{how}.parquet"
        assert _som(tmp_path / "home", "score", str(source), "--out", str(out), "--quiet",
                    *PATHS[how]).exit_code == 0
        outputs[how] = pl.read_parquet(out)
    assert outputs["partitions"].columns == outputs["plain"].columns
    j = outputs["plain"].join(outputs["partitions"], on=["order_id", "line"], suffix="_p")
    assert j.height == history.height and (j["_part"] == j["_part_p"]).all()


# 8. An unreachable Dask scheduler ---------------------------------------------------------------

def test_unreachable_dask_scheduler_is_a_coded_error(tmp_path, source, monkeypatch) -> None:
    pytest.importorskip("distributed")
    from gateway.som import partition

    monkeypatch.setattr(partition, "DASK_CONNECT_TIMEOUT", 1.0)
    started = time.monotonic()
    result = _som(tmp_path / "home", "score", str(source), "--out", str(tmp_path / "o.parquet"), "--quiet",
                  "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9", "--partitions", "2")
    assert _code(result) == "som_engine_unavailable"
    assert "127.0.0.1:9" in result.stderr
    assert time.monotonic() - started < 20
    assert _listing(tmp_path) == ["in"]


# 9. evaluate's yes/no columns -------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tmp_path_factory, history) -> Path:
    work = tmp_path_factory.mktemp("scored")
    source = work / "history.parquet"
    history.write_parquet(source)
    out = work / "scored.parquet"
    assert _som(work / "home", "score", str(source), "--out", str(out), "--quiet").exit_code == 0
    return out


@pytest.mark.parametrize("spelling", [("true", "false"), ("Yes", "no"), ("1", "0"), ("Y", "N")])
def test_evaluate_reads_text_labels(tmp_path, scored, spelling) -> None:
    reference = json.loads(_som(tmp_path / "home", "evaluate", str(scored), "--json").output)
    yes, no = spelling
    text = tmp_path / "text_labels.parquet"
    pl.read_parquet(scored).with_columns(label=pl.when("label").then(pl.lit(yes)).otherwise(pl.lit(no)),
                                         flag=pl.when("flag").then(pl.lit(yes)).otherwise(pl.lit(no))
                                         ).write_parquet(text)
    result = _som(tmp_path / "home", "evaluate", str(text), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.output) == reference


def test_evaluate_with_unknown_label_values_is_a_coded_error(tmp_path, scored) -> None:
    text = tmp_path / "odd_labels.parquet"
    pl.read_parquet(scored).with_columns(label=pl.when("label").then(pl.lit("maybe")).otherwise(pl.lit("no"))
                                         ).write_parquet(text)
    result = _som(tmp_path / "home", "evaluate", str(text))
    assert _code(result) == "som_invalid_value"
    assert "maybe" in result.stderr


# The error count of a partitioned run ------------------------------------------------------------

def test_partitioned_error_says_it_counts_one_partition(tmp_path, history) -> None:
    source = tmp_path / "no_dates.parquet"
    history.with_columns(date=pl.lit(None, pl.Date)).write_parquet(source)
    plain = _som(tmp_path / "home", "score", str(source), "--out", str(tmp_path / "a.parquet"), "--quiet",
                 *PATHS["plain"])
    assert _code(plain) == "som_invalid_date"
    assert f"{history.height} lines" in plain.stderr and "partition" not in plain.stderr
    parts = _som(tmp_path / "home", "score", str(source), "--out", str(tmp_path / "b.parquet"), "--quiet",
                 *PATHS["partitions"])
    assert _code(parts) == "som_invalid_date"
    assert "first failing partition" in json.loads(parts.stderr.strip().splitlines()[-1])["error"]["message"]


def test_diligence_page_never_replaces_the_scored_history(tmp_path, source) -> None:
    home = tmp_path / "home"
    scored = tmp_path / "scored.parquet"
    assert _som(home, "score", str(source), "--out", str(scored)).exit_code == 0
    hit = pl.read_parquet(scored).filter(pl.col("flag")).row(0, named=True)
    before = _digest(scored)
    args = ["diligence", str(scored), "--order", str(hit["order_id"]), "--line", str(hit["line"])]
    assert _code(_som(home, *args, "--out", str(scored))) == "som_output_is_input"
    assert _digest(scored) == before
    page = tmp_path / "pages" / "line.html"
    assert _som(home, *args, "--out", str(page)).exit_code == 0
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert _listing(page.parent) == ["line.html"]


def test_a_csv_comes_back_cell_for_cell_and_its_outputs_read_back(tmp_path, history) -> None:
    """Cells written `01`, `2000.0`, ` 150 `, `Y` or with a time of day came back reformatted
    (`1`, `2000`, `150`, `true`, the date alone); and the reformatted output, typed again from
    its first rows, could not be read by evaluate or diligence."""
    home = tmp_path / "home"
    n = history.height
    text = history.with_columns(
        pl.col("line").cast(pl.String).str.zfill(2),
        pl.col("date").dt.strftime("%Y-%m-%d") + pl.when(pl.int_range(n) % 3 == 0)
        .then(pl.lit(" 10:30:00")).otherwise(pl.lit("")),
        pl.when(pl.int_range(n) == n - 7).then(pl.lit(" 2.5 "))
        .otherwise(pl.col("dosage_units").cast(pl.Float64).cast(pl.String)).alias("dosage_units"),
        pl.when(pl.col("controlled")).then(pl.lit("Y")).otherwise(pl.lit("N")).alias("controlled"),
    )
    source = tmp_path / "in.csv"
    text.write_csv(source)
    written = pl.read_csv(source, infer_schema=False)
    for out in (tmp_path / "out.csv", tmp_path / "out.parquet"):
        for how in ("plain", "partitions"):
            assert _som(home, "score", str(source), "--out", str(out), *PATHS[how]).exit_code == 0
            got = (pl.read_csv(out, infer_schema=False) if out.suffix == ".csv"
                   else pl.read_parquet(out))
            key = ["order_id", "line"]
            assert got.select(written.columns).sort(key).equals(written.sort(key)), (out, how)
        assert _som(home, "evaluate", str(out)).exit_code == 0
        hit = pl.read_parquet(out) if out.suffix == ".parquet" else pl.read_csv(
            out, infer_schema=False)
        hit = hit.filter(pl.col("flag").cast(pl.String) == "true").row(0, named=True)
        page = tmp_path / f"{out.suffix[1:]}.html"
        result = _som(home, "diligence", str(out), "--order", hit["order_id"], "--line",
                      str(int(hit["line"])), "--out", str(page))
        assert result.exit_code == 0, result.output


# --config files that are not thresholds ----------------------------------------------------------

BAD_CONFIGS = {
    "not_a_table.toml": b"som = 5\n",
    "a_list.toml": b"som = [1, 2]\n",
    "infinite.toml": b"[som]\nsize_ratio = inf\n",
    "nan.toml": b"[som]\npeer_z = nan\n",
    "infinite_whole.toml": b"[som]\nmin_history_months = inf\n",  # int(inf): OverflowError
    "fraction.toml": b"[som]\nsustained_orders = 2.5\n",  # was cut to 2 without a word
    "latin1.toml": "[som]\n# r\u00e9glage\nsize_ratio = 3\n".encode("latin-1"),  # TOML is UTF-8
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["score", "load-history"])
def test_a_bad_config_file_is_a_coded_error(tmp_path, source, name, command) -> None:
    config = tmp_path / name
    config.write_bytes(BAD_CONFIGS[name])
    home = tmp_path / "home"
    out = tmp_path / "scored.parquet"
    args = ["--out", str(out), "--quiet"] if command == "score" else ["--quiet"]
    result = _som(home, command, str(source), "--config", str(config), *args)
    assert _code(result) == "som_config_invalid", result.stderr
    assert str(config) in result.stderr
    assert not out.exists() and not (home / "som").exists()


# load-history's state and evaluate's labels -------------------------------------------------------

def test_load_history_into_a_home_it_cannot_write_is_a_coded_error(tmp_path, source) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "som").write_text("x")  # where the state's directory should be
    result = _som(home, "load-history", str(source), "--quiet")
    assert _code(result) == "som_output_unwritable"
    assert (home / "som").read_text() == "x"
    (home / "som").unlink()
    (home / "som" / "state.bin").mkdir(parents=True)  # the state file's name taken by a directory
    assert _code(_som(home, "load-history", str(source), "--quiet")) == "som_output_unwritable"
    assert list((home / "som" / "state.bin").iterdir()) == []


def test_load_history_on_a_full_disk_keeps_the_previous_state(tmp_path, source) -> None:
    home = tmp_path / "home"
    state = home / "som" / "state.bin"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"previous")
    # A first run without the limit, so that Numba's cache of the kernels is written (a compiled
    # kernel it could not save would fail the run on its own).
    warm = _gateway("--home", str(tmp_path / "warm"), "som", "load-history", str(source), "--quiet")
    assert warm.wait(timeout=300) == 0
    proc = _gateway("--home", str(home), "som", "load-history", str(source), "--quiet",
                    preexec_fn=_small_disk(16_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    error = json.loads(err.strip().splitlines()[-1])["error"]
    assert error["code"] == "som_output_unwritable" and "cannot write the state" in error["message"]
    assert state.read_bytes() == b"previous"
    assert sorted(p.name for p in state.parent.iterdir()) == ["state.bin"]


@pytest.mark.parametrize("rules", [[], ["--no-rules"]])
def test_evaluate_of_a_history_without_labels_says_so(tmp_path, history, rules) -> None:
    """A file with none of the columns evaluate reads (no label, no score) has lines all the
    same: it is refused for its missing labels, not as an empty file."""
    unlabelled = tmp_path / "unlabelled.parquet"
    history.select("order_id", "line", "ndc").write_parquet(unlabelled)
    result = _som(tmp_path / "home", "evaluate", str(unlabelled), *rules)
    assert _code(result) == "som_no_labels", result.stderr


# Scored CSV files read back ---------------------------------------------------------------------

def test_diligence_page_of_a_scored_csv_says_what_the_parquet_page_says(tmp_path, source) -> None:
    """A scored CSV holds `flag` as the text `false`: its page called every line held."""
    home = tmp_path / "home"
    pages = {}
    for suffix in ("parquet", "csv"):
        scored = tmp_path / f"scored.{suffix}"
        assert _som(home, "score", str(source), "--out", str(scored), "--quiet").exit_code == 0
        quiet = pl.read_parquet(scored) if suffix == "parquet" else pl.read_csv(scored, infer_schema=False)
        quiet = quiet.filter(pl.col("flag").cast(pl.String) == "false").row(0, named=True)
        page = tmp_path / f"{suffix}.html"
        assert _som(home, "diligence", str(scored), "--order", quiet["order_id"], "--line",
                    str(quiet["line"]), "--out", str(page)).exit_code == 0
        pages[suffix] = page.read_text()
    assert pages["csv"] == pages["parquet"]
    assert "held as suspicious" not in pages["csv"] and "not flagged" in pages["csv"]


def test_diligence_of_a_line_without_units_is_a_coded_error(tmp_path, source) -> None:
    home = tmp_path / "home"
    scored = tmp_path / "scored.csv"
    assert _som(home, "score", str(source), "--out", str(scored), "--quiet").exit_code == 0
    text = pl.read_csv(scored, infer_schema=False)
    hit = text.row(0, named=True)
    first = (pl.col("order_id") == hit["order_id"]) & (pl.col("line") == hit["line"])
    for column, value, code in (("dosage_units", "", "som_invalid_units"),
                                ("dosage_units", "inf", "som_invalid_units"),
                                ("date", "05/01/2024", "som_ambiguous_date")):
        broken = tmp_path / "broken.csv"
        text.with_columns(pl.when(first).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)
                          ).write_csv(broken)
        page = tmp_path / "pages" / "line.html"
        result = _som(home, "diligence", str(broken), "--order", hit["order_id"], "--line", hit["line"],
                      "--out", str(page))
        assert _code(result) == code, column  # was a traceback
        assert not page.parent.exists()


def test_evaluate_refuses_scores_that_are_not_numbers(tmp_path, scored) -> None:
    """A scored CSV's `abc` score was read as a missing score: ROC AUC 0.000, no word said."""
    text = tmp_path / "scored.csv"
    table = pl.read_parquet(scored)
    table.with_columns(pl.col("score").cast(pl.String)).write_csv(text)
    reference = json.loads(_som(tmp_path / "home", "evaluate", str(scored), "--json").output)
    same = _som(tmp_path / "home", "evaluate", str(text), "--json")
    assert same.exit_code == 0 and json.loads(same.output) == reference
    table.with_columns(pl.when(pl.col("label")).then(pl.lit("abc"))
                       .otherwise(pl.col("score").cast(pl.String)).alias("score")).write_csv(text)
    result = _som(tmp_path / "home", "evaluate", str(text))
    assert _code(result) == "som_invalid_value" and "score" in result.stderr


@pytest.mark.parametrize("args, code", [
    (["--seed", "-1"], "som_bad_seed"),  # a NumPy traceback
    (["--start", "2099-06-01", "--days", "400"], "som_bad_dates"),  # lines the scorer refuses
    (["--start", "1969-12-01", "--days", "60"], "som_bad_dates"),
    (["--customers", "1000001", "--days", "1"], "som_bad_customers"),  # DEA numbers shared
])
def test_synth_parameters_that_give_no_usable_history(tmp_path, args, code) -> None:
    out = tmp_path / "new" / "history.parquet"
    result = _som(tmp_path / "home", "synth", "--out", str(out), "--customers", "5", *args)
    assert _code(result) == code
    assert _listing(tmp_path) == []
