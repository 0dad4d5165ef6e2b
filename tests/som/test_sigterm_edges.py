"""SIGTERM at the worst moment: just after a command made its scratch directory or the temporary
file of its output (strace delivers the signal as that very system call returns). The name was
known only once mkdtemp/mkstemp returned, too late for the cleanup, and the directory or file
stayed behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.som.synth import synthesize

REPO = Path(__file__).resolve().parents[2]
STRACE = shutil.which("strace")

pytestmark = pytest.mark.skipif(STRACE is None, reason="needs strace")


def _strace(trace: Path, syscall: str, args: list[str], inject: str | None = None):
    cmd = [STRACE, "-f", "-qq", "-e", f"trace={syscall}", "-o", str(trace)]
    if inject:
        cmd += ["-e", inject]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*cmd, sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _sigterm_after(tmp_path: Path, syscall: str, target: str, args: list[str], reset) -> subprocess.CompletedProcess:
    """Run `gateway ARGS` with a SIGTERM delivered on the `syscall` whose traced line matches
    `target`: a first run finds which call of its thread that is, the second gets the signal
    there. `reset()` puts the files back as they were before the first run."""
    for _ in range(5):
        trace = tmp_path / "trace.txt"
        _strace(trace, syscall, args)
        reset()
        lines = trace.read_text().splitlines()
        hit = next(i for i, line in enumerate(lines) if re.search(target, line))
        tid = lines[hit].split()[0]
        mine = [i for i, line in enumerate(lines) if line.startswith(tid + " ") and f"{syscall}(" in line]
        when = mine.index(hit) + 1
        proc = _strace(trace, syscall, args, f"inject={syscall}:signal=TERM:when={when}")
        lines = trace.read_text().splitlines()
        trace.unlink()
        term = next((i for i, line in enumerate(lines) if "--- SIGTERM" in line), None)
        if term is not None:
            before = [line for line in lines[:term] if line.startswith(lines[term].split()[0] + " ")]
            if before and re.search(target, before[-1]):
                return proc
        reset()  # the other threads' calls moved the count: again
    pytest.skip("the signal could not be placed on the call")


@pytest.fixture()
def source(tmp_path) -> Path:
    path = tmp_path / "run" / "history.parquet"
    path.parent.mkdir()
    synthesize(customers=20, days=150, seed=5).write_parquet(path)
    return path


def _clear(directory: Path, keep: str):
    def reset() -> None:
        for p in directory.iterdir():
            if p.name != keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return reset


# `som score` made each of these, then the signal came: (its system call, what the call names,
# where the output goes, the options); each was left behind. `new` is the missing directory of
# `--out new/scored.parquet`, removed again when the run fails.
SCORE_MOMENTS = {
    "scratch directory": ("mkdir", r'mkdir\("[^"]*/\.scored\.parquet\.parts-', "scored.parquet", ["--partitions", "2"]),
    "output's temporary file": ("openat", r'"[^"]*/\.scored\.parquet\.[^"/]+\.new", [^)]*O_EXCL', "scored.parquet",
                                ["--partitions", "2"]),
    "missing output directory": ("mkdir", r'mkdir\("[^"]*/run/new"', "new/scored.parquet", []),
    "writability probe": ("openat", r'"[^"]*/\.scored\.parquet\.[^"/]+\.probe", [^)]*O_EXCL', "scored.parquet", []),
}


@pytest.mark.parametrize("moment", list(SCORE_MOMENTS))
def test_sigterm_as_the_score_command_makes_a_file_or_directory(tmp_path, source, moment) -> None:
    syscall, target, out, options = SCORE_MOMENTS[moment]
    args = ["--home", str(tmp_path / "home"), "som", "score", str(source), "--out", str(source.parent / out),
            *options, "--quiet"]
    proc = _sigterm_after(tmp_path, syscall, target, args, _clear(source.parent, source.name))
    assert proc.returncode == 143, proc.stderr
    assert os.listdir(source.parent) == [source.name]


def test_sigterm_as_the_state_s_temporary_file_is_made(tmp_path, source) -> None:
    home = tmp_path / "home"
    state = home / "som" / "state.bin"
    state.parent.mkdir(parents=True)

    def reset() -> None:
        _clear(state.parent, "")()
        state.write_bytes(b"previous")

    reset()
    args = ["--home", str(home), "som", "load-history", str(source), "--quiet"]
    proc = _sigterm_after(tmp_path, "openat", r'"[^"]*/\.state\.bin\.[^"/]+\.new", [^)]*O_EXCL', args, reset)
    assert proc.returncode == 143, proc.stderr
    assert os.listdir(state.parent) == ["state.bin"] and state.read_bytes() == b"previous"
