"""Values and databases that used to break the storage, on SQLite and PostgreSQL: NUL in keys
and audit text, one bad unit in a shared commit, databases that cannot be opened or are locked,
and reports that must come back exactly as archived."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import sqlite3
import time
from pathlib import Path

import asyncpg
import pytest
from storage_backends import (
    PG_URL, Backend, drop_pg_schema, make_backend, make_pg_schema, require_postgres,
)

from gateway.audit import verify_trail
from gateway.clients import add_client
from gateway.storage import (
    AuditEvent, InvalidRecord, NewDocument, NewLink, Storage, StorageUnavailable, storage_for_url,
)
from gateway.storage.base import canonical_json
from gateway.storage.migrations import load
from gateway.storage.sqlite import SqliteStorage


def doc(n: int, **kw) -> NewDocument:  # noqa: ANN003
    return NewDocument("signed_xml", f"<d n='{n}'/>".encode(), "application/xml", client="c1",
                       natural_key=f"k-{n}", **kw)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# --- NUL ---------------------------------------------------------------------------------------

async def test_lookups_with_nul_find_nothing(storage: Storage) -> None:
    """PostgreSQL text cannot hold NUL: a lookup by such a key (GET /v1/documents/ab%00cd, a
    token id) is "not found", not a database error."""
    await storage.commit_unit(documents=[doc(1)])
    await add_client(storage, "c1", "purchaser")
    assert await storage.get_document("ab\x00cd") is None
    assert await storage.find_document("signed_xml", "k-1\x00") is None
    assert await storage.list_documents(kind="signed\x00xml", client="c\x001") == []
    assert await storage.links("ab\x00cd") == []
    assert await storage.get_client("c\x001") is None
    assert await storage.client_by_token_id("\x00") is None


async def test_nul_in_audit_and_document_text_is_written(storage: Storage) -> None:
    """A refusal whose key label carries NUL is still audited (NUL as U+FFFD, the same on both
    engines), and so is a document whose names carry one."""
    (rec,) = await storage.append_audit(AuditEvent(
        "sign.refused", "client\x00x", "refused", subject="key\x00label", request_id="r\x00",
        details={"label": "key\x00label", "key\x00": 1}))
    assert (rec.actor, rec.subject, rec.request_id) == ("client\ufffdx", "key\ufffdlabel", "r\ufffd")
    assert rec.details == {"label": "key\x00label", "key\x00": 1}  # JSON escapes it: kept as is
    stored = (await storage.audit_records())[0]
    assert stored == rec

    d = NewDocument("signed\x00xml", b"\x00<a/>", "application/xml\x00", client="c\x00",
                    key_label="k\x00", natural_key="n\x00")
    await storage.commit_unit(documents=[d], links=[NewLink(d.id, "note\x00", {"x": 1},
                                                            client="c\x00")])
    got = await storage.find_document("signed\ufffdxml", "n\ufffd")
    assert got is not None and got.content == b"\x00<a/>"
    assert (got.content_type, got.client, got.key_label) == (
        "application/xml\ufffd", "c\ufffd", "k\ufffd")
    assert [ln.kind for ln in await storage.links(d.id)] == ["note\ufffd"]
    assert (await verify_trail(storage, None)).ok


# --- one bad unit in a shared commit -----------------------------------------------------------

async def _batch_with(storage: Storage, bad: object) -> list[object]:
    """Twenty good units and one bad one, submitted together so they share commits."""
    good = [storage.commit_unit(documents=[doc(n)], audit=[AuditEvent("sign", "c1", "success")])
            for n in range(20)]
    units = good[:10] + [bad] + good[10:]
    return await asyncio.gather(*units, return_exceptions=True)


async def test_deeply_nested_details_fail_alone(backend: Backend, storage: Storage) -> None:
    batches = storage.committer.batches
    results = await _batch_with(storage, storage.commit_unit(
        documents=[doc(99)], audit=[AuditEvent("sign", "c1", "success", details=nested(2000))]))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], InvalidRecord), failures
    assert failures[0].code == "invalid_record"
    assert storage.committer.batches - batches < 21  # they did share commits
    assert (await backend.raw("SELECT count(*) FROM documents"))[0][0] == 20
    assert (await storage.audit_head())[0] == 20
    assert (await verify_trail(storage, None)).ok


async def test_key_lengths_are_bounded_up_front() -> None:
    with pytest.raises(InvalidRecord, match="natural_key is longer than 1024 bytes"):
        NewDocument("signed_xml", b"x", "application/xml", natural_key="é" * 600)
    with pytest.raises(InvalidRecord, match="kind"):
        NewDocument("k" * 129, b"x", "application/xml")
    NewDocument("k" * 128, b"x", "application/xml", natural_key="n" * 1024)  # at the limits


@pytest.mark.postgres
async def test_postgres_index_row_too_large_fails_alone(tmp_path: Path) -> None:
    """Past the up-front bound (set aside here), PostgreSQL refuses an index row over 2,704
    bytes with ProgramLimitExceeded: that unit fails, the others of its commit do not."""
    backend = await make_backend("postgresql", tmp_path)
    try:
        async with backend.storage() as storage:
            huge = doc(99)
            object.__setattr__(huge, "natural_key", secrets.token_hex(5000))  # incompressible
            results = await _batch_with(storage, storage.commit_unit(
                documents=[huge], audit=[AuditEvent("sign", "c1", "success")]))
            failures = [r for r in results if isinstance(r, BaseException)]
            assert len(failures) == 1 and isinstance(failures[0], InvalidRecord), failures
            assert "index row" in failures[0].message
            assert (await backend.raw("SELECT count(*) FROM documents"))[0][0] == 20
            assert (await verify_trail(storage, None)).ok
    finally:
        await drop_pg_schema(backend.schema)


# --- opening ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", ["directory", "not_a_database"])
async def test_sqlite_that_cannot_be_opened_is_unavailable(tmp_path: Path, make: str) -> None:
    path = tmp_path / "gateway.sqlite3"
    if make == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not a database file, " * 100)
    for read_only in (False, True):
        with pytest.raises(StorageUnavailable) as err:
            await SqliteStorage(path, read_only=read_only).open()
        assert err.value.code == "database_unavailable"


async def test_sqlite_read_only_refuses_a_missing_database(tmp_path: Path) -> None:
    path = tmp_path / "absent.sqlite3"
    with pytest.raises(StorageUnavailable, match="no database"):
        await SqliteStorage(path, read_only=True).open()
    assert not path.exists()
    path.touch()  # an empty file holds no gateway database either
    with pytest.raises(StorageUnavailable, match="no gateway database"):
        await SqliteStorage(path, read_only=True).open()
    assert path.stat().st_size == 0


async def test_sqlite_locked_database(tmp_path: Path) -> None:
    """Another process holds the write lock (a busy gateway). Opening to write waits the busy
    timeout, then says the database is unavailable; opening to read does not wait at all."""
    path = tmp_path / "gateway.sqlite3"
    async with SqliteStorage(path) as storage:
        await storage.append_audit(AuditEvent("sign", "c1", "success"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageUnavailable) as err:
            await SqliteStorage(path, busy_timeout_s=0.2).open()
        assert err.value.code == "database_unavailable" and "locked" in err.value.message
        started = time.monotonic()
        async with SqliteStorage(path, read_only=True) as reader:  # busy timeout 30 s
            assert [r.seq for r in await reader.audit_records()] == [1]
            assert (await verify_trail(reader, None)).ok
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.postgres
@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:5432/gw_no_such_database",
                                 "postgresql://gw_no_such_role@127.0.0.1:5432/test"])
async def test_postgres_unknown_database_or_role_is_unavailable(url: str) -> None:
    await require_postgres()
    with pytest.raises(StorageUnavailable) as err:
        await storage_for_url(url).open()
    assert err.value.code == "database_unavailable"


@pytest.mark.postgres
async def test_postgres_read_only_refuses_an_empty_schema() -> None:
    await require_postgres()
    schema = await make_pg_schema()
    try:
        reader = storage_for_url(PG_URL, server_settings={"search_path": schema}, read_only=True)
        with pytest.raises(StorageUnavailable, match="no gateway schema"):
            await reader.open()
        backend = Backend("postgresql", PG_URL, schema=schema)
        assert await backend.raw("SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = $1", schema) == []
    finally:
        await drop_pg_schema(schema)


# --- reports come back as archived --------------------------------------------------------------

REPORT = {"big": 1e20, "negative_zero": -0.0, "small": 1e-7, "sum": 0.1 + 0.2, "int": 10**20,
          "text": "Élysée ✓ \x00"}


async def test_report_is_kept_exactly(backend: Backend, storage: Storage) -> None:
    d = doc(1, report=REPORT)
    await storage.commit_unit(documents=[d])
    got = (await storage.get_document(d.id)).report
    assert canonical_json(got) == canonical_json(REPORT)  # floats stay floats, -0.0 its sign
    assert type(got["big"]) is float and math.copysign(1, got["negative_zero"]) == -1
    (raw,) = (await backend.raw(f"SELECT report FROM documents WHERE id = {backend.p(1)}", d.id))[0]
    assert raw == canonical_json(REPORT)


@pytest.mark.postgres
async def test_postgres_report_migration_keeps_earlier_reports(tmp_path: Path) -> None:
    """A database made by migration 0001 (report as jsonb) is migrated to text; a report stored
    before still reads back."""
    backend = await make_backend("postgresql", tmp_path)
    first = load("postgresql")[0]
    assert first.version == 1
    # 0001 applied by hand, as a gateway of the earlier version did
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": backend.schema})
    try:
        await conn.execute(first.sql)
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'core')")
        await conn.execute(
            "INSERT INTO documents (id, kind, content_type, content, sha256, report, created_at, "
            "retain_until) VALUES ('old', 'signed_xml', 'application/xml', '\\x00', $1, "
            "'{\"n\": 1.5}'::jsonb, now(), now() + interval '3 years')", "0" * 64)
    finally:
        await conn.close()
    try:
        async with backend.storage() as storage:
            assert await storage.schema_versions() == [m.version for m in load("postgresql")]
            assert (await storage.get_document("old")).report == {"n": 1.5}
        (kind,) = (await backend.raw("SELECT data_type FROM information_schema.columns WHERE "
                                     "table_schema = $1 AND table_name = 'documents' AND "
                                     "column_name = 'report'", backend.schema))[0]
        assert kind == "text"
    finally:
        await drop_pg_schema(backend.schema)
