"""Group commit vs one commit per request, on SQLite and PostgreSQL.

Each request is one unit of work: a 2 KB archived document and its audit event, acknowledged only
after the commit is durable (SQLite WAL + synchronous=FULL; PostgreSQL default fsync). The
baseline commits every unit alone (max_batch=1, the same code path); group commit lets concurrent
units share a transaction. Both run in the same process, on the same disk, one after the other.

    python -m benchmarks.storage_commit [--units N] [--writers W]

Writes benchmarks/results/storage_commit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import time
from typing import Any

import asyncpg

from benchmarks.common import scratch_home, table, write_results
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

        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - start
        batches = storage.committer.batches
    done = len(latencies)
    latencies.sort()
    return {"units": done, "seconds": elapsed, "units_per_s": done / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(0.99 * (done - 1))] * 1000,
            "units_per_commit": done / max(batches, 1)}


async def _pg_schema() -> str | None:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return None
    schema = f"gw_bench_{secrets.token_hex(3)}"
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    return schema


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()


async def main(units: int, writers_list: list[int]) -> None:
    rows: list[dict[str, Any]] = []
    home = scratch_home("storage")
    schema = await _pg_schema()
    try:
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
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if schema is not None:
            await _drop(schema)

    for row in rows:
        base = next(b for b in rows if b["engine"] == row["engine"]
                    and b["writers"] == row["writers"] and b["mode"].endswith("(baseline)"))
        row["x_baseline"] = row["units_per_s"] / base["units_per_s"]
    print(table(rows, ["engine", "writers", "mode", "units", "units_per_s", "x_baseline",
                       "p50_ms", "p99_ms", "units_per_commit"]))
    path = write_results("storage_commit", {"units": units, "rows": rows,
                                            "postgresql": schema is not None})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--writers", default="1,64", help="comma-separated writer counts")
    args = parser.parse_args()
    asyncio.run(main(args.units, [int(w) for w in args.writers.split(",")]))
