"""The archive, linked records, migrations and units of work, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from datetime import timedelta

import pytest
from storage_backends import Backend, drop_pg_schema, make_backend

from gateway.audit import verify_trail
from gateway.storage import (
    AuditEvent, DocumentNotFound, DuplicateDocument, InvalidRecord, NewDocument, NewLink, Storage,
    StorageUnavailable, storage_for_url,
)
from gateway.storage.base import minimum_retention, utcnow
from gateway.storage.migrations import load

ALL_BYTES = bytes(range(256)) * 3 + b"<?xml version='1.0'?>\r\n<a>\x00</a>"


def order(number: str, dea: str = "AB1234563", **kw) -> NewDocument:
    return NewDocument("csos_order", b"<CSOSOrder>" + number.encode() + b"</CSOSOrder>",
                       "application/xml", client="purchaser-1", key_label="k-purchaser",
                       natural_key=f"{number}|{dea}", **kw)


async def count(backend: Backend, table: str) -> int:
    return (await backend.raw(f"SELECT count(*) FROM {table}"))[0][0]


# --- migrations ----------------------------------------------------------------------------------

async def test_migrations_applied_once_and_idempotent(backend: Backend) -> None:
    versions = [m.version for m in load(backend.name)]
    assert versions and versions == sorted(versions)
    async with backend.storage() as first:
        assert await first.schema_versions() == versions
        assert await first.migrate() == []  # nothing left to apply
    async with backend.storage() as again:  # a restart applies nothing either
        assert await again.migrate() == []
    rows = await backend.raw("SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == versions


async def test_two_storages_starting_at_once_migrate_once(backend: Backend) -> None:
    a, b = backend.storage(), backend.storage()
    await asyncio.gather(a.open(), b.open())
    try:
        rows = await backend.raw("SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in rows) == [m.version for m in load(backend.name)]
    finally:
        await a.close()
        await b.close()


def test_both_engines_have_the_same_migration_numbers() -> None:
    assert [m.version for m in load("sqlite")] == [m.version for m in load("postgresql")]


# --- archive -------------------------------------------------------------------------------------

async def test_archive_round_trip_byte_for_byte(storage: Storage) -> None:
    report = {"indication": "valid", "checks": [{"code": "signature", "ok": True}], "n": 1.5,
              "text": "Pharmacie Élysée ✓"}
    doc = NewDocument("signed_xml", ALL_BYTES, "application/xml", client="c1", key_label="k1",
                      report=report, natural_key="n-1")
    result = await storage.commit_unit(documents=[doc])
    assert result.document_ids == (doc.id,)

    got = await storage.get_document(doc.id)
    assert got is not None
    assert got.content == ALL_BYTES
    assert got.sha256 == hashlib.sha256(ALL_BYTES).hexdigest()
    assert got.report == report
    assert (got.kind, got.content_type, got.client, got.key_label, got.natural_key) == (
        "signed_xml", "application/xml", "c1", "k1", "n-1")
    # kept at least two years (21 CFR 1305.27)
    assert got.retain_until >= minimum_retention(got.created_at)
    assert abs(got.created_at - utcnow()) < timedelta(minutes=1)

    assert (await storage.find_document("signed_xml", "n-1")) == got
    assert await storage.find_document("signed_xml", "other") is None
    assert await storage.get_document("no-such-id") is None


async def test_list_documents_filters(storage: Storage) -> None:
    a, b = order("26X000001"), order("26X000002")
    c = NewDocument("newrx", b"rx", "application/xml", client="pharmacy-1")
    await storage.commit_unit(documents=[a, b])
    await storage.commit_unit(documents=[c])
    orders = await storage.list_documents(kind="csos_order")
    assert [d.id for d in orders] == [a.id, b.id]
    assert [d.id for d in await storage.list_documents(client="pharmacy-1")] == [c.id]
    start = orders[0].created_at
    assert len(await storage.list_documents(created_from=start)) == 3
    assert await storage.list_documents(created_to=start) == []
    assert len(await storage.list_documents(limit=2)) == 2


async def test_retention_shorter_than_two_years_refused(backend: Backend, storage: Storage) -> None:
    short = NewDocument("signed_cms", b"x", "application/pkcs7-signature",
                        retain_until=utcnow() + timedelta(days=365))
    with pytest.raises(InvalidRecord):
        await storage.commit_unit(documents=[short], audit=[AuditEvent("sign", "c", "success")])
    assert await count(backend, "documents") == 0
    assert await count(backend, "audit_log") == 0
    longer = dataclasses.replace(short, retain_until=utcnow() + timedelta(days=365 * 7))
    await storage.commit_unit(documents=[longer])
    assert (await storage.get_document(longer.id)).retain_until == longer.retain_until


async def test_duplicate_natural_key_refused_and_nothing_written(backend: Backend,
                                                                 storage: Storage) -> None:
    first = order("26X000123")
    await storage.commit_unit(documents=[first], audit=[AuditEvent("order_received", "s", "success")])
    head = await storage.audit_head()

    again = order("26X000123")  # same order number and purchaser: the same order
    with pytest.raises(DuplicateDocument) as err:
        await storage.commit_unit(documents=[again], links=[NewLink(again.id, "note", {"x": 1})],
                                  audit=[AuditEvent("order_received", "s", "success")])
    assert err.value.code == "duplicate_document"
    assert err.value.existing_id == first.id
    assert await storage.get_document(again.id) is None
    assert await storage.audit_head() == head
    assert await count(backend, "documents") == 1
    assert await count(backend, "links") == 0

    # another purchaser may use the same order number
    other = order("26X000123", dea="BC2345671")
    await storage.commit_unit(documents=[other])
    assert await storage.get_document(other.id) is not None


async def test_duplicate_inside_one_batch_fails_alone(backend: Backend, storage: Storage) -> None:
    """Concurrent units share a commit; the duplicate one fails, the others commit."""
    docs = [order(f"26X{n:06d}") for n in range(20)]
    dup = order("26X000007")
    units = [storage.commit_unit(documents=[d], audit=[AuditEvent("sign", "c", "success", d.id)])
             for d in docs[:10]]
    units.append(storage.commit_unit(documents=[dup], audit=[AuditEvent("sign", "c", "success")]))
    units += [storage.commit_unit(documents=[d], audit=[AuditEvent("sign", "c", "success", d.id)])
              for d in docs[10:]]
    results = await asyncio.gather(*units, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], DuplicateDocument)
    assert failures[0].existing_id == docs[7].id
    assert await count(backend, "documents") == 20
    assert (await verify_trail(storage, None)).records_checked == 20
    assert (await storage.audit_head())[0] == 20


async def test_links_round_trip_and_unknown_document(storage: Storage) -> None:
    doc = order("26X000200")
    r1 = await storage.commit_unit(documents=[doc], links=[
        NewLink(doc.id, "shipment", {"line": 1, "packages": 2, "shipped_on": "2026-11-27"},
                client="supplier-1")])
    r2 = await storage.commit_unit(links=[NewLink(doc.id, "receipt", {"line": 1, "packages": 2})])
    links = await storage.links(doc.id)
    assert [ln.id for ln in links] == [*r1.link_ids, *r2.link_ids]
    assert [ln.kind for ln in links] == ["shipment", "receipt"]
    assert links[0].payload == {"line": 1, "packages": 2, "shipped_on": "2026-11-27"}
    assert links[0].client == "supplier-1"
    assert [ln.kind for ln in await storage.links(doc.id, kind="receipt")] == ["receipt"]

    head = await storage.audit_head()  # the unit that archived doc got its own event
    with pytest.raises(DocumentNotFound):
        await storage.commit_unit(links=[NewLink("missing", "shipment", {})],
                                  audit=[AuditEvent("ship", "s", "success")])
    assert await storage.audit_head() == head


# --- append-only, enforced by the database -------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE documents SET content_type = 'text/plain'",
    "DELETE FROM documents",
    "UPDATE links SET payload = '{}'",
    "DELETE FROM links",
    "UPDATE audit_log SET actor = 'someone'",
    "DELETE FROM audit_log",
    "UPDATE audit_checkpoints SET seq = 0",
    "DELETE FROM audit_checkpoints",
    "DELETE FROM audit_head",
    "UPDATE audit_head SET seq = 0",
    "DELETE FROM clients",
])
async def test_database_refuses_changes_to_history(backend: Backend, storage: Storage,
                                                   statement: str) -> None:
    doc = order("26X000300")
    await storage.commit_unit(documents=[doc], links=[NewLink(doc.id, "shipment", {"line": 1})],
                              audit=[AuditEvent("sign", "c", "success", doc.id)])
    await storage.add_checkpoint(1, "0" * 64, utcnow(), "audit", "rsa-sha256", b"sig")
    from gateway.clients import add_client
    await add_client(storage, "c1", "purchaser")
    table = statement.split()[1] if statement.startswith("UPDATE") else statement.split()[2]
    before = await count(backend, table)
    with pytest.raises(Exception, match="append-only|never deleted|only moves forward") as err:
        await backend.raw(statement)
    assert "append-only" in str(err.value) or "never" in str(err.value) or "forward" in str(err.value)
    assert await count(backend, table) == before
    assert (await storage.get_document(doc.id)).content_type == "application/xml"


@pytest.mark.parametrize("statement", [
    "INSERT OR REPLACE INTO audit_log (seq, time, event_type, actor, outcome, subject, details, "
    "request_id, prev_hash, hash) SELECT seq, time, event_type, 'someone else', outcome, subject, "
    "details, request_id, prev_hash, hash FROM audit_log WHERE seq = 1",
    "INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, 0, 'x')",
    "REPLACE INTO documents (id, kind, content, content_type, sha256, report, client, key_label, "
    "natural_key, created_at, retain_until) SELECT id, kind, x'00', content_type, sha256, report, "
    "client, key_label, natural_key, created_at, retain_until FROM documents",
    "INSERT OR REPLACE INTO audit_checkpoints (id, seq, hash, time, key_label, algorithm, signature) "
    "SELECT id, seq, hash, time, key_label, algorithm, x'00' FROM audit_checkpoints",
])
async def test_sqlite_replace_cannot_rewrite_history(tmp_path, statement: str) -> None:  # noqa: ANN001
    """REPLACE deletes the old row without firing delete triggers unless recursive triggers are
    on: the gateway's own connections turn them on, so a REPLACE is refused like a DELETE."""
    import sqlite3

    from gateway.storage.sqlite import SqliteStorage

    async with SqliteStorage(tmp_path / "g.sqlite3") as storage:
        doc = order("26X000310")
        await storage.commit_unit(documents=[doc], audit=[AuditEvent("sign", "c", "success", doc.id)])
        await storage.add_checkpoint(*await storage.audit_head(), utcnow(), "audit", "rsa-sha256", b"sig")
        with pytest.raises(sqlite3.IntegrityError, match="append-only|never deleted|forward"):
            await storage._on_writer(lambda c: c.execute(statement))
        assert (await storage.get_document(doc.id)).content == doc.content
        assert (await storage.audit_records())[0].actor == "c"
        assert (await storage.checkpoints())[0].signature == b"sig"
        assert (await verify_trail(storage, None)).ok


async def test_sqlite_database_file_is_owner_only(tmp_path) -> None:  # noqa: ANN001
    """The archive holds patient data and token hashes; its -wal and -shm files follow its mode."""
    from gateway.storage.sqlite import SqliteStorage

    path = tmp_path / "g.sqlite3"
    async with SqliteStorage(path) as storage:
        await storage.commit_unit(documents=[order("26X000320")])
        for name in ("g.sqlite3", "g.sqlite3-wal", "g.sqlite3-shm"):
            assert oct((tmp_path / name).stat().st_mode & 0o777) == "0o600", name


@pytest.mark.postgres
async def test_postgres_refuses_truncate(tmp_path) -> None:  # noqa: ANN001
    """Row triggers do not fire on TRUNCATE; statement triggers refuse it too."""
    backend = await make_backend("postgresql", tmp_path)
    try:
        async with backend.storage() as storage:
            await storage.commit_unit(documents=[order("26X000400")])
            for table in ("documents", "links", "audit_log", "audit_checkpoints", "clients",
                          "audit_head"):
                with pytest.raises(Exception, match="append-only"):
                    await backend.raw(f"TRUNCATE {table} CASCADE")
            assert await count(backend, "documents") == 1
    finally:
        await drop_pg_schema(backend.schema)


# --- units of work -------------------------------------------------------------------------------

async def test_failing_audit_insert_leaves_no_document(backend: Backend, storage: Storage) -> None:
    """The audit row is refused by the database itself (CHECK on outcome): the document and link
    written before it in the same unit are rolled back."""
    doc = order("26X000500")
    bad = AuditEvent("sign", "c", "success", doc.id)
    object.__setattr__(bad, "outcome", "maybe")  # past the Python check, to reach the database
    with pytest.raises(InvalidRecord):
        await storage.commit_unit(documents=[doc], links=[NewLink(doc.id, "note", {"a": 1})],
                                  audit=[AuditEvent("sign", "c", "success"), bad])
    assert await storage.get_document(doc.id) is None
    assert await count(backend, "documents") == 0
    assert await count(backend, "links") == 0
    assert await count(backend, "audit_log") == 0
    assert await storage.audit_head() == (0, "0" * 64)

    # an audit event whose details are not JSON fails the same way, and the storage still works
    doc2 = order("26X000501")
    with pytest.raises(InvalidRecord):
        await storage.commit_unit(documents=[doc2], audit=[
            AuditEvent("sign", "c", "success", details={"when": object()})])
    assert await storage.get_document(doc2.id) is None
    ok = await storage.commit_unit(documents=[doc2], audit=[AuditEvent("sign", "c", "success")])
    assert ok.audit[0].seq == 1


async def test_group_commit_200_concurrent_writers(backend: Backend, storage: Storage) -> None:
    docs = [NewDocument("signed_xml", f"<doc n='{i}'/>".encode(), "application/xml",
                        client=f"c{i % 7}", natural_key=f"n{i}") for i in range(200)]
    results = await asyncio.gather(*[
        storage.commit_unit(documents=[d], audit=[AuditEvent("sign", f"c{i % 7}", "success", d.id)])
        for i, d in enumerate(docs)])
    # every caller got its own document back and a distinct place in the chain
    assert [r.document_ids for r in results] == [(d.id,) for d in docs]
    seqs = sorted(r.audit[0].seq for r in results)
    assert seqs == list(range(1, 201))
    # all durable and readable, byte for byte, by a fresh storage (another connection)
    async with backend.storage() as other:
        for d in docs[::17]:
            assert (await other.get_document(d.id)).content == d.content
    assert await count(backend, "documents") == 200
    # commits were shared: far fewer batches than units
    assert storage.committer.units >= 200
    assert storage.committer.batches < 100
    assert (await verify_trail(storage, None)).ok


async def test_writer_task_gone_leaves_no_caller_waiting(tmp_path) -> None:  # noqa: ANN001
    """If the group-commit task dies (cancelled at an abrupt shutdown), every caller hears of it:
    committed, or StorageUnavailable; none waits for ever, and later writes are refused."""
    from gateway.storage.sqlite import SqliteStorage

    storage = SqliteStorage(tmp_path / "g.sqlite3")
    await storage.open()
    try:
        writers = [asyncio.create_task(storage.commit_unit(documents=[order(f"26X{n:06d}")]))
                   for n in range(50)]
        await asyncio.sleep(0)  # queued
        storage.committer._task.cancel()
        done, pending = await asyncio.wait(writers, timeout=10)
        assert not pending
        outcomes = {type(t.exception()).__name__ if t.exception() else "committed" for t in done}
        assert outcomes <= {"committed", "StorageUnavailable"} and "StorageUnavailable" in outcomes
        with pytest.raises(StorageUnavailable):
            await storage.commit_unit(documents=[order("26X999999")])
    finally:
        await storage.close()


async def test_acknowledged_means_committed_after_close(backend: Backend) -> None:
    s = backend.storage()
    await s.open()
    pending = [asyncio.create_task(s.commit_unit(documents=[order(f"26X{n:06d}")]))
               for n in range(30)]
    await asyncio.sleep(0)
    await s.close()  # drains what is queued before closing
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results)
    assert await count(backend, "documents") == 30
    with pytest.raises(StorageUnavailable):
        await s.commit_unit(documents=[order("26X999999")])
    await s.open()  # a closed storage can be opened again
    try:
        await s.commit_unit(documents=[order("26X999999")])
    finally:
        await s.close()
    assert await count(backend, "documents") == 31


async def test_health_check_writes(storage: Storage) -> None:
    await storage.health_check()
    await storage.health_check()


@pytest.mark.postgres
async def test_postgres_unreachable_is_unavailable() -> None:
    s = storage_for_url("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=2)
    with pytest.raises(StorageUnavailable) as err:
        await s.open()
    assert err.value.code == "database_unavailable"


def test_unsupported_url() -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        storage_for_url("mysql://x")


async def test_sqlite_default_file_wal_and_full_sync(tmp_path) -> None:  # noqa: ANN001
    """The default engine: <home>/gateway.sqlite3, WAL journal, commits fsynced (synchronous=FULL)."""
    from gateway.config import Settings
    from gateway.storage import open_storage
    from gateway.storage.sqlite import SqliteStorage

    settings = Settings(home=tmp_path / "home")
    storage = open_storage(settings)
    assert isinstance(storage, SqliteStorage) and storage.path == settings.sqlite_path
    async with storage:
        await storage.commit_unit(documents=[order("26X000900")])
        sync = await storage._on_writer(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
    import sqlite3
    conn = sqlite3.connect(settings.sqlite_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM documents").fetchone()[0] == 1
    finally:
        conn.close()
