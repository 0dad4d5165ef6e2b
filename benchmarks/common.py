"""Shared helpers for benchmarks: a throwaway home with a SoftHSM token, result files, machine facts,
and the entry point every benchmark runs under (clear errors, clean exits on SIGTERM)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# What a result depends on beside the code: recorded with every result file.
PACKAGES = ("csos-gateway", "numpy", "numba", "llvmlite", "polars", "pyarrow", "duckdb", "signxml",
            "lxml", "cryptography", "python-pkcs11", "pyhanko-certvalidator", "asyncpg", "aiohttp",
            "psutil")


class BenchmarkError(Exception):
    """A prerequisite is missing or a run cannot be trusted: `error [code]: message`, exit 1."""

    def __init__(self, message: str, *, code: str = "benchmark_failed") -> None:
        super().__init__(message)
        self.code = code


def add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", default=str(RESULTS),
                        help=f"where NAME.json is written (default: {RESULTS.relative_to(ROOT)})")


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` above 0 (a zero or negative duration or count would
    measure nothing, or divide by it)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be above 0")
        return value
    return parse


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _load_now() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"load_average": load, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# The load when the run began (run_main): at the end the load averages count the benchmark's own
# work (a run that kept both cores busy for a minute reads about 2 with nothing else running), so
# only this one tells whether other work shared the machine.
_STARTED: dict[str, Any] | None = None


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    facts = {"cores": os.cpu_count(), "usable_cores": usable, "cpu": _cpu_model(), "memory_gb": _memory_gb(),
             "python": platform.python_version(), "machine": platform.machine(),
             "system": platform.platform(), **_load_now()}
    if _STARTED is not None:
        facts["at_start"] = _STARTED
    return facts


def _run(command: list[str], *, check: bool = False) -> str | None:
    """The first line a tool prints (some print their version on stderr, or exit non-zero after
    it); None when it cannot run, or with `check` when it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if check and done.returncode != 0:
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        out["openssl"] = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - a fact for the record, not a requirement
        out["openssl"] = None
    import sqlite3
    out["sqlite"] = sqlite3.sqlite_version
    out["softhsm2-util"] = _run(["softhsm2-util", "--version"])
    out["wrk"] = _run(["wrk", "--version"]) if shutil.which("wrk") else None
    return out


def source() -> dict[str, Any]:
    """The commit the code was run from, and whether the tree had changes (read only: no lock)."""
    commit = _run(["git", "rev-parse", "HEAD"], check=True)
    status = None
    if commit:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                                  capture_output=True, text=True, timeout=10, cwd=ROOT)
            status = [line for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"commit": commit, "modified": status}


def command_line(name: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


def write_results(name: str, data: dict[str, Any], *, directory: str | Path | None = None,
                  argv: list[str] | None = None) -> Path:
    """Write `directory/NAME.json` with what reproducing the run needs: the command line (`argv`,
    by default this process's), the machine, package and tool versions, the commit, the date."""
    folder = Path(directory) if directory is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    provenance = {"command_line": command_line(name, argv), "machine": machine(), "versions": versions(),
                  "source": source()}
    clash = sorted(provenance.keys() & data.keys())
    if clash:  # a result would silently replace how to reproduce it
        raise ValueError(f"result keys {clash} are the record's own")
    record = {**provenance, **data}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)  # a run cut short never leaves half a file
    return path


def scratch_home(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"gw-bench-{prefix}-"))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A throwaway directory (home, token, data), removed however the run ends."""
    path = scratch_home(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_process(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM (a gateway server drains, a partitioned run stops its workers), SIGKILL if the
    process has not exited within `timeout`: its exit status, None when it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a benchmark's main: SIGTERM unwinds like Ctrl-C (so `finally` blocks stop the servers
    and workers it started and remove its scratch files), a missing prerequisite or a refused
    run is one line `error [code]: message` and exit 1, not a traceback; Ctrl-C is exit 130."""
    from gateway.config import ConfigError
    from gateway.signing.errors import SigningError
    from gateway.som.errors import SomError
    from gateway.storage.base import StorageError

    global _STARTED
    _STARTED = _load_now()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(main() or 0)
    except (BenchmarkError, SigningError, StorageError, SomError, ConfigError) as exc:
        print(f"error [{getattr(exc, 'code', 'error')}]: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STARTED = None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)
