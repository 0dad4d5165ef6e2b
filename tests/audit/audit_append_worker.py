"""A separate gateway process appending to the audit chain (used by test_audit_two_processes).

Usage: python audit_append_worker.py NAME TASKS PER_TASK; the database comes from
GATEWAY_TEST_DB_URL (+ GATEWAY_TEST_DB_SCHEMA for PostgreSQL). Prints "ready" once the storage is
open, waits for a line on stdin, appends, prints "done N".
"""

from __future__ import annotations

import asyncio
import os
import sys

from gateway.storage import AuditEvent, storage_for_url


async def main(name: str, tasks: int, per_task: int) -> None:
    schema = os.environ.get("GATEWAY_TEST_DB_SCHEMA")
    options = {"server_settings": {"search_path": schema}} if schema else {}
    async with storage_for_url(os.environ["GATEWAY_TEST_DB_URL"], **options) as storage:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

        async def worker(t: int) -> None:
            for i in range(per_task):
                await storage.append_audit(AuditEvent(
                    "test_append", name, "success", subject=f"{t}.{i}", details={"pid": os.getpid()}))

        await asyncio.gather(*(worker(t) for t in range(tasks)))
    print(f"done {tasks * per_task}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
