"""What `audit verify` catches beyond the chain itself, on SQLite and PostgreSQL: checkpoints
deleted before a rewrite, archived documents edited, deleted or slipped in, and rows edited so
that they no longer decode. Tampering goes through plain SQL after removing the triggers, as an
attacker with database access would.
"""

from __future__ import annotations

import asyncio
import hashlib

from cryptography.hazmat.primitives.asymmetric import rsa
from storage_backends import Backend, make_backend
from test_audit_trail import fill, rehash, trail_with_checkpoint

from gateway.audit import AuditKey, make_checkpoint, verify_trail
from gateway.storage import AuditEvent, NewDocument, Storage
from gateway.storage.base import ARCHIVED_KEY, ARCHIVED_ROW_KEY, format_time, utcnow


def doc(n: int, client: str = "c1") -> NewDocument:
    return NewDocument("signed_xml", f"<signed n='{n}'/>".encode(), "application/xml",
                       client=client, key_label="k1", natural_key=f"n-{n}")


# --- finding: a rewrite after deleting the covering checkpoint ---------------------------------

async def test_rewrite_after_deleting_the_checkpoint_is_caught(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        audit_public_key: rsa.RSAPublicKey) -> None:
    """Records 1-8, checkpoint at 8 (its record is 9), 10-12. The attacker deletes the
    checkpoint row, edits record 5 and re-hashes the chain: no checkpoint is left to disagree,
    but record 9 still names the checkpoint that pinned the old history."""
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_checkpoints")
    await backend.raw("DELETE FROM audit_checkpoints")
    await backend.drop_protection("audit_log")
    await backend.raw(f"UPDATE audit_log SET actor = 'nobody' WHERE seq = {backend.p(1)}", 5)
    await rehash(backend, storage, 5)
    for key in (audit_public_key, None):
        result = await verify_trail(storage, key)
        assert (result.ok, result.first_bad_seq, result.problem) == (
            False, 9, "checkpoint_missing"), result
        assert "checkpoint 1" in result.message


async def test_checkpoint_record_must_agree_with_its_checkpoint(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        audit_public_key: rsa.RSAPublicKey) -> None:
    """The record of a checkpoint says which seq and hash it signed: a record claiming another
    seq (rewritten and re-hashed) no longer matches the row."""
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"UPDATE audit_log SET subject = '7' WHERE seq = {backend.p(1)}", 9)
    await rehash(backend, storage, 9)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 9, "checkpoint_mismatch")


async def test_checkpoints_made_while_verifying_are_not_taken_for_missing(
        storage: Storage, audit_key: AuditKey, audit_public_key: rsa.RSAPublicKey) -> None:
    """A live gateway checkpoints while `audit verify` reads (with small pages): a checkpoint
    stored after its page was read, and its record, are matched, never reported missing."""
    await fill(storage, 5)
    stop = asyncio.Event()

    async def gateway() -> None:
        i = 5
        while not stop.is_set():
            await fill(storage, 2, start=i)
            i += 2
            await make_checkpoint(storage, audit_key)

    task = asyncio.create_task(gateway())
    results = []
    try:
        # at least 30 runs, and on until the gateway has checkpointed a few times meanwhile
        # (a loaded machine signs slowly)
        while len(results) < 30 or (len(await storage.checkpoints()) <= 3 and len(results) < 600):
            results.append(await verify_trail(storage, audit_public_key, page=len(results) % 3 + 1))
    finally:
        stop.set()
        await task
    assert [r.message for r in results if not r.ok] == []
    final = await verify_trail(storage, audit_public_key, page=2)
    assert final.ok and final.checkpoints_checked == len(await storage.checkpoints()) > 3


# --- finding: the archive is pinned by the chain -----------------------------------------------

async def test_each_unit_chains_the_hash_of_what_it_archives(storage: Storage) -> None:
    """The audit event of a unit carries SHA-256 of every document it archives (a detached CMS
    signature and its content both); a unit without an event of its own gets one."""
    content, signature = doc(1), doc(2)
    committed = await storage.commit_unit(documents=[content, signature], audit=[
        AuditEvent("document.signed", "c1", "success", subject=signature.id,
                   details={"content_sha256": "x" * 64})])
    (rec,) = committed.audit
    assert rec.details[ARCHIVED_KEY] == {
        content.id: hashlib.sha256(content.content).hexdigest(),
        signature.id: hashlib.sha256(signature.content).hexdigest()}
    assert rec.details["content_sha256"] == "x" * 64  # the caller's details kept
    alone = doc(3)
    (auto,) = (await storage.commit_unit(documents=[alone])).audit
    assert (auto.event_type, auto.actor, auto.subject) == ("document.archived", "c1", alone.id)
    assert auto.details[ARCHIVED_KEY] == {alone.id: hashlib.sha256(alone.content).hexdigest()}
    assert set(auto.details) == {ARCHIVED_KEY, ARCHIVED_ROW_KEY}
    result = await verify_trail(storage, None)
    assert result.ok and result.documents_checked == 3, result


async def test_modified_archived_document_is_named(backend: Backend, storage: Storage) -> None:
    await fill(storage, 2)
    docs = [doc(n) for n in range(3)]
    for d in docs:
        await storage.commit_unit(documents=[d], audit=[AuditEvent("document.signed", "c1",
                                                                   "success", subject=d.id)])
    await backend.drop_protection("documents")
    # the content and its stored sha256 column both rewritten: only the chain still knows
    forged = b"<signed n='1' quantity='5000'/>"
    await backend.raw(f"UPDATE documents SET content = {backend.p(1)}, sha256 = {backend.p(2)} "
                      f"WHERE id = {backend.p(3)}", forged, hashlib.sha256(forged).hexdigest(),
                      docs[1].id)
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
        False, 4, "document_modified", docs[1].id), result
    assert docs[1].id in result.message


async def test_deleted_archived_document_is_named(backend: Backend, storage: Storage) -> None:
    docs = [doc(n) for n in range(3)]
    for d in docs:
        await storage.commit_unit(documents=[d])
    await backend.drop_protection("documents")
    await backend.raw(f"DELETE FROM documents WHERE id = {backend.p(1)}", docs[2].id)
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
        False, 3, "document_missing", docs[2].id), result


async def test_document_slipped_into_the_archive_is_named(backend: Backend,
                                                          storage: Storage) -> None:
    await storage.commit_unit(documents=[doc(1)])
    now = utcnow()
    created = now if backend.name == "postgresql" else format_time(now)
    retain = (now.replace(year=now.year + 3) if backend.name == "postgresql"
              else format_time(now.replace(year=now.year + 3)))
    p = backend.p
    await backend.raw(
        "INSERT INTO documents (id, kind, content, content_type, sha256, client, created_at, "
        f"retain_until) VALUES ({p(1)}, 'signed_xml', {p(2)}, 'application/xml', {p(3)}, 'c1', "
        f"{p(4)}, {p(5)})", "inserted-behind-the-gateway", b"<x/>", "0" * 64, created, retain)
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
        False, None, "document_unchained", "inserted-behind-the-gateway"), result


# --- finding: rows that no longer decode --------------------------------------------------------

async def test_undecodable_details_are_a_failure_at_that_record(backend: Backend,
                                                                storage: Storage) -> None:
    await fill(storage, 9)
    await backend.drop_protection("audit_log")
    p = backend.p
    for seq, details in ((3, "{not json"), (4, "[1, 2]"), (5, "[" * 100_000),
                         (6, '{"i": NaN}'), (7, '{"i": 1e400}'), (8, '{"i": ' + "9" * 5000 + "}")):
        await backend.raw(f"UPDATE audit_log SET details = {p(1)} WHERE seq = {p(2)}",
                          details, seq)
    records = await storage.audit_records()
    assert [r.seq for r in records] == list(range(1, 10))
    assert [r.damaged for r in records] == [None] * 2 + ["unreadable details"] * 6 + [None]
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 3, "record_undecodable")


async def test_sqlite_undecodable_columns(tmp_path, audit_key: AuditKey) -> None:  # noqa: ANN001
    """SQLite keeps whatever a column is given: a time that is not a time, a blob for text."""
    backend = await make_backend("sqlite", tmp_path)
    async with backend.storage() as storage:
        await fill(storage, 4)
        await make_checkpoint(storage, audit_key)
        await backend.drop_protection("audit_log")
        await backend.drop_protection("audit_checkpoints")
        await backend.raw("UPDATE audit_log SET time = 'yesterday' WHERE seq = 2")
        await backend.raw("UPDATE audit_log SET actor = x'00ff' WHERE seq = 3")
        await backend.raw("UPDATE audit_checkpoints SET time = 'soon', signature = 'text'")
        records = await storage.audit_records()
        assert records[1].damaged == "unreadable time"
        assert records[2].damaged == "unreadable actor"
        (cp,) = await storage.checkpoints()
        assert cp.damaged == "unreadable time, signature"
        result = await verify_trail(storage, None)
        assert (result.ok, result.first_bad_seq, result.problem) == (
            False, 2, "record_undecodable")


async def test_sqlite_checkpoint_seq_edited_into_text(tmp_path, audit_key: AuditKey) -> None:  # noqa: ANN001
    """A seq that is not a number sorts after every number in SQLite: the checkpoint is reported,
    and paging through the checkpoints does not read the same rows for ever."""
    backend = await make_backend("sqlite", tmp_path)
    async with backend.storage() as storage:
        for n in range(4):
            await fill(storage, 2, start=2 * n)
            await make_checkpoint(storage, audit_key)
        await backend.drop_protection("audit_checkpoints")
        await backend.raw("UPDATE audit_checkpoints SET seq = 'eleven' WHERE id = 2")
        for page in (1, 2, 3):  # met where its record names it, or where it is read
            result = await asyncio.wait_for(verify_trail(storage, None, page=page), 10)
            assert not result.ok and result.first_bad_seq <= 6, result
            assert result.problem in ("record_undecodable", "checkpoint_missing"), result
        result = await asyncio.wait_for(verify_trail(storage, None), 10)
        assert (result.ok, result.problem) == (False, "record_undecodable"), result
        assert "checkpoint 2: unreadable seq" in result.message


# --- finding: checkpoints are not all loaded ----------------------------------------------------

async def test_last_checkpoint_and_paged_verification(storage: Storage, audit_key: AuditKey,
                                                      audit_public_key: rsa.RSAPublicKey,
                                                      monkeypatch) -> None:  # noqa: ANN001
    assert await storage.last_checkpoint() is None
    for n in range(5):
        await fill(storage, 2, start=2 * n)
        await make_checkpoint(storage, audit_key)
    await storage.add_checkpoint(3, (await storage.audit_records(2, 1))[0].hash, utcnow(),
                                 audit_key.label, audit_key.algorithm,
                                 audit_key.sign(b"not the payload"))  # low seq, highest id
    everything = await storage.checkpoints()
    assert [c.seq for c in everything] == [2, 3, 5, 8, 11, 14]
    assert (await storage.last_checkpoint()) == everything[-1]
    assert [c.seq for c in await storage.checkpoints(after=(3, everything[1].id), limit=2)] == [5, 8]

    # neither making a checkpoint nor verifying reads every checkpoint at once
    real = storage.checkpoints

    async def paged_only(after=None, limit=None):  # noqa: ANN001, ANN202
        assert limit is not None, "all checkpoints read at once"
        return await real(after, limit)

    monkeypatch.setattr(storage, "checkpoints", paged_only)
    assert await make_checkpoint(storage, audit_key) is None  # head already checkpointed
    result = await verify_trail(storage, audit_public_key, page=2)
    assert (result.ok, result.first_bad_seq, result.problem) == (
        False, 3, "checkpoint_signature_invalid")


# --- upgrade: documents archived before audit events carried their hashes ----------------------

async def database_before_chained_documents(backend: Backend, contents: list[bytes]) -> list[str]:
    """A database as the gateway left it before migration 0003: migrations 0001-0002 applied,
    documents archived with no audit record naming them. Their ids."""
    from gateway.storage.migrations import load, split_sqlite

    old = [m for m in load(backend.name) if m.version <= 2]
    now = format_time(utcnow())
    if backend.name == "sqlite":
        await backend.raw("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                          "name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        for m in old:
            for statement in split_sqlite(m.sql):
                await backend.raw(statement)
            await backend.raw("INSERT INTO schema_migrations VALUES (?, ?, ?)", m.version, m.name, now)
    else:
        await backend.raw("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                          "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for m in old:
            await _pg_script(backend, m.sql)
            await backend.raw("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                              m.version, m.name)
    ids = []
    for n, content in enumerate(contents):
        doc_id = f"old-{n}"
        created, retain = utcnow(), utcnow().replace(year=2030)
        if backend.name == "sqlite":  # times as text there
            created, retain = format_time(created), format_time(retain)
        await backend.raw(f"INSERT INTO documents (id, kind, content_type, content, sha256, created_at, "
                          f"retain_until) VALUES ({', '.join(backend.p(i) for i in range(1, 8))})",
                          doc_id, "signed_xml", "application/xml", content,
                          hashlib.sha256(content).hexdigest(), created, retain)
        ids.append(doc_id)
    return ids


async def _pg_script(backend: Backend, sql: str) -> None:
    import asyncpg

    from storage_backends import PG_URL

    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": backend.schema or ""})
    try:
        await conn.execute(sql)  # a whole script, as the migration runner sends it
    finally:
        await conn.close()


async def test_documents_archived_before_the_upgrade_are_chained_once_on_open(backend: Backend) -> None:
    """Without adoption, every database upgraded with documents in it failed `audit verify`
    (document_unchained), and so did `gateway demo` on an existing home."""
    contents = [f"<old n='{n}'/>".encode() for n in range(5)]
    ids = await database_before_chained_documents(backend, contents)
    storage = backend.storage()
    await storage.open()
    try:
        records = await storage.audit_records(0, 100)
        assert [r.event_type for r in records] == ["archive.adopted"]
        assert records[0].details[ARCHIVED_KEY] == {
            i: hashlib.sha256(c).hexdigest() for i, c in zip(ids, contents, strict=True)}
        new = doc(99)
        await storage.commit_unit(documents=[new])
        result = await verify_trail(storage, None)
        assert result.ok and result.documents_checked == 6, result
    finally:
        await storage.close()
    async with backend.storage() as again:  # adopted once: a second open adds nothing
        assert len(await again.audit_records(0, 100)) == 2
        assert await adoption_left(backend) == 0
        await backend.drop_protection("documents")
        await backend.raw(f"UPDATE documents SET content = {backend.p(1)} WHERE id = {backend.p(2)}",
                          b"<old n='2' forged='yes'/>", ids[2])
        result = await verify_trail(again, None)
        assert (result.ok, result.problem, result.document_id) == (False, "document_modified", ids[2])


async def adoption_left(backend: Backend) -> int:
    return (await backend.raw("SELECT count(*) FROM archive_adoption"))[0][0]


async def test_adoption_takes_a_bounded_number_of_documents_per_event(backend: Backend) -> None:
    await database_before_chained_documents(backend, [b"<a n='%d'/>" % n for n in range(7)])
    storage = backend.storage()
    await storage.open()  # adopts all 7 in one event
    try:
        await backend.raw("INSERT INTO archive_adoption (document_id) SELECT id FROM documents")
        assert await storage.adopt_archive(per_event=3) == 7
        events = [r for r in await storage.audit_records(0, 100) if r.event_type == "archive.adopted"]
        assert [len(r.details[ARCHIVED_KEY]) for r in events] == [7, 3, 3, 1]
        assert await adoption_left(backend) == 0
        assert (await verify_trail(storage, None)).ok
    finally:
        await storage.close()
