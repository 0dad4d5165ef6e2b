"""Group commit vs one commit per request, on SQLite and PostgreSQL.

Each request is one unit of work: a 2 KB archived document and its audit event, acknowledged only
after the commit is durable (SQLite WAL + synchronous=FULL; PostgreSQL default fsync). The
baseline commits every unit alone (max_batch=1, the same code path); group commit lets concurrent
units share a transaction. Both run in the same process, on the same disk, one after the other.

    python -m benchmarks.storage_commit [--units N] [--writers W,...] [--skip-postgresql] [--results-dir DIR]

PostgreSQL is the server at GATEWAY_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test);
a server that cannot be reached stops the run (exit 1) unless --skip-postgresql is given.
Writes benchmarks/results/storage_commit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks.common import BenchmarkError, add_results_option, run_main, scratch, table, write_results
from gateway.storage import AuditEvent, NewDocument, storage_for_url

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODES = {
    "one commit per unit (baseline)": {"max_batch": 1, "window_s": 0.0},
    "group commit, no wait": {"max_batch": 256, "window_s": 0.0},
    "group commit, 1 ms window": {"max_batch": 256, "window_s": 0.001},
}


async def _run(url: str, options: dict[str, Any], units: int, writers: int) -> dict[str, Any]:
    payload = secrets.token_bytes(2048)
    latencies: list[float] = []
    async with storage_for_url(url, **options) as storage:
        per_writer = units // writers

        async def writer(w: int) -> None:
            for i in range(per_writer):
                doc = NewDocument("bench", payload, "application/octet-stream",
                                  client=f"w{w}", natural_key=f"{w}-{i}")
                t0 = time.perf_counter()
                await storage.commit_unit(documents=[doc], audit=[
                    AuditEvent("document_signed", f"w{w}", "success", subject=doc.id)])
                latencies.append(time.perf_counter() - t0)

        batches0 = storage.committer.batches  # opening the storage commits once: not a unit's
        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - start
        batches = storage.committer.batches - batches0
        # Every acknowledged unit is in the database, document and audit record: a path that
        # acknowledged without writing would be timed as a fast one.
        stored, (head, _) = await storage.count_documents(), await storage.audit_head()
        if stored != len(latencies) or head < len(latencies):
            raise BenchmarkError(f"{len(latencies)} units acknowledged, {stored} documents and "
                                 f"{head} audit records stored", code="results_disagree")
    done = len(latencies)
    latencies.sort()
    return {"units": done, "seconds": elapsed, "units_per_s": done / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(0.99 * (done - 1))] * 1000,
            "units_per_commit": done / max(batches, 1)}


def _shown_url(url: str) -> str:
    """The URL without its password, for messages and the result file."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


async def _pg_schema() -> tuple[str, str]:
    """A fresh schema on the PostgreSQL server, and the server's version; BenchmarkError
    database_unavailable when the server cannot be reached or refuses us."""
    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError, ValueError) as exc:
        raise BenchmarkError(
            f"PostgreSQL at {_shown_url(PG_URL)} cannot be used ({type(exc).__name__}: {exc}); start it "
            "(scripts/dev.sh test and .ci/run start the local server), point GATEWAY_TEST_PG_URL at one, "
            "or pass --skip-postgresql to measure SQLite only", code="database_unavailable") from None
    try:
        schema = f"gw_bench_{secrets.token_hex(3)}"
        await conn.execute(f"CREATE SCHEMA {schema}")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return schema, version


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()


async def measure(units: int, writers_list: list[int], postgresql: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    schema, version = await _pg_schema() if postgresql else (None, None)
    with scratch("storage") as home:
        try:
            await _measure(rows, home, schema, units, writers_list)
        finally:
            if schema is not None:
                await _drop(schema)
    for row in rows:
        base = next(b for b in rows if b["engine"] == row["engine"]
                    and b["writers"] == row["writers"] and b["mode"].endswith("(baseline)"))
        row["x_baseline"] = row["units_per_s"] / base["units_per_s"]
        if row["engine"] == "postgresql":
            row["server_version"] = version
    return rows


async def _measure(rows: list[dict[str, Any]], home, schema: str | None, units: int,
                   writers_list: list[int]) -> None:
    for writers in writers_list:
        for mode, opts in MODES.items():
            n = units if writers > 1 else max(units // 10, 50)
            db = home / f"w{writers}-{len(rows)}.sqlite3"
            r = await _run(f"sqlite:///{db}", opts, n, writers)
            rows.append({"engine": "sqlite", "writers": writers, "mode": mode, **r})
            if schema is not None:
                sub = f"{schema}_{len(rows)}"
                conn = await asyncpg.connect(PG_URL)
                await conn.execute(f"CREATE SCHEMA {sub}")
                await conn.close()
                try:
                    r = await _run(PG_URL, {**opts, "server_settings": {"search_path": sub}},
                                   n, writers)
                finally:
                    await _drop(sub)
                rows.append({"engine": "postgresql", "writers": writers, "mode": mode, **r})


def _writers(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: comma-separated whole numbers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text}: every writer count must be at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=2000,
                        help="units per run with several writers (a tenth, at least 50, with one)")
    parser.add_argument("--writers", type=_writers, default=[1, 64], help="comma-separated writer counts")
    parser.add_argument("--skip-postgresql", action="store_true", help="measure SQLite only")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if args.units < max(args.writers):  # each writer commits units // writers: none would be measured
        parser.error(f"--units {args.units} is fewer than --writers {max(args.writers)}")
    rows = asyncio.run(measure(args.units, args.writers, postgresql=not args.skip_postgresql))
    print(table(rows, ["engine", "writers", "mode", "units", "units_per_s", "x_baseline",
                       "p50_ms", "p99_ms", "units_per_commit"]))
    path = write_results("storage_commit", {
        "units": args.units, "writers": args.writers, "rows": rows,
        "postgresql": None if args.skip_postgresql else _shown_url(PG_URL)},
        directory=args.results_dir, argv=argv)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
