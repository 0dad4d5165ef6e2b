"""End-to-end signing through HTTP against the raw HSM rate measured in the same run.

    python -m benchmarks.http_sign [--seconds 5] [--connections 16] [--overload 4]
        [--generator auto|wrk|python] [--log-level INFO] [--results-dir DIR]

1. raw: N threads on N PKCS#11 sessions signing with the same RSA-2048 key (N = cores): the
   ceiling of the token on this machine.
2. capacity: `gateway serve` (a real server process, SQLite archive with group commit) under a
   closed-loop load (wrk when installed, else the Python load generator below), every request a
   distinct XML document signed with XML-DSig, archived and audited. Requests/s, p50, p99, and the
   ratio to raw (target: at least 85%, load generator included, on this 2-core machine).
3. overload: an open-loop load offered at 4x the measured capacity. Admitted requests must keep
   p99 under 250 ms, the rest get 429 at once; the server's RSS before and after shows whether
   memory stays flat.

Figures taken while other work shares the CPU are provisional.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (BenchmarkError, add_results_option, positive, run_main, scratch, stop_process,
                               table, write_results)

KEY = "bench-http-rsa"

# The benchmark's home is its own, database included: a database named in the environment (an
# operator's archive, the tests' PostgreSQL) would receive the benchmark's client and thousands of
# signed documents and audit events, which an append-only archive cannot give back, and the
# figures would not be the SQLite ones they are reported as.
DATABASE_ENV = "GATEWAY_DATABASE_URL"


def own_environment() -> dict[str, str]:
    """This process's environment without the variables that would point the benchmark's home
    elsewhere: what the server runs with."""
    return {k: v for k, v in os.environ.items() if k != DATABASE_ENV}


# --- set-up ------------------------------------------------------------------------------------

def make_home(home: Path) -> str:
    """Set up a fresh home: token with one RSA key and its certificate, SQLite, one client. -> token."""
    from gateway.clients import add_client
    from gateway.config import load_settings, write_default_config
    from gateway.signing.hsm import Hsm
    from gateway.signing.pki import ensure_test_pki, issue_certificate
    from gateway.signing.softhsm import ensure_softhsm_token
    from gateway.storage import open_storage

    settings = load_settings(home)
    write_default_config(settings)
    text = settings.config_path.read_text()
    text = re.sub(r"port = \d+", "port = 0", text)
    settings.config_path.write_text(text)
    settings = dataclasses.replace(load_settings(home), database_url="")  # SQLite in the home (DATABASE_ENV)
    ensure_softhsm_token(settings)
    ensure_test_pki(settings.pki_dir)
    hsm = Hsm.open(settings)
    try:
        hsm.generate_keypair(KEY, "rsa2048")
        issued = issue_certificate(settings.pki_dir, hsm.public_key(KEY), "epcs-pharmacy",
                                   common_name="HTTP benchmark", label=KEY)
        hsm.store_certificate(KEY, issued.certificate)
    finally:
        hsm.close()

    async def client() -> str:
        storage = open_storage(settings)
        await storage.open()
        try:
            _c, token = await add_client(storage, "bench", "purchaser", [KEY])
        finally:
            await storage.close()
        return token

    return asyncio.run(client())


def raw_hsm_rate(home: Path, seconds: float) -> tuple[float, float]:
    """(signatures/s on all cores, CPU microseconds per signature)."""
    import psutil

    from benchmarks.hsm_sign import raw_rate
    from gateway.config import load_settings
    from gateway.signing.hsm import Hsm

    settings = load_settings(home)
    cores = len(os.sched_getaffinity(0))
    hsm = Hsm.open(settings, sessions=cores)
    try:
        hsm.sign(KEY, b"warm-up")
        before = psutil.Process().cpu_times()
        rate = raw_rate(hsm, KEY, "rsa2048", cores, seconds)
        after = psutil.Process().cpu_times()
        cpu = (after.user + after.system) - (before.user + before.system)
        return rate, cpu / (rate * seconds) * 1e6
    finally:
        hsm.close()


def start_server(home: Path, log_level: str, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """`gateway serve` on a free port; the server is stopped again if it is not ready in time or
    the wait is interrupted, so nothing is left running."""
    ready = home / "bench.port"
    ready.unlink(missing_ok=True)
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--home", str(home), "serve", "--port", "0",
                                 "--ready-file", str(ready), "--log-level", log_level],
                                stdout=subprocess.DEVNULL, stderr=log, env=own_environment())
    try:
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None:
                raise BenchmarkError(f"the server exited ({proc.returncode}) before it was ready:\n"
                                     f"{(home / 'server.log').read_text()}", code="server_failed")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the server was not ready within {timeout:g} s:\n"
                                     f"{(home / 'server.log').read_text()}", code="server_failed")
            time.sleep(0.05)
        return proc, int(ready.read_text())
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """The server drains and exits on SIGTERM, or is killed after `timeout` (common.stop_process)."""
    return stop_process(proc, timeout)


def log_tail(home: Path, lines: int = 20) -> str:
    """The end of the server's log, for a message: the scratch home goes when the run ends."""
    log = home / "server.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def check_server(proc: subprocess.Popen, home: Path, phase: str) -> None:
    """BenchmarkError server_failed when the server has exited: the figures of a phase it did not
    live through (connections refused, counted as wrk's socket errors) are not its capacity."""
    if proc.poll() is not None:
        raise BenchmarkError(f"the server exited ({proc.returncode}) during {phase}:\n{log_tail(home)}",
                             code="server_failed")


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def loop_lag_buckets(port: int) -> dict[str, float]:
    """The server's event-loop lag histogram (cumulative buckets) from /metrics."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError as exc:  # URLError, a refused connection, a timeout
        raise BenchmarkError(f"the server's /metrics did not answer: {exc}", code="server_failed") from None
    out = {}
    for line in text.splitlines():
        if line.startswith("gateway_event_loop_lag_seconds_bucket"):
            out[line.split('le="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def lag_median_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Median loop lag between two scrapes (upper edge of the bucket holding it)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    total = delta.get("+Inf", 0.0)
    if not total:
        return None
    for edge, count in sorted(((float(k), v) for k, v in delta.items() if k != "+Inf")):
        if count >= total / 2:
            return edge * 1000
    return float("inf")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# --- load generators ---------------------------------------------------------------------------

def document(tag: str, n: int) -> bytes:
    return (f'<Document xmlns="urn:bench"><Run>{tag}</Run><Number>{n}</Number>'
            f'<Text>signed through the gateway benchmark</Text></Document>').encode()


_WRK_SCRIPT = """
-- Every request carries its own X-Request-Id (the gateway echoes it), so each response is paired
-- with the moment its request was written and latency is kept apart for 200s and 429s.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end
local threads = {}
local counter = 0
local started = {}
ok_us, rejected_us, other = {}, {}, 0
function setup(thread)
  table.insert(threads, thread)
end
request = function()
  counter = counter + 1
  local id = "bench-" .. counter
  local body = '<Document xmlns="urn:bench"><Run>%(tag)s</Run><Number>' .. counter ..
    '</Number><Text>signed through the gateway benchmark</Text></Document>'
  local headers = {["Content-Type"] = "application/xml", ["Authorization"] = "Bearer %(token)s",
                   ["X-Request-Id"] = id}
  local req = wrk.format("POST", "%(path)s", headers, body)
  started[id] = now_us()
  return req
end
response = function(status, headers, body)
  local t = now_us()
  local id = headers["X-Request-Id"]
  local t0 = id and started[id]
  if t0 then started[id] = nil end
  if status == 200 and t0 then table.insert(ok_us, t - t0)
  elseif status == 429 and t0 then table.insert(rejected_us, t - t0)
  else other = other + 1 end
end
%(delay)s
local function pct(values, q)
  if #values == 0 then return -1 end
  local i = math.max(1, math.ceil(#values * q / 100))
  return values[i]
end
done = function(summary, latency, requests)
  local ok, rej, n_other = {}, {}, 0
  for _, t in ipairs(threads) do
    for _, v in ipairs(t:get("ok_us")) do table.insert(ok, v) end
    for _, v in ipairs(t:get("rejected_us")) do table.insert(rej, v) end
    n_other = n_other + t:get("other")
  end
  table.sort(ok); table.sort(rej)
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "ok": %%d, "rejected_429": %%d, ' ..
    '"other": %%d, "socket_errors": %%d, "p50_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"ok_p50_us": %%d, "ok_p99_us": %%d, "ok_max_us": %%d, "rej_p50_us": %%d, "rej_p99_us": %%d}\\n',
    summary.requests, summary.duration, #ok, #rej, n_other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    pct(ok, 50), pct(ok, 99), pct(ok, 100), pct(rej, 50), pct(rej, 99)))
end
"""


def _wrk(port: int, token: str, tag: str, connections: int, seconds: float, delay_ms: float | None) -> dict[str, Any]:
    fd, name = tempfile.mkstemp(suffix=".lua")
    os.close(fd)
    script = Path(name)
    delay = f"delay = function() return {delay_ms:.1f} end" if delay_ms else ""
    script.write_text(_WRK_SCRIPT % {"token": token, "tag": tag, "path": f"/v1/sign?key={KEY}", "delay": delay})
    duration = max(1, round(seconds))
    try:
        done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
                               "-s", str(script), f"http://127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"wrk did not finish within {duration + 60} s", code="load_failed") from None
    finally:
        script.unlink()
    if done.returncode != 0 or "RESULT " not in done.stdout:
        raise BenchmarkError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout).strip()}",
                             code="load_failed")
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


def _ms(us: float) -> float | None:
    """wrk's script reports -1 for a percentile of no response at all: None, never a figure."""
    return None if us < 0 else us / 1000


def wrk_closed_loop(port: int, token: str, tag: str, connections: int, seconds: float) -> dict[str, Any]:
    r = _wrk(port, token, tag, connections, seconds, None)
    duration = r["duration_us"] / 1e6
    return {"generator": "wrk", "requests": r["requests"], "ok": r["ok"], "non2xx": r["requests"] - r["ok"],
            "socket_errors": r["socket_errors"], "ok_per_s": r["ok"] / duration,
            "p50_ms": _ms(r["ok_p50_us"]), "p99_ms": _ms(r["ok_p99_us"])}


def wrk_open_loop(port: int, token: str, tag: str, rate: float, seconds: float) -> dict[str, Any]:
    """Offered load at about `rate`/s: many connections, each pausing between requests.

    wrk is closed-loop per connection; with a pause much longer than a response takes, each
    connection sends at about 1/pause, so the total is set by the number of connections, not
    by how fast the server answers. The rate actually offered is measured and reported.
    """
    delay_ms = 200.0
    connections = max(8, round(rate * (delay_ms + 25) / 1000))
    r = _wrk(port, token, tag, connections, seconds, delay_ms)
    duration = r["duration_us"] / 1e6
    return {"generator": f"wrk (c={connections}, pause {delay_ms:.0f} ms)", "requests": r["requests"],
            "ok": r["ok"], "rejected_429": r["rejected_429"], "socket_errors": r["socket_errors"],
            "offered_per_s": r["requests"] / duration, "ok_per_s": r["ok"] / duration,
            "p50_ms": _ms(r["ok_p50_us"]), "p99_ms": _ms(r["ok_p99_us"]), "max_ms": _ms(r["ok_max_us"]),
            "p99_all_ms": r["p99_us"] / 1000, "p50_429_ms": _ms(r["rej_p50_us"]),
            "p99_429_ms": _ms(r["rej_p99_us"]),
            "other_statuses": {"other": r["other"]} if r["other"] else {}}


class _Conn:
    """One keep-alive HTTP/1.1 connection; minimal response parsing (status + Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes, timeout: float = 10.0) -> int:
        """The response's status; a server that does not answer within `timeout` (as wrk's
        --timeout) is an error, not a wait for ever."""
        async with asyncio.timeout(timeout):
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if match:
                await self.reader.readexactly(int(match.group(1)))
            return status


def _raw_request(port: int, token: str, tag: str, n: int) -> bytes:
    body = document(tag, n)
    return (f"POST /v1/sign?key={KEY} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _load(port: int, token: str, tag: str, seconds: float, *, rate: float | None,
                connections: int) -> dict[str, Any]:
    """Closed loop (`rate` None: `connections` workers back to back) or open loop at `rate`/s."""
    latencies: dict[int, list[float]] = {}
    errors = 0
    counter = iter(range(10**9))
    idle: list[_Conn] = []
    sent = 0

    async def connect() -> _Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return _Conn(reader, writer)

    async def one(conn: _Conn | None) -> None:
        nonlocal errors
        try:
            conn = conn or await connect()
            t0 = time.perf_counter()
            status = await conn.request(_raw_request(port, token, tag, next(counter)))
            latencies.setdefault(status, []).append(time.perf_counter() - t0)
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            errors += 1

    start = time.perf_counter()
    stop = start + seconds
    if rate is None:
        async def worker() -> None:
            conn: _Conn | None = await connect()
            while time.perf_counter() < stop:
                idle.clear()
                await one(conn)
                # `one` puts a connection that answered back; a broken one is replaced
                conn = idle.pop() if idle else None
        await asyncio.gather(*(worker() for _ in range(connections)))
    else:
        tasks: set[asyncio.Task] = set()
        interval = 1.0 / rate
        next_at = start
        while True:
            now = time.perf_counter()
            if now >= stop:
                break
            while next_at <= now:  # catch up: the schedule, not the responses, sets the pace
                task = asyncio.create_task(one(idle.pop() if idle else None))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
                next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "errors": errors, "sent": sent,
            "latencies": {str(k): v for k, v in latencies.items()}}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000


def python_load(port: int, token: str, tag: str, seconds: float, *, rate: float | None,
                connections: int) -> dict[str, Any]:
    """Run the Python generator in its own process (it must not share the server's GIL or ours)."""
    args = [sys.executable, "-m", "benchmarks.http_sign", "--loadgen", json.dumps(
        {"port": port, "token": token, "tag": tag, "seconds": seconds, "rate": rate, "connections": connections})]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"the load generator did not finish within {seconds + 60:g} s",
                             code="load_failed") from None
    if done.returncode != 0:
        raise BenchmarkError(f"the load generator failed ({done.returncode}): {done.stderr.strip()}",
                             code="load_failed")
    data = json.loads(done.stdout)
    lat = data["latencies"]
    ok = lat.get("200", [])
    total = sum(len(v) for v in lat.values())
    return {"generator": "python", "requests": total, "ok": len(ok), "non2xx": total - len(ok),
            "rejected_429": len(lat.get("429", [])), "socket_errors": data["errors"],
            "offered_per_s": data["sent"] / data["elapsed_s"] if rate else None,
            "ok_per_s": len(ok) / data["elapsed_s"], "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99),
            "p99_429_ms": _pct(lat.get("429", []), 99),
            "other_statuses": {k: len(v) for k, v in lat.items() if k not in ("200", "429")}}


def overload_load(generator: str, port: int, token: str, tag: str, seconds: float, rate: float,
                  connections: int) -> dict[str, Any]:
    if generator == "wrk":
        return wrk_open_loop(port, token, tag, rate, seconds)
    return python_load(port, token, tag, seconds, rate=rate, connections=connections)


# --- main --------------------------------------------------------------------------------------

def _f(value: float | None, unit: str = " ms") -> str:
    return "none" if value is None else f"{value:.1f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive(float), default=5.0)
    parser.add_argument("--connections", type=positive(int), default=16)
    parser.add_argument("--overload", type=positive(float), default=4.0, help="offered load as a multiple of capacity")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    add_results_option(parser)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        spec = json.loads(args.loadgen)
        print(json.dumps(asyncio.run(_load(spec["port"], spec["token"], spec["tag"], spec["seconds"],
                                           rate=spec["rate"], connections=spec["connections"]))))
        return 0

    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    elif generator == "wrk" and not shutil.which("wrk"):
        raise BenchmarkError("wrk is not installed (Debian package wrk): install it or use --generator python",
                             code="wrk_not_installed")
    with scratch("http") as home:
        return _run(args, generator, home, argv)


def _run(args: argparse.Namespace, generator: str, home: Path, argv: list[str] | None) -> int:
    token = make_home(home)
    raw, raw_cpu = raw_hsm_rate(home, args.seconds)
    proc, port = start_server(home, args.log_level)
    try:
        # warm-up: connections, caches, the first group commits
        python_load(port, token, "warm", 1.0, rate=None, connections=4)
        cpu_before = _cpu_s(proc.pid)
        if generator == "wrk":
            capacity = wrk_closed_loop(port, token, "cap", args.connections, args.seconds)
        else:
            capacity = python_load(port, token, "cap", args.seconds, rate=None, connections=args.connections)
        check_server(proc, home, "the capacity run")
        if not capacity["ok"]:
            raise BenchmarkError(f"no request was signed under load ({capacity['non2xx']} answered otherwise, "
                                 f"{capacity['socket_errors']} socket errors); the server's log ends:\n"
                                 f"{log_tail(home)}",
                                 code="load_failed")
        capacity["server_cpu_us_per_request"] = (_cpu_s(proc.pid) - cpu_before) / capacity["ok"] * 1e6
        rss_before = rss_mb(proc.pid)
        offered = capacity["ok_per_s"] * args.overload
        lag0 = loop_lag_buckets(port)
        overload = overload_load(generator, port, token, "over", args.seconds, offered, args.connections)
        check_server(proc, home, "the overload run")
        overload["loop_lag_median_ms"] = lag_median_ms(lag0, loop_lag_buckets(port))
        rss_after = rss_mb(proc.pid)
        # a second overload round: memory must not keep growing
        overload2 = overload_load(generator, port, token, "over2", args.seconds, offered, args.connections)
        check_server(proc, home, "the second overload run")
        rss_after2 = rss_mb(proc.pid)
    finally:
        code = stop_server(proc)
    raw_after, raw_cpu_after = raw_hsm_rate(home, args.seconds)

    raw_mean = (raw + raw_after) / 2
    ratio = capacity["ok_per_s"] / raw_mean
    rows = [
        {"phase": "raw HSM (before)", "per_s": raw},
        {"phase": "raw HSM (after)", "per_s": raw_after},
        {"phase": f"HTTP sign ({capacity['generator']}, c={args.connections})", "per_s": capacity["ok_per_s"],
         "p50_ms": capacity["p50_ms"], "p99_ms": capacity["p99_ms"], "vs_raw": ratio},
        {"phase": f"overload {args.overload:g}x: admitted", "per_s": overload["ok_per_s"],
         "p50_ms": overload["p50_ms"], "p99_ms": overload["p99_ms"],
         "share_429": overload["rejected_429"] / max(1, overload["requests"])},
        {"phase": f"overload {args.overload:g}x again: admitted", "per_s": overload2["ok_per_s"],
         "p50_ms": overload2["p50_ms"], "p99_ms": overload2["p99_ms"],
         "share_429": overload2["rejected_429"] / max(1, overload2["requests"])},
    ]
    print(table(rows, ["phase", "per_s", "p50_ms", "p99_ms", "vs_raw", "share_429"]))
    for name, o in (("overload", overload), ("overload again", overload2)):
        note = f", 429s p99 {o['p99_429_ms']:.1f} ms" if o.get("p99_429_ms") is not None else ""
        print(f"{name}: offered {o['offered_per_s']:.0f}/s (target {offered:.0f}/s) by {o['generator']}; "
              f"admitted p99 {_f(o['p99_ms'])}{note}; other statuses {o['other_statuses']}; "
              f"socket errors {o['socket_errors']}")
    if overload.get("loop_lag_median_ms") is not None:
        print(f"event loop lag during overload (median, bucket edge): {overload['loop_lag_median_ms']:.0f} ms")
    hsm_cpu = (raw_cpu + raw_cpu_after) / 2
    server_cpu = capacity["server_cpu_us_per_request"]
    cores = len(os.sched_getaffinity(0))
    # CPU budget: every request costs the HSM's signature plus the gateway's own work, on the
    # same cores. This ceiling does not depend on what else runs on the machine.
    ceiling = (cores * 1e6 / server_cpu) / (cores * 1e6 / hsm_cpu)
    print(f"CPU per request: HSM signature {hsm_cpu:.0f} us (raw), whole server {server_cpu:.0f} us "
          f"-> CPU-bound ceiling of HTTP vs raw on this machine: {ceiling:.2f}")
    print(f"server RSS: {rss_before:.1f} MB before overload, {rss_after:.1f} MB after, {rss_after2:.1f} MB after a second round")
    targets = {
        "http_vs_raw_ge_0.85": ratio >= 0.85,
        "overload_admitted_p99_lt_250ms": all(o["p99_ms"] is not None and o["p99_ms"] < 250 for o in (overload, overload2)),
        "overload_rest_429": all(not o["other_statuses"] and o["socket_errors"] == 0 for o in (overload, overload2)),
        "memory_flat_within_10pct": rss_after2 <= rss_after * 1.10,
        "clean_shutdown": code == 0,
    }
    for name, ok in targets.items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
    path = write_results("http_sign", {
        "seconds": args.seconds, "connections": args.connections, "generator": capacity["generator"],
        "server_exit_status": code,
        "log_level": args.log_level, "raw_hsm_per_s": [raw, raw_after], "capacity": capacity,
        "http_vs_raw": ratio, "hsm_cpu_us_per_signature": hsm_cpu,
        "server_cpu_us_per_request": server_cpu, "cpu_bound_ceiling_vs_raw": ceiling, "overload_factor": args.overload, "overload": overload, "overload_again": overload2,
        "rss_mb": {"before_overload": rss_before, "after_overload": rss_after, "after_second_overload": rss_after2},
        "targets": targets}, directory=args.results_dir, argv=argv)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
