"""Partitioned scoring in bounded memory: the split of the input and the merge of the scored parts
into input order hold a slice, not the file; and slices and batches change no byte of the output."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from gateway.som import partition
from gateway.som.partition import score_file
from tests.som.conftest import messy_history

# Runs in a fresh process: how much the peak grew while splitting a
# 1M-line Parquet file, or while merging four scored parts of the same lines into input order.
# Unbounded, each held about twice the lines (290 MB and 337 MB for 143 MB of lines).
PROBE = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    from gateway.som import partition

    def peak():  # kB; the import's own peak (Numba compiling, say) is cleared first
        with open("/proc/self/status") as fh:
            return int(re.search(r"VmHWM:\\s+(\\d+)", fh.read()).group(1))

    tmp, step = Path(sys.argv[1]), sys.argv[2]
    partition.SPLIT_LINES, partition.MERGE_LINES = 100_000, 65_536
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak RSS to the current one (Linux)
    before = peak()
    if step == "split":
        partition.split_input(tmp / "in.parquet", tmp / "split", 4, "_input_row")
    else:
        parts = [str(tmp / f"part-{i}.parquet") for i in range(4)]
        partition._concat_parts(parts, tmp / "out.parquet", "_input_row")
    print((peak() - before) * 1024)
""")


def test_split_and_merge_hold_a_slice_not_the_file(tmp_path) -> None:
    n = 1_000_000
    lines = pl.DataFrame({
        "customer": pl.Series(np.arange(n) % 4000).cast(pl.String).str.zfill(9),
        "family": "oxycodone", "date": dt.date(2024, 1, 1), "dosage_units": 10.0,
        "note": pl.Series(np.arange(n)).cast(pl.String).str.zfill(120)})
    lines.write_parquet(tmp_path / "in.parquet", row_group_size=100_000)
    rows = lines.with_row_index("_input_row")
    for i in range(4):  # scored parts as _score_task writes them: in input order, a batch a row group
        rows.filter(pl.col("_input_row") % 4 == i).write_parquet(
            tmp_path / f"part-{i}.parquet", row_group_size=65_536 // 4)
    size = lines.estimated_size()  # 143 MB
    grew = {}
    for step in ("split", "merge"):
        done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), step], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        grew[step] = int(done.stdout) / size
    assert pl.scan_parquet(tmp_path / "out.parquet").select(pl.len()).collect().item() == n
    assert grew["split"] < 1.0 and grew["merge"] < 1.5, grew


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("review2") / "history.parquet"
    messy_history(customers=24, days=240, seed=5).write_parquet(path, row_group_size=500)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_slices_and_merge_batches_change_no_byte(tmp_path, source, suffix, monkeypatch) -> None:
    """A customer's lines in several slices of the split and several merge batches (and more
    partitions than customers): the same bytes as the whole-file run."""
    whole = tmp_path / f"whole{suffix}"
    score_file(source, whole, partitions=1)
    monkeypatch.setattr(partition, "SPLIT_LINES", 700)
    monkeypatch.setattr(partition, "MERGE_LINES", 600)
    monkeypatch.setattr(partition, "MIN_MERGE_BATCH", 16)
    for count in (3, 40):
        out = tmp_path / f"p{count}{suffix}"
        run = score_file(source, out, partitions=count)
        assert run.lines == pl.scan_parquet(source).select(pl.len()).collect().item()
        assert out.read_bytes() == whole.read_bytes(), count
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [whole.name] + [f"p{c}{suffix}" for c in (3, 40) if c <= count])


def test_progress_into_a_log_is_a_few_redraws_not_one_a_step(tmp_path, source) -> None:
    """Without a terminal (a log file, CI), the bar was redrawn at every step: 2 x partitions + 3
    carriage-return lines of text. Now the first and the last, and one every 30 s between."""
    from click.testing import CliRunner

    from gateway.cli import cli

    out = tmp_path / "scored.parquet"
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "som", "score", str(source),
                                      "--out", str(out), "--partitions", "30"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "30 partitions" in result.output
    draws = [d for d in result.stderr.replace("\n", "\r").split("\r") if d.strip()]
    assert 1 <= len(draws) <= 4, draws
    assert "score:   0%" in draws[0] and "100%" in draws[-1] and "63/63" in draws[-1]
