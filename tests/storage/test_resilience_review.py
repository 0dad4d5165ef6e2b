"""Storage under failure, on the real engines: the database file removed or replaced, the disk
full, a lock held elsewhere, connections killed, the database refusing connections.

What every test checks: a caller gets StorageUnavailable (HTTP 503 `database_unavailable`), never
an acknowledgement for something not durably committed; nothing half-written (a document without
its audit event or the reverse: `verify_trail` catches both); and writes work again once the
database is back, without a restart.

PostgreSQL tests use their own schema, or a database of their own (dropped at the end); they only
ever terminate connections to that database, never anyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from storage_backends import PG_URL, Backend, drop_pg_schema, make_backend, require_postgres

from gateway.audit import AuditKey, make_checkpoint, verify_trail
from gateway.storage import (
    AuditEvent, NewClient, NewDocument, Storage, StorageUnavailable, storage_for_url,
)
from gateway.storage.sqlite import SqliteStorage
from tests.http.conftest import HTTP_RSA, http_keys, make_gateway  # noqa: F401 - fixtures


def order(n: int, size: int = 64) -> NewDocument:
    return NewDocument("csos_order", f"<CSOSOrder n='{n}'>".encode() + b"x" * size,
                       "application/xml", client="purchaser-1", natural_key=f"order-{n}")


def event(n: int = 0) -> AuditEvent:
    return AuditEvent("document.signed", "purchaser-1", "success", subject=str(n))


async def assert_trail_intact(storage: Storage) -> None:
    result = await verify_trail(storage, None)
    assert result.ok, result.message


# --- SQLite: the database file removed or replaced under a running gateway ---------------------

async def test_sqlite_file_removed_refuses_writes_until_it_is_back(tmp_path: Path) -> None:
    """A connection keeps writing to a file that was unlinked: before, such a commit was
    acknowledged and lost at the next start. Now it is refused, the health check fails, a read
    does not leave an empty database where the file was, and writes resume once the same file
    is back."""
    path = tmp_path / "gw.sqlite3"
    storage = SqliteStorage(path)
    await storage.open()
    try:
        first = await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        kept = tmp_path / "kept.sqlite3"
        os.link(path, kept)  # the operator's copy of the same file, to put back later
        path.unlink()

        with pytest.raises(StorageUnavailable, match="removed"):
            await storage.commit_unit(documents=[order(2)], audit=[event(2)])
        with pytest.raises(StorageUnavailable):
            await storage.health_check()
        with pytest.raises(StorageUnavailable):
            await storage.count_documents()
        assert not path.exists()  # no empty database created in its place

        os.rename(kept, path)
        again = await storage.commit_unit(documents=[order(3)], audit=[event(3)])
        await storage.health_check()
        assert again.audit[0].seq == first.audit[-1].seq + 1  # order 2 never reached the chain
    finally:
        await storage.close()
    async with SqliteStorage(path, read_only=True) as reopened:
        assert await reopened.find_document("csos_order", "order-2") is None
        assert await reopened.find_document("csos_order", "order-3") is not None
        await assert_trail_intact(reopened)


async def test_sqlite_file_replaced_refuses_writes_to_either_file(tmp_path: Path) -> None:
    """A database file replaced by another (a copy restored over it) under the running gateway:
    writes are refused rather than appended to the file no one will open again."""
    path = tmp_path / "gw.sqlite3"
    storage = SqliteStorage(path)
    await storage.open()
    try:
        await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        copy = tmp_path / "copy.sqlite3"
        src, dst = sqlite3.connect(path), sqlite3.connect(copy)
        try:
            # everything into the main file, so that each file stands alone afterwards
            src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        original = tmp_path / "original.sqlite3"
        os.link(path, original)
        os.replace(copy, path)

        with pytest.raises(StorageUnavailable, match="replaced"):
            await storage.commit_unit(documents=[order(2)], audit=[event(2)])
        with pytest.raises(StorageUnavailable, match="replaced"):
            await storage.health_check()
    finally:
        await storage.close()
    for file in (path, original):
        async with SqliteStorage(file, read_only=True) as s:
            assert await s.find_document("csos_order", "order-2") is None
            assert (await s.audit_head())[0] == 1
            await assert_trail_intact(s)


_WAL_REMOVED_THEN_CRASH = """
import asyncio, os, sys
from gateway.storage import AuditEvent, NewDocument, StorageUnavailable
from gateway.storage.sqlite import SqliteStorage

async def main():
    storage = SqliteStorage(sys.argv[1])
    await storage.open()
    await storage.commit_unit(documents=[NewDocument("csos_order", b"<o/>", "application/xml",
                                                     natural_key="before")],
                              audit=[AuditEvent("document.signed", "p", "success")])
    os.unlink(sys.argv[1] + "-wal")
    try:
        await storage.commit_unit(documents=[NewDocument("csos_order", b"<o/>", "application/xml",
                                                         natural_key="after")])
        print("acknowledged")
    except StorageUnavailable as exc:
        print("refused:", exc.message)
    sys.stdout.flush()
    os._exit(0)  # a crash: no close, no checkpoint on the way out

asyncio.run(main())
"""


async def test_sqlite_wal_removed_refuses_writes_and_keeps_what_was_acknowledged(
        tmp_path: Path) -> None:
    """The WAL removed under a running gateway: before, later commits were acknowledged into the
    unlinked WAL, and a crash then lost everything it held (here the whole database). Now writes
    are refused, and what the WAL held is copied into the database file first."""
    path = tmp_path / "gw.sqlite3"
    run = subprocess.run([sys.executable, "-c", _WAL_REMOVED_THEN_CRASH, str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("refused: the write-ahead log"), run.stdout

    async with SqliteStorage(path) as storage:
        assert await storage.find_document("csos_order", "before") is not None
        assert await storage.find_document("csos_order", "after") is None
        await storage.commit_unit(documents=[order(2)], audit=[event(2)])
        await assert_trail_intact(storage)


async def test_sqlite_wal_index_removed_refuses_writes(tmp_path: Path) -> None:
    """The -shm file removed: this process carries on with the unlinked index while another
    (`gateway clients add`, a second node) would build a new one and write over our frames."""
    path = tmp_path / "gw.sqlite3"
    storage = SqliteStorage(path)
    await storage.open()
    try:
        await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        Path(f"{path}-shm").unlink()
        with pytest.raises(StorageUnavailable, match="write-ahead log index"):
            await storage.commit_unit(documents=[order(2)], audit=[event(2)])
    finally:
        await storage.close()
    async with SqliteStorage(path) as reopened:  # a restart: what was acknowledged is there
        assert [d.natural_key for d in await reopened.list_documents()] == ["order-1"]
        await reopened.commit_unit(documents=[order(3)], audit=[event(3)])
        await assert_trail_intact(reopened)


async def test_sqlite_wal_unwritable_is_503_and_recovers(tmp_path: Path) -> None:
    """The WAL made immutable (chattr +i: refused even to root and to open descriptors)."""
    path = tmp_path / "gw.sqlite3"
    wal = Path(f"{path}-wal")
    storage = SqliteStorage(path)
    await storage.open()
    try:
        await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        if subprocess.run(["chattr", "+i", str(wal)], capture_output=True).returncode != 0:
            pytest.skip("this file system has no immutable flag")
        try:
            with pytest.raises(StorageUnavailable, match="I/O"):
                await storage.commit_unit(documents=[order(2)], audit=[event(2)])
            with pytest.raises(StorageUnavailable):
                await storage.health_check()
        finally:
            subprocess.run(["chattr", "-i", str(wal)], check=True)
        await storage.commit_unit(documents=[order(3)], audit=[event(3)])
        await storage.health_check()
        assert [d.natural_key for d in await storage.list_documents()] == ["order-1", "order-3"]
        await assert_trail_intact(storage)
    finally:
        await storage.close()


# --- SQLite: disk full ------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_sqlite_disk_full_acknowledges_only_what_is_on_disk(small_tmpfs: Path) -> None:
    path = small_tmpfs / "gw.sqlite3"
    acked: list[str] = []
    storage = SqliteStorage(path)
    await storage.open()
    try:
        async def write(n: int) -> None:
            try:
                result = await storage.commit_unit(documents=[order(n, 20_000)], audit=[event(n)])
                acked.append(result.document_ids[0])
            except StorageUnavailable as exc:
                assert "full" in exc.message

        for start in range(0, 200, 20):  # concurrent units: several share a commit
            await asyncio.gather(*(write(n) for n in range(start, start + 20)))
        assert 0 < len(acked) < 200  # the disk filled up part way

        subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
        later = await storage.commit_unit(documents=[order(1000, 20_000)], audit=[event(1000)])
        acked.append(later.document_ids[0])
        await storage.health_check()
    finally:
        await storage.close()
    async with SqliteStorage(path, read_only=True) as reopened:
        assert sorted(await reopened.document_ids(limit=10_000)) == sorted(acked)
        await assert_trail_intact(reopened)


# --- SQLite: another process holds the write lock ---------------------------------------------

async def test_sqlite_lock_held_elsewhere_fails_in_time_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    storage = SqliteStorage(path, busy_timeout_s=0.5)
    await storage.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(storage.commit_unit(documents=[order(n)], audit=[event(n)]) for n in range(10)),
            return_exceptions=True), 20)
        assert all(isinstance(o, StorageUnavailable) and "locked" in o.message for o in outcomes)
        assert time.monotonic() - started < 10
        with pytest.raises(StorageUnavailable):
            await storage.health_check()
        other.execute("ROLLBACK")
        # the same writer takes later units: no restart
        done = await storage.commit_unit(documents=[order(99)], audit=[event(99)])
        assert done.audit[0].seq == 1
        assert await storage.count_documents() == 1
        await assert_trail_intact(storage)
    finally:
        other.close()
        await storage.close()


# --- PostgreSQL: a lock held by another session -----------------------------------------------

@pytest.fixture
async def pg_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    b = await make_backend("postgresql", tmp_path)
    try:
        yield b
    finally:
        await drop_pg_schema(b.schema)


@pytest.mark.postgres
async def test_postgres_lock_held_elsewhere_times_out_instead_of_waiting_for_ever(
        pg_backend: Backend) -> None:
    """A long transaction elsewhere holds the audit chain's head: the writer never gave up, and
    every caller queued behind it waited with it. Now the statement is cancelled after the
    command timeout and the batch fails cleanly."""
    storage = pg_backend.storage(command_timeout_s=1.0)
    await storage.open()
    holder = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_backend.schema})
    try:
        await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        async with holder.transaction():
            await holder.execute("LOCK TABLE audit_head IN EXCLUSIVE MODE")
            started = time.monotonic()
            outcomes = await asyncio.wait_for(asyncio.gather(
                *(storage.commit_unit(documents=[order(n)], audit=[event(n)]) for n in range(2, 6)),
                return_exceptions=True), 15)
            assert all(isinstance(o, StorageUnavailable) for o in outcomes), outcomes
            assert "within 1 s" in outcomes[0].message
            assert time.monotonic() - started < 10
        later = await asyncio.wait_for(storage.commit_unit(documents=[order(9)], audit=[event(9)]), 10)
        assert later.audit[0].seq == 2  # the timed-out units left nothing behind
        assert sorted(d.natural_key for d in await storage.list_documents()) == ["order-1", "order-9"]
        await assert_trail_intact(storage)
    finally:
        await holder.close()
        await storage.close()


@pytest.mark.postgres
async def test_postgres_lock_timeout_is_database_unavailable_not_invalid_record(
        pg_backend: Backend) -> None:
    """A `lock_timeout` (set by a DBA on the role or database) cancelling a statement is the
    database's doing: 503, not the caller's 400 `invalid_record`."""
    storage = pg_backend.storage(server_settings={"search_path": pg_backend.schema,
                                                  "lock_timeout": "300"})
    await storage.open()
    holder = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_backend.schema})
    try:
        await storage.add_client(NewClient("ops-1", "admin", frozenset(), "tok1", b"h" * 32))
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM clients WHERE name = 'ops-1' FOR UPDATE")
            with pytest.raises(StorageUnavailable, match="lock timeout"):
                await storage.revoke_client("ops-1", [AuditEvent("client.revoked", "cli", "success")])
        revoked = await storage.revoke_client("ops-1", [AuditEvent("client.revoked", "cli", "success")])
        assert revoked.revoked_at is not None
        assert [r.event_type for r in await storage.audit_records()] == ["client.revoked"]
    finally:
        await holder.close()
        await storage.close()


@pytest.mark.postgres
async def test_postgres_checkpoint_and_its_record_commit_together(
        pg_backend: Backend, hsm, rsa_key: str) -> None:  # noqa: ANN001
    """A checkpoint and the `audit_checkpoint` record naming it were two commits: a failure
    between them (here the head locked past the timeout) left a checkpoint no record names. Now
    both commit or neither does."""
    storage = pg_backend.storage(command_timeout_s=1.0)
    await storage.open()
    key = AuditKey.from_signer(hsm.signer(rsa_key))
    holder = await asyncpg.connect(PG_URL, server_settings={"search_path": pg_backend.schema})
    try:
        await storage.commit_unit(documents=[order(1)], audit=[event(1)])
        async with holder.transaction():
            await holder.execute("LOCK TABLE audit_head IN EXCLUSIVE MODE")
            with pytest.raises(StorageUnavailable):
                await make_checkpoint(storage, key)
        assert await storage.checkpoints() == []
        checkpoint = await make_checkpoint(storage, key)
        assert checkpoint is not None
        assert [(r.event_type, r.details.get("checkpoint_id"))
                for r in await storage.audit_records()] == [("document.signed", None),
                                                            ("audit_checkpoint", checkpoint.id)]
        result = await verify_trail(storage, hsm.public_key(rsa_key))
        assert result.ok and result.checkpoints_checked == 1, result.message
    finally:
        await holder.close()
        await storage.close()


# --- PostgreSQL: connections killed, the database refusing connections (HTTP, real server) ----

@pytest.fixture
async def own_pg_database() -> AsyncIterator[tuple[str, str]]:
    """(name, url) of a database created for this test and dropped at the end."""
    await require_postgres()
    name = f"gw_resilience_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(PG_URL)
        yield name, urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def kill_connections(database: str) -> int:
    """Terminate every connection to this test's own database (the gateway's, nobody else's)."""
    admin = await asyncpg.connect(PG_URL)
    try:
        return await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    finally:
        await admin.close()


async def allow_connections(database: str, allow: bool) -> None:
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allow).lower()}')
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_postgres_connections_killed_while_idle_cost_no_request(
        own_pg_database: tuple[str, str]) -> None:
    """Pooled connections terminated while idle (a failover, an administrator): before, the
    next write, read or health check on each dead connection failed (a 503, or a raw
    InternalClientError for reads: a 500). Now a batch that met a dead connection before its
    COMMIT is written again on a fresh one, a read is repeated, and the pool renews the rest."""
    name, url = own_pg_database
    storage = storage_for_url(url, min_size=2, max_size=2)
    await storage.open()
    try:
        for n in range(15):
            assert await kill_connections(name) >= 1
            await storage.commit_unit(documents=[order(n)], audit=[event(n)])
            await kill_connections(name)
            assert await storage.count_documents() == n + 1
            await kill_connections(name)
            await storage.health_check()
        assert (await storage.audit_head())[0] == 15
        await assert_trail_intact(storage)
    finally:
        await storage.close()


def signed_doc(n: int) -> bytes:
    return f'<Doc xmlns="urn:test"><Item n="{n}">resilience {n}</Item></Doc>'.encode()


@pytest.mark.postgres
async def test_http_postgres_outage_is_503_and_recovers_without_restart(
        own_pg_database: tuple[str, str], make_gateway) -> None:  # noqa: ANN001, F811
    name, url = own_pg_database
    # no auth cache: every request reads its client from the database
    gw = await make_gateway(database_url=url, queue_size=200, queue_deadline_ms=60_000,
                            auth_cache_ttl_s=0)
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}

    async def sign(n: int) -> tuple[int, str | None, str | None]:
        resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=signed_doc(n), headers=headers)
        code = None if resp.status == 200 else (await resp.json())["error"]["code"]
        return resp.status, resp.headers.get("X-Document-Id"), code

    acked: set[str] = set()
    status, doc_id, _ = await sign(1)
    assert status == 200
    acked.add(doc_id)

    # idle connections killed: the pool reconnects, the next request succeeds
    assert await kill_connections(name) >= 1
    status, doc_id, _ = await sign(2)
    assert status == 200
    acked.add(doc_id)
    assert (await gw.http.get("/readyz")).status == 200

    # killed in the middle of group commits: each caller hears 200 or 503, nothing else
    tasks = [asyncio.create_task(sign(n)) for n in range(100, 140)]
    await asyncio.sleep(0.05)
    await kill_connections(name)
    results = await asyncio.gather(*tasks)
    assert {(s, c) for s, _, c in results} <= {(200, None), (503, "database_unavailable")}
    acked |= {d for s, d, _ in results if s == 200}

    # the database refuses connections: 503 and readiness says so
    await allow_connections(name, False)
    try:
        await kill_connections(name)
        status, _, code = await sign(3)
        assert (status, code) == (503, "database_unavailable")
        # reads too (before, the server's refusal came through raw: 500 internal_error)
        resp = await gw.http.get(f"/v1/documents/{doc_id}", headers=gw.auth("purchaser"))
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert (await resp.json())["error"]["code"] == "database_unavailable"
        with pytest.raises(StorageUnavailable, match="not currently accepting connections"):
            await gw.storage.get_document(doc_id)
        ready = await gw.http.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["error"]["code"] == "database_unavailable"
    finally:
        await allow_connections(name, True)

    # back: no restart needed
    status, doc_id, _ = await sign(4)
    assert status == 200
    acked.add(doc_id)
    assert (await gw.http.get("/readyz")).status == 200

    # every acknowledged document is archived with its event; nothing else is (a commit whose
    # outcome the caller could not learn may have landed: its retry gets 409, never a copy)
    stored = set(await gw.storage.document_ids(limit=10_000))
    assert acked <= stored
    signed_events = {r.subject for r in await gw.storage.audit_records(0, 10_000)
                     if r.event_type == "document.signed"}
    assert stored == signed_events
    await assert_trail_intact(gw.storage)


# --- SQLite behind the real server: the file removed ------------------------------------------

async def test_http_sqlite_file_removed_is_503_not_acknowledged(make_gateway, tmp_path: Path) -> None:  # noqa: ANN001, F811
    path = tmp_path / "served.sqlite3"
    gw = await make_gateway(database_url=f"sqlite:///{path}")
    headers = {**gw.auth("purchaser"), "Content-Type": "application/xml"}
    assert (await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=signed_doc(1), headers=headers)).status == 200
    kept = tmp_path / "kept.sqlite3"
    os.link(path, kept)
    path.unlink()
    try:
        resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=signed_doc(2), headers=headers)
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "database_unavailable"
        ready = await gw.http.get("/readyz")
        assert ready.status == 503 and (await ready.json())["error"]["code"] == "database_unavailable"
    finally:
        os.rename(kept, path)
    resp = await gw.http.post(f"/v1/sign?key={HTTP_RSA}", data=signed_doc(3), headers=headers)
    assert resp.status == 200
    assert (await gw.http.get("/readyz")).status == 200
    await assert_trail_intact(gw.storage)
    assert await gw.storage.count_documents() == 2



async def test_a_postgresql_url_with_an_impossible_port_is_database_unavailable() -> None:
    # asyncpg raises OverflowError ("port must be 0-65535") for it: `serve` reported the code
    # "OverflowError" instead of the storage's own.
    from gateway.storage.postgres import PostgresStorage

    storage = PostgresStorage("postgresql://u:secret@127.0.0.1:99999/test")
    with pytest.raises(StorageUnavailable) as err:
        await storage.open()
    assert "cannot connect to PostgreSQL" in str(err.value)
    assert "secret" not in str(err.value)
