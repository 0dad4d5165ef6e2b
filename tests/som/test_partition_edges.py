"""Partitioned runs when a process dies or runs elsewhere: a worker killed mid-run (the
out-of-memory killer's way) or a Dask scheduler lost is a coded error that leaves nothing behind;
local workers do not outlive a parent killed outright; Dask workers that run in another directory
than the caller find the files of a run given relative paths; the peer reference goes to the
Dask workers once, not once a partition."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gateway.som.partition import PartitionError, score_file
from gateway.som.synth import synthesize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """Big enough that the partitions take a few seconds to score (about 500,000 lines)."""
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    synthesize(customers=800, days=730, seed=2).write_parquet(path)
    return path


def _descendants(pid: int) -> list[int]:
    """Child processes, theirs and so on (started by any thread: /proc lists them per thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    kids += [int(k) for k in fh.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _is_worker(pid: int) -> bool:
    """A process pool's or a Dask nanny's worker: spawned by multiprocessing (not its resource
    tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except OSError:
        return False
    return b"spawn_main" in cmd and b"resource_tracker" not in cmd


def test_a_local_worker_killed_is_a_coded_error(tmp_path, big_source) -> None:
    """A worker process killed (SIGKILL, as the out-of-memory killer sends) during the run ended
    `som score --workers 2` with a BrokenProcessPool traceback, exit 1."""
    work = tmp_path / "run"
    work.mkdir()
    out = work / "scored.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--home", str(tmp_path / "home"), "som",
                             "score", str(big_source), "--out", str(out), "--partitions", "4",
                             "--workers", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            workers = [p for p in _descendants(proc.pid) if _is_worker(p)]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            time.sleep(0.01)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before a worker was seen"
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert json.loads(err.strip().splitlines()[-1])["error"]["code"] == "som_worker_lost"
    assert os.listdir(work) == []  # no output, no partitions left


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"  # a zombie is gone but for its status
    except OSError:
        return False


def test_local_workers_exit_when_the_parent_is_killed(tmp_path, big_source) -> None:
    """`som score --workers 2` killed outright (SIGKILL: the out-of-memory killer, `kill -9`) left
    its two worker processes waiting for tasks for ever."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--home", str(tmp_path / "home"), "som",
                             "score", str(big_source), "--out", str(tmp_path / "scored.parquet"),
                             "--partitions", "4", "--workers", "2", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = [p for p in _descendants(proc.pid) if _is_worker(p)]
            time.sleep(0.01)
        assert len(workers) == 2, "the run ended before its workers were seen"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_dask_workers_in_another_directory_take_relative_paths(tmp_path, monkeypatch) -> None:
    """A Dask worker runs in a directory of its own. Given relative paths (`som score h.parquet
    --out scored.parquet`), the run sent them to the workers as they were: every partition failed
    with som_file_not_found naming the scratch directory."""
    distributed = pytest.importorskip("distributed")
    elsewhere, data = tmp_path / "elsewhere", tmp_path / "data"
    elsewhere.mkdir()
    data.mkdir()
    small = synthesize(customers=60, days=300, seed=4)
    small.write_parquet(data / "h.parquet")
    monkeypatch.chdir(elsewhere)  # the workers' directory
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        monkeypatch.chdir(data)  # the caller's
        run = score_file("h.parquet", "scored.parquet", partitions=2, engine="dask",
                         scheduler=cluster.scheduler_address)
    assert run.lines == small.height
    whole = score_file(data / "h.parquet", data / "whole.parquet", partitions=1)
    key = ["order_id", "line"]
    a = pl.read_parquet(whole.output).sort(key)
    b = pl.read_parquet(data / "scored.parquet").sort(key)
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    assert sorted(os.listdir(data)) == ["h.parquet", "scored.parquet", "whole.parquet"]


def test_a_dask_worker_killed_is_a_coded_error(tmp_path, big_source) -> None:
    """A Dask worker that dies in a task (killed by its nanny's memory limit, or by the kernel)
    ended the run with distributed's KilledWorker traceback."""
    distributed = pytest.importorskip("distributed")
    import dask

    out = tmp_path / "scored.parquet"
    killed: list[int] = []
    # No retry on another worker: the first death of a task ends the run.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster:
        done = threading.Event()

        def kill_a_busy_worker() -> None:
            # Once the scheduler has given a task out, kill the worker (the nanny's child process).
            while not done.is_set() and not killed:
                try:  # the scheduler's own thread changes the table meanwhile
                    busy = any(ts.state == "processing" for ts in list(cluster.scheduler.tasks.values()))
                except RuntimeError:
                    busy = False
                if busy:
                    for pid in _descendants(os.getpid()):
                        if _is_worker(pid):
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                time.sleep(0.005)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        try:
            with pytest.raises(PartitionError) as err:
                score_file(big_source, out, partitions=4, engine="dask",
                           scheduler=cluster.scheduler_address)
        finally:
            done.set()
            killer.join()
    assert killed
    assert err.value.code == "som_worker_lost"
    assert os.listdir(tmp_path) == []


def test_a_dask_scheduler_lost_mid_run_is_a_coded_error(tmp_path, big_source) -> None:
    """The scheduler of a cluster (its own process, as in production) killed during the run:
    Dask cancels every future, and the run ended with a FutureCancelledError traceback."""
    distributed = pytest.importorskip("distributed")
    dask_cli = Path(sys.executable).parent / "dask"
    info = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(dask_cli), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(info)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(subprocess.Popen([str(dask_cli), "worker", "--scheduler-file", str(info),
                                       "--no-nanny", "--nthreads", "1", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(info.read_text())["address"]
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        watcher = distributed.Client(address, timeout=30)  # a client of the test's own
        watcher.wait_for_workers(1, timeout=60)

        def kill_scheduler() -> None:
            # Once a task of the run is on the worker.
            while procs[0].poll() is None:
                if any(watcher.processing().values()):
                    procs[0].kill()
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_scheduler, daemon=True)
        killer.start()
        try:
            with pytest.raises(PartitionError) as err:
                score_file(big_source, out_dir / "scored.parquet", partitions=4, engine="dask",
                           scheduler=address)
        finally:
            if procs[0].poll() is None:
                procs[0].kill()
            killer.join(timeout=30)
            watcher.close()
        assert err.value.code == "som_engine_unavailable" and address in str(err.value)
        assert os.listdir(out_dir) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wide_history() -> pl.DataFrame:
    """Many (class of trade, state, family) cells: a peer reference of about 12 MiB."""
    rng = np.random.default_rng(0)
    rows = []
    for t in range(20):
        for s in range(50):
            for c in range(2):
                for f in rng.choice(300, 25, replace=False):
                    for m in (1, 6):
                        rows.append((f"O{len(rows)}", 1, f"C{t:02d}{s:02d}{c}", f"T{t}", f"S{s}", f"F{f}",
                                     dt.date(2024, m, 3), float(rng.integers(10, 500))))
    return pl.DataFrame(rows, schema=["order_id", "line", "customer", "customer_type", "state", "family",
                                      "date", "dosage_units"], orient="row")


def test_dask_sends_the_peer_reference_once(tmp_path) -> None:
    """The reference went whole into the graph of every partition's task (8 partitions: eight
    12.8 MiB graphs, each held by the scheduler, and distributed's 'Sending large graph' warning
    printed eight times); it is sent to the workers once."""
    distributed = pytest.importorskip("distributed")
    source = tmp_path / "wide.parquet"
    _wide_history().write_parquet(source)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster:
            run = score_file(source, tmp_path / "dask.parquet", partitions=8, engine="dask",
                             scheduler=cluster.scheduler_address)
    assert not [w for w in seen if "large graph" in str(w.message)]
    local = score_file(source, tmp_path / "local.parquet", partitions=8)
    key = ["order_id", "line"]
    a = pl.read_parquet(run.output).sort(key)
    b = pl.read_parquet(local.output).sort(key)
    assert a.equals(b)


@pytest.mark.parametrize("partitions", [1, 3])
def test_customers_that_are_no_text_get_one_code_on_every_path(tmp_path, partitions) -> None:
    """A list-typed customer column is som_invalid_value read whole; split into partitions it was
    som_unreadable, as if the file were damaged."""
    from gateway.som.io import SomInputError

    source = tmp_path / "lists.parquet"
    synthesize(customers=10, days=100, seed=1).with_columns(pl.concat_list("customer")).write_parquet(source)
    with pytest.raises(SomInputError) as err:
        score_file(source, tmp_path / "scored.parquet", partitions=partitions)
    assert err.value.code == "som_invalid_value"
    assert os.listdir(tmp_path) == ["lists.parquet"]
