"""Edges of the benchmarks: missing prerequisites, processes left behind, honest figures, and
result files that say how to reproduce them. Real parts, short runs, no timing asserted."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import _thread
from pathlib import Path

import polars as pl
import psutil
import pytest

from benchmarks import common, http_sign, som_batch, storage_commit

ROOT = Path(__file__).resolve().parents[2]


def _bench(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


# --- result files -------------------------------------------------------------------------------

def test_a_result_file_records_the_command_machine_versions_and_commit(tmp_path: Path) -> None:
    path = common.write_results("demo_bench", {"rows": [1]}, directory=tmp_path,
                                argv=["--seconds", "0.5", "--results-dir", str(tmp_path)])
    assert path == tmp_path / "demo_bench.json"
    data = json.loads(path.read_text())
    assert data["command_line"] == f"python -m benchmarks.demo_bench --seconds 0.5 --results-dir {tmp_path}"
    assert data["machine"]["cores"] and data["machine"]["when"] and data["machine"]["python"]
    assert data["versions"]["csos-gateway"] and data["versions"]["numba"] and data["versions"]["sqlite"]
    assert "commit" in data["source"]
    assert data["rows"] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["demo_bench.json"]  # no temporary left
    with pytest.raises(ValueError, match="command_line"):  # a result never hides how to reproduce it
        common.write_results("demo_bench", {"command_line": "x"}, directory=tmp_path)


# --- the entry point: clear errors, SIGTERM unwinds -----------------------------------------------

def test_sigterm_unwinds_the_benchmark_so_its_cleanup_runs() -> None:
    cleaned = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return 0
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        common.run_main(main)
    assert info.value.code == 128 + signal.SIGTERM
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_missing_hsm_module_is_one_line_and_exit_1_with_nothing_left(tmp_path: Path) -> None:
    done = _bench("hsm_sign", "--seconds", "0.1", "--rounds", "1", "--keys", "p256",
                  "--results-dir", str(tmp_path / "results"),
                  env={"GATEWAY_PKCS11_LIB": str(tmp_path / "missing.so"), "TMPDIR": str(tmp_path)})
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error [hsm_unavailable]: ") and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # scratch home removed, nothing written


# --- storage_commit ----------------------------------------------------------------------------------

def test_an_unreachable_postgresql_stops_the_run_instead_of_dropping_its_rows(tmp_path: Path) -> None:
    done = _bench("storage_commit", "--units", "4", "--writers", "2", "--results-dir", str(tmp_path),
                  env={"GATEWAY_TEST_PG_URL": "postgresql://postgres:secret@127.0.0.1:1/test"})
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error [database_unavailable]: PostgreSQL at postgresql://postgres:***@")
    assert "--skip-postgresql" in done.stderr and "secret" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_fewer_units_than_writers_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        storage_commit.main(["--units", "10", "--writers", "64", "--skip-postgresql"])
    assert info.value.code == 2


def test_one_commit_per_unit_counts_one_commit_per_unit() -> None:
    """Opening the storage commits once; that commit is not one of the measured units'."""
    rows = asyncio.run(storage_commit.measure(20, [4], postgresql=False))
    baseline = next(r for r in rows if r["mode"].endswith("(baseline)"))
    assert baseline["units"] == 20 and baseline["units_per_commit"] == 1.0


# --- http_sign ---------------------------------------------------------------------------------------

def test_a_server_that_does_not_come_up_in_time_is_not_left_running(tmp_path: Path) -> None:
    home = tmp_path / "home-not-ready"
    home.mkdir()
    with pytest.raises(common.BenchmarkError) as info:
        http_sign.start_server(home, "INFO", timeout=0.05)
    assert info.value.code == "server_failed"
    time.sleep(0.2)
    left = [p for p in _processes_mentioning(str(home)) if p.status() != psutil.STATUS_ZOMBIE]
    for proc in left:
        proc.kill()
    assert not left


def test_a_server_deaf_to_sigterm_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"up\n"
        assert http_sign.stop_server(proc, timeout=0.3) is None  # not a clean exit
        assert proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


class _Refuse(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - the handler's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(429)
        self.send_header("X-Request-Id", self.headers.get("X-Request-Id", ""))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
def test_no_admitted_request_gives_no_latency_not_a_passing_one() -> None:
    """wrk's script says -1 for a percentile of nothing: that must not read as p99 < 250 ms."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = http_sign.wrk_open_loop(server.server_address[1], "token", "t", rate=20, seconds=1)
    finally:
        server.shutdown()
        server.server_close()
    assert result["ok"] == 0 and result["rejected_429"] > 0
    assert result["p99_ms"] is None and result["p50_ms"] is None and result["p99_429_ms"] is not None


# --- som_batch ---------------------------------------------------------------------------------------

def test_agreement_counts_flags_and_line_counts_not_only_scores(tmp_path: Path) -> None:
    expected = pl.DataFrame({"order_id": ["a", "a", "b", "c"], "line": [1, 2, 1, 1],
                             "score": [0.5, 1.5, float("nan"), 0.0], "flag": [False, True, False, False]})
    assert som_batch._agree_lines(expected, expected) == 1.0
    assert som_batch._agree_lines(expected, expected.with_columns(pl.Series("flag", [False] * 4))) == 0.75
    assert som_batch._agree_lines(expected, expected.head(3)) == 0.0
    # a partitioned run writes the lines in another order: compared by line, not by position
    expected.reverse().write_parquet(tmp_path / "out.parquet")
    assert som_batch._agree_file(tmp_path / "out.parquet", expected) == 1.0


def test_an_unreadable_data_file_is_a_message_not_a_traceback(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "orders.parquet"
    bad.write_text("not parquet")
    code = common.run_main(lambda: som_batch.main(["--data", str(bad), "--results-dir", str(tmp_path / "r")]))
    assert code == 1
    assert capsys.readouterr().err.startswith("error [som_unreadable]: ")
    assert not (tmp_path / "r").exists()


def test_a_command_interrupted_while_it_runs_is_stopped(tmp_path: Path) -> None:
    marker = f"bench-edge-{os.getpid()}-{time.monotonic_ns()}"
    # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and then
    # interrupt_main does nothing: Ctrl-C's handler is put in place for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            som_batch.run_command(f"import time  # {marker}\ntime.sleep(30)", [])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
        time.sleep(0.1)
        left = [p for p in _processes_mentioning(marker) if p.status() != psutil.STATUS_ZOMBIE]
        for proc in left:
            proc.kill()
    assert not left
