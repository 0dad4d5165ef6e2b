"""Scratch left by a run killed outright (SIGKILL, the out-of-memory killer) is removed by the next
run writing the same output; a live run's scratch never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from gateway.som import scratch
from gateway.som.io import atomic_output
from gateway.som.synth import synthesize

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# A process that makes a scratch entry of TARGET, says so, and waits to be killed.
HOLDER = """
import sys, time
from gateway.som import scratch
with scratch.{kind}(sys.argv[1]) as path:
    print(path, flush=True)
    time.sleep(600)
"""


def _holder(kind: str, target: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(kind=kind), str(target)],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline().strip()
    assert line, "the holder made nothing"
    return proc, Path(line)


def _killed(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.mark.parametrize("kind", ["held_file", "held_dir"])
def test_a_killed_run_s_scratch_is_swept_and_a_live_run_s_is_not(tmp_path, kind) -> None:
    target = tmp_path / "scored.parquet"
    dead, dead_path = _holder(kind, target)
    _killed(dead)  # SIGKILL: no finally ran
    assert dead_path.exists()
    live, live_path = _holder(kind, target)  # making its own entry, it sweeps the dead run's
    try:
        assert not dead_path.exists()
        assert scratch.sweep(target) == []
        assert live_path.exists()  # its run still holds it
    finally:
        _killed(live)
    assert scratch.sweep(target) == [live_path]
    assert os.listdir(tmp_path) == []


def test_sweep_leaves_other_names_alone(tmp_path) -> None:
    target = tmp_path / "scored.parquet"
    hexa = "0123456789abcdef" * 2
    keep = [
        f".other.parquet.{hexa}.tmp",  # another output's
        f".scored.parquet.{hexa}.new",  # provisional: its run may not have locked it yet
        f".scored.parquet.parts-{hexa}.new",
        ".scored.parquet.parts-notours",
        "scored.parquet",
    ]
    for name in keep:
        (tmp_path / name).mkdir() if "parts" in name else (tmp_path / name).write_text("x")
    gone = [tmp_path / f".scored.parquet.{hexa}.tmp", tmp_path / f".scored.parquet.parts-{hexa}"]
    gone[0].write_text("left by a killed run")
    gone[1].mkdir()
    (gone[1] / "input").mkdir()
    (gone[1] / "input" / "part-0.parquet").write_bytes(b"x" * 1000)
    assert sorted(scratch.sweep(target)) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_atomic_output_sweeps_a_killed_writer_s_temporary_file(tmp_path) -> None:
    target = tmp_path / "state.bin"
    dead, dead_path = _holder("held_file", target)
    _killed(dead)
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_held_entries_are_removed_when_the_block_fails(tmp_path) -> None:
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with scratch.held_dir(target) as work:
            (work / "part").write_text("x")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with scratch.held_file(target) as tmp:
            tmp.write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_the_next_score_removes_the_scratch_of_a_run_killed_mid_way(tmp_path) -> None:
    """The real case: `som score --partitions` killed with SIGKILL while it scores (as the
    out-of-memory killer would) leaves its split input and scored parts; the next run over the
    same output removes them, and its output is whole."""
    source = tmp_path / "history.parquet"
    synthesize(customers=300, days=400, seed=3).write_parquet(source)
    out = tmp_path / "scored.parquet"
    args = [sys.executable, "-m", "gateway", "--home", str(tmp_path / "home"), "som", "score",
            str(source), "--out", str(out), "--partitions", "3", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 120
    left = []
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            left = [p for p in tmp_path.iterdir() if ".parts-" in p.name and not p.name.endswith(".new")]
            if left and (left[0] / "scored").exists():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert left and left[0].exists(), "SIGKILL left no scratch: nothing to sweep"
    assert not out.exists()

    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not left[0].exists()
    assert f"removed {left[0]}, left by a run that was killed" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["history.parquet", "scored.parquet"]
    assert pl.read_parquet(out).height == pl.read_parquet(source).height
