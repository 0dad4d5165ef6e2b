"""`audit verify` over the archive rows the chain pins, on SQLite and PostgreSQL, against edits made
with database access (plain SQL after removing the triggers) and against the upgrade path:

* pins edited into an audit record that no stored row can have (a link key '²' or past 64 bits,
  a document id with NUL or a lone surrogate) are that record's hash_mismatch: verify crashed
  (ValueError, OverflowError, UnicodeEncodeError), or on PostgreSQL blamed an intact earlier record
  of the page for a "missing" document;
* a PostgreSQL time asyncpg cannot hand back ('infinity', the year 10000) is the row's
  document_modified / link_modified, not a crash of verify;
* `audit verify` run first after an upgrade (a read-only open that migrates) chains what the
  migrations listed instead of reporting every row archived before as inserted;
* rows listed in the adoption tables after units pinned their own rows (an inserted document, or
  one pinned twice so the counts hide an inserted one) are `late_adoption`;
* no caller event carries the storage's pin keys (a second pin of a row hides an inserted one);
* on SQLite, a text column turned into a BLOB whose repr is the old text is caught.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from storage_backends import Backend
from test_audit_archive_and_checkpoints import database_before_chained_documents

from gateway.audit import verify_trail
from gateway.storage import AuditEvent, InvalidRecord, NewDocument, NewLink, Storage
from gateway.storage.base import ARCHIVED_KEY, ARCHIVED_ROW_KEY, LINKED_KEY, format_time, utcnow

_POSTGRES_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
_SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _doc(n: int) -> NewDocument:
    return NewDocument("signed_xml", f"<order n='{n}'/>".encode(), "application/xml",
                       client="pharmacy-1", report={"indication": "TOTAL_PASSED", "n": n})


async def _details(backend: Backend, seq: int) -> str:
    (text,), = await backend.raw(f"SELECT details FROM audit_log WHERE seq = {backend.p(1)}", seq)
    return text


async def _set_details(backend: Backend, seq: int, text: str) -> None:
    await backend.raw(f"UPDATE audit_log SET details = {backend.p(1)} WHERE seq = {backend.p(2)}",
                      text, seq)


async def test_pins_no_row_can_have_are_the_edited_records_hash_mismatch(
        backend: Backend, storage: Storage) -> None:
    first, second = _doc(1), _doc(2)
    await storage.commit_unit(documents=[first], links=[NewLink(first.id, "shipment", {"n": 1})])
    await storage.commit_unit(documents=[second], links=[NewLink(second.id, "shipment", {"n": 2})])
    await backend.drop_protection("audit_log")
    original = await _details(backend, 2)
    for key, pin in ((LINKED_KEY, "\u00b2"), (LINKED_KEY, "9" * 30), (LINKED_KEY, "9" * 19),
                     (ARCHIVED_KEY, "forged\x00"), (ARCHIVED_ROW_KEY, "forged\ud800")):
        details = json.loads(original)
        details[key][pin] = "0" * 64
        await _set_details(backend, 2, json.dumps(details))  # \ud800 stays an escape in JSON
        result = await verify_trail(storage, None)
        assert (result.ok, result.first_bad_seq, result.problem) == (
            False, 2, "hash_mismatch"), (key, pin, result)
    await _set_details(backend, 2, original)
    assert (await verify_trail(storage, None)).ok


@_POSTGRES_ONLY
async def test_a_time_postgresql_cannot_hand_back_is_the_rows_modification(
        backend: Backend, storage: Storage) -> None:
    document = _doc(1)
    await storage.commit_unit(documents=[document])
    await storage.commit_unit(links=[NewLink(document.id, "shipment", {"n": 1})])
    (link_id,), = await backend.raw("SELECT id FROM links")
    await backend.drop_protection("documents")
    await backend.drop_protection("links")
    for value in ("infinity", "10000-01-01 00:00:00+00"):
        (old,), = await backend.raw("SELECT retain_until FROM documents")
        await backend.raw(f"UPDATE documents SET retain_until = '{value}'")
        result = await verify_trail(storage, None)
        assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
            False, 1, "document_modified", document.id), (value, result)
        await backend.raw("UPDATE documents SET retain_until = $1", old)
        await backend.raw(f"UPDATE links SET created_at = '{value}'")
        result = await verify_trail(storage, None)
        assert (result.ok, result.first_bad_seq, result.problem, result.link_id) == (
            False, 2, "link_modified", link_id), (value, result)
        await backend.raw("UPDATE links SET created_at = now()")


async def test_audit_verify_first_after_an_upgrade_chains_what_was_archived_before(
        backend: Backend) -> None:
    """A database at migration 0002 with documents and links; the operator upgrades and runs
    `gateway audit verify` (a read-only open, which migrates) before starting the gateway."""
    ids = await database_before_chained_documents(backend, [b"<old n='1'/>", b"<old n='2'/>"])
    created = utcnow() if backend.name == "postgresql" else format_time(utcnow())
    p = backend.p
    for doc_id in ids:
        await backend.raw(f"INSERT INTO links (document_id, kind, payload, created_at) "
                          f"VALUES ({p(1)}, 'shipment', {p(2)}, {p(3)})",
                          doc_id, '{"units": 1e20, "lot": "\u00e9"}', created)
    async with backend.storage(read_only=True) as reader:
        result = await verify_trail(reader, None)
        assert (result.ok, result.documents_checked, result.links_checked) == (True, 2, 2), result
    async with backend.storage() as storage:  # the gateway then adopts nothing more
        assert [r.event_type for r in await storage.audit_records()] == ["archive.adopted"]
        assert (await verify_trail(storage, None)).ok


async def _forge(backend: Backend, listed: str | None) -> None:
    """As an attacker: a document inserted behind the gateway, and `listed` put on both
    adoption lists, for the gateway to chain when next opened."""
    content = b"<order n='forged'/>"
    created, retain = utcnow(), utcnow().replace(year=2031)
    if backend.name == "sqlite":
        created, retain = format_time(created), format_time(retain)
    p = backend.p
    await backend.raw(f"INSERT INTO documents (id, kind, content_type, content, sha256, created_at, "
                      f"retain_until) VALUES ({', '.join(p(i) for i in range(1, 8))})",
                      "forged", "signed_xml", "application/xml", content,
                      hashlib.sha256(content).hexdigest(), created, retain)
    await backend.raw(f"INSERT INTO archive_adoption (document_id) VALUES ({p(1)})", listed)
    await backend.raw(f"INSERT INTO archive_row_adoption (document_id, links_upto) "
                      f"VALUES ({p(1)}, 0)", listed)


@pytest.mark.parametrize("listed", ["forged", "archived"])
async def test_rows_listed_for_adoption_after_the_upgrade_are_reported(
        backend: Backend, listed: str) -> None:
    """`forged`: the inserted document itself is adopted; `archived`: an archived one is pinned
    a second time, so that the counts (2 documents, 2 pins) hid the inserted one."""
    archived = _doc(1)
    async with backend.storage() as storage:
        await storage.commit_unit(documents=[archived], links=[NewLink(archived.id, "shipment", {})])
    await _forge(backend, archived.id if listed == "archived" else "forged")
    async with backend.storage() as storage:  # the gateway restarts and adopts them
        result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
        False, 2, "late_adoption", archived.id if listed == "archived" else "forged"), result


async def test_no_caller_event_carries_the_storages_pins(backend: Backend,
                                                          storage: Storage) -> None:
    archived = _doc(1)
    await storage.commit_unit(documents=[archived])
    pin = {ARCHIVED_KEY: {archived.id: archived.sha256}}
    for documents in ((), (_doc(2),)):
        with pytest.raises(InvalidRecord, match="kept for the storage"):
            await storage.commit_unit(documents=documents, audit=[
                AuditEvent("order.signed", "pharmacy-1", "success"),
                AuditEvent("order.noted", "pharmacy-1", "success", details=pin)])
    assert len(await storage.audit_records()) == 1
    p = backend.p
    await backend.raw(f"INSERT INTO documents (id, kind, content_type, content, sha256, created_at, "
                      f"retain_until) SELECT 'forged', kind, content_type, content, sha256, "
                      f"created_at, retain_until FROM documents WHERE id = {p(1)}", archived.id)
    result = await verify_trail(storage, None)
    assert (result.ok, result.problem, result.document_id) == (
        False, "document_unchained", "forged"), result


@_SQLITE_ONLY
async def test_a_text_column_turned_into_a_blob_of_the_same_repr_is_caught(
        backend: Backend, storage: Storage) -> None:
    """SQLite hashed a BLOB by its repr: a natural key or client "b'order-7'" made the BLOB
    b'order-7' (no longer found by that key or client) kept its digest."""
    document = NewDocument("signed_xml", b"<order/>", "application/xml",
                           client="b'pharmacy-1'", natural_key="b'order-7'")
    await storage.commit_unit(documents=[document],
                              links=[NewLink(document.id, "shipment", {}, client="b'carrier'")])
    (link_id,), = await backend.raw("SELECT id FROM links")
    await backend.drop_protection("documents")
    await backend.drop_protection("links")
    await backend.raw("UPDATE documents SET natural_key = ?", b"order-7")
    result = await verify_trail(storage, None)
    assert (result.ok, result.problem, result.document_id) == (
        False, "document_modified", document.id), result
    await backend.raw("UPDATE documents SET natural_key = ?", "b'order-7'")
    await backend.raw("UPDATE links SET client = ?", b"carrier")
    result = await verify_trail(storage, None)
    assert (result.ok, result.problem, result.link_id) == (False, "link_modified", link_id), result
