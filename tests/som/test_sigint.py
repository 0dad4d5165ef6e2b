"""Ctrl-C during `gateway som score` on worker processes: the terminal sends SIGINT to the whole
process group. Each worker, still importing, printed a KeyboardInterrupt traceback, and the
command ended with click's "Aborted!" and exit 1; now the workers ignore it, the command cleans
up and exits 130, as a shell reports a Ctrl-C."""

from __future__ import annotations

import os
import signal
import time

import pytest

from .test_cli_edges import _gateway, _listing, big_source  # noqa: F401 - big_source: a fixture


# workers: a moment after the split begins, as they start; in memory: as the output is written
@pytest.mark.parametrize(("how", "wait"), [(["--partitions", "4", "--workers", "2"], 0.3),
                                           (["--partitions", "1"], 0.0)])
def test_ctrl_c_cleans_up_and_exits_130_without_tracebacks(tmp_path, big_source, how, wait) -> None:  # noqa: F811
    work = tmp_path / "run"
    work.mkdir()
    source = work / "big.parquet"
    source.write_bytes(big_source.read_bytes())
    proc = _gateway("--home", str(tmp_path / "home"), "som", "score", str(source), "--out",
                    str(work / "scored.parquet"), *how, "--quiet", start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        # as soon as the run has begun writing (its scratch, or its temporary output), and
        # the workers are starting or scoring
        while proc.poll() is None and time.monotonic() < deadline:
            if len(os.listdir(work)) > 1:
                time.sleep(wait)
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Aborted" not in err, err
    assert _listing(work) == ["big.parquet"]
