"""Benchmarks measure their own set-up, and stop with a message when what they measure goes away.
Real parts (SoftHSM token, `gateway serve`, SQLite), tiny runs, no timing asserted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks import common, hsm_sign, http_sign, som_batch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_server(tmp_path_factory: pytest.TempPathFactory, hsm, rsa_key: str) -> Iterator[dict]:  # noqa: ANN001
    """The http_sign benchmark's home and server, set up while the environment names another
    database (as an operator's shell, or CI with the tests' PostgreSQL, does)."""
    outside = tmp_path_factory.mktemp("outside") / "operator.sqlite3"
    home = tmp_path_factory.mktemp("bench-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GATEWAY_DATABASE_URL", f"sqlite:///{outside}")
        # make_home points SOFTHSM2_CONF at the benchmark's token (for its server, started
        # here): put the session's back after, or every later test found its keys gone
        if "SOFTHSM2_CONF" in os.environ:
            mp.setenv("SOFTHSM2_CONF", os.environ["SOFTHSM2_CONF"])
        else:
            mp.delenv("SOFTHSM2_CONF", raising=False)
        token = http_sign.make_home(home)
        proc, port = http_sign.start_server(home, "WARNING")
    # ... and the module, which make_home initialised for the benchmark's token: the session's
    # Hsm reconnects on its next call (tests that sign in C through it would not)
    hsm.sign(rsa_key, b"back to the session's token")
    try:
        yield {"home": home, "token": token, "proc": proc, "port": port, "outside": outside}
    finally:
        http_sign.stop_server(proc)


def test_the_benchmark_signs_into_its_own_home_not_the_database_the_environment_names(bench_server: dict) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{bench_server['port']}/v1/sign?key={http_sign.KEY}", data=http_sign.document("own", 1),
        headers={"Authorization": f"Bearer {bench_server['token']}", "Content-Type": "application/xml"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200 and b"SignatureValue" in answer.read()
    assert not bench_server["outside"].exists()  # no client, document or audit event of ours there
    with sqlite3.connect(bench_server["home"] / "gateway.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM clients WHERE name = 'bench'").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM documents").fetchone()[0] >= 1


def test_a_server_gone_during_a_run_stops_it_with_a_message(bench_server: dict) -> None:
    """A server that died mid-run left wrk counting refused connections: its figures are no
    capacity, and the next scrape of /metrics was a URLError traceback."""
    proc = bench_server["proc"]
    http_sign.check_server(proc, bench_server["home"], "the capacity run")  # alive: nothing to say
    assert http_sign.stop_server(proc) == 0
    with pytest.raises(common.BenchmarkError, match=r"exited \(0\) during the capacity run") as info:
        http_sign.check_server(proc, bench_server["home"], "the capacity run")
    assert info.value.code == "server_failed"
    with pytest.raises(common.BenchmarkError) as info:
        http_sign.loop_lag_buckets(bench_server["port"])
    assert info.value.code == "server_failed"


def test_a_stopped_partitioned_command_stops_its_workers_and_removes_its_parts(tmp_path: Path) -> None:
    """run_command stops a command with SIGTERM. The partitioned command died of it at once: its
    runner never stopped its workers (they were left to notice the parent gone) nor removed the
    parts directory beside the output."""
    from gateway.som.synth import synthesize

    src, out = tmp_path / "in.parquet", tmp_path / "out" / "scored.parquet"
    out.parent.mkdir()
    synthesize(customers=60, days=400, seed=3).write_parquet(src)
    proc = subprocess.Popen([sys.executable, "-c", som_batch._PARTITION_CMD, str(src), str(out), "2"],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(parent.children()) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the pool's workers are up: the run is under way
        workers = parent.children(recursive=True)
        assert workers and proc.poll() is None
        status = common.stop_process(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 128 + signal.SIGTERM  # unwound (not -15: killed where it stood)
    assert list(out.parent.iterdir()) == []  # no parts, no output
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


# --- hsm_sign ----------------------------------------------------------------------------------------

def test_a_compiled_loop_the_token_refuses_fails_the_run_instead_of_reading_as_slow(hsm, rsa_key: str) -> None:
    """C_Sign's refusals came back as CK_RVs and were left uncounted: a rate of 0 (or a low one),
    and the pool's ratio to it a division by zero or a gain. python-pkcs11's side raises."""
    with pytest.raises(RuntimeError, match="CK_RV 0x") as info:
        hsm_sign.raw_c_rate(hsm, rsa_key, "p256", 1, 0.1)  # an ECDSA mechanism for an RSA key
    assert isinstance(info.value, common.BenchmarkError)  # one line and exit 1 under run_main


def test_every_side_signs_with_the_key_before_it_is_timed(hsm, rsa_key: str, ec_key: str) -> None:
    hsm_sign.check_signatures(hsm, rsa_key, "rsa2048")
    hsm_sign.check_signatures(hsm, ec_key, "p256")
    with pytest.raises(common.BenchmarkError, match="raw_py side's signature does not verify") as info:
        hsm_sign.check_signatures(hsm, ec_key, "p256", public=hsm.public_key(rsa_key))
    assert info.value.code == "results_disagree"


# --- result files ------------------------------------------------------------------------------------

def test_a_result_file_records_the_load_the_run_began_with(tmp_path: Path) -> None:
    """The load averages at the end count the benchmark's own work: the one at the start is what
    says whether the machine was otherwise idle."""
    def main() -> int:
        common.write_results("demo_bench", {"rows": []}, directory=tmp_path, argv=[])
        return 0

    assert common.run_main(main) == 0
    facts = json.loads((tmp_path / "demo_bench.json").read_text())["machine"]
    assert set(facts["at_start"]) == {"load_average", "when"}
    assert len(facts["at_start"]["load_average"]) == 3 and facts["at_start"]["when"] <= facts["when"]
