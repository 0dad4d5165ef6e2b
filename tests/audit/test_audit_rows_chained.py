"""The audit chain pins every column of the archive, not only the signed bytes, on SQLite and
PostgreSQL: a verification report turned from failed to passed, a shortened retention, another
client named, a linked record (shipment, receipt) edited, deleted or slipped in, are all caught by
`audit verify`. Tampering goes through plain SQL after removing the triggers, as an attacker with
database access would; before, only a document's content was chained and each of these passed.
"""

from __future__ import annotations

import json
from typing import Any

from storage_backends import Backend
from test_audit_archive_and_checkpoints import database_before_chained_documents, doc

from gateway.audit import verify_trail
from gateway.storage import AuditEvent, NewDocument, NewLink, Storage
from gateway.storage.base import (
    ARCHIVED_KEY, ARCHIVED_ROW_KEY, LINKED_KEY, format_time, link_row_digest, utcnow,
)


async def _edit(backend: Backend, table: str, column: str, value: Any, row_id: Any) -> Any:
    """Set one column of one row; the value it had."""
    p = backend.p
    (old,), = await backend.raw(f"SELECT {column} FROM {table} WHERE id = {p(1)}", row_id)
    await backend.raw(f"UPDATE {table} SET {column} = {p(1)} WHERE id = {p(2)}", value, row_id)
    return old


def _time(backend: Backend, text: str) -> Any:
    from datetime import datetime
    return datetime.fromisoformat(text) if backend.name == "postgresql" else format_time(
        datetime.fromisoformat(text))


async def test_every_column_of_an_archived_document_is_pinned(backend: Backend,
                                                              storage: Storage) -> None:
    failed = NewDocument("verified_xml", b"<order n='1'/>", "application/xml", client="pharmacy-1",
                         key_label=None, report={"indication": "TOTAL_FAILED"}, natural_key="o-1")
    await storage.commit_unit(documents=[failed, doc(2)], audit=[
        AuditEvent("document.verified", "pharmacy-1", "failure", subject=failed.id)])
    assert (await verify_trail(storage, None)).ok
    await backend.drop_protection("documents")
    edits = {
        "report": json.dumps({"indication": "TOTAL_PASSED"}),
        "retain_until": _time(backend, "2027-01-01T00:00:00+00:00"),
        "created_at": _time(backend, "2020-01-01T00:00:00+00:00"),
        "client": "pharmacy-2",
        "key_label": "purchaser",
        "natural_key": "o-2",
        "kind": "signed_xml",
        "content_type": "text/plain",
        "sha256": "0" * 64,
    }
    for column, value in edits.items():
        old = await _edit(backend, "documents", column, value, failed.id)
        result = await verify_trail(storage, None)
        assert (result.ok, result.first_bad_seq, result.problem, result.document_id) == (
            False, 1, "document_modified", failed.id), (column, result)
        assert "archive record" in result.message, result.message
        await _edit(backend, "documents", column, old, failed.id)
        assert (await verify_trail(storage, None)).ok, column


async def test_linked_records_are_pinned_edited_deleted_or_inserted(backend: Backend,
                                                                    storage: Storage) -> None:
    order = doc(1)
    await storage.commit_unit(documents=[order])
    shipped = await storage.commit_unit(
        links=[NewLink(order.id, "shipment", {"ndc": "00406-0123-01", "packages": 2},
                       client="supplier-1")],
        audit=[AuditEvent("order.shipped", "supplier-1", "success", subject=order.id)])
    (link_id,) = shipped.link_ids
    (rec,) = shipped.audit
    stored = (await storage.links(order.id))[0]
    assert rec.details[LINKED_KEY] == {str(link_id): link_row_digest(
        id=link_id, document_id=order.id, kind="shipment",
        payload='{"ndc":"00406-0123-01","packages":2}', client="supplier-1",
        created_at=stored.created_at)}
    # a unit of links alone gets an event of its own
    received = await storage.commit_unit(links=[NewLink(order.id, "receipt", {"packages": 2})])
    (auto,) = received.audit
    assert (auto.event_type, auto.subject, set(auto.details)) == (
        "document.linked", order.id, {LINKED_KEY})
    result = await verify_trail(storage, None)
    assert result.ok and result.links_checked == 2, result

    await backend.drop_protection("links")
    old = await _edit(backend, "links", "payload", '{"ndc":"00406-0123-01","packages":20}', link_id)
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.link_id) == (
        False, rec.seq, "link_modified", link_id), result
    await _edit(backend, "links", "payload", old, link_id)
    assert (await verify_trail(storage, None)).ok

    p = backend.p
    now = utcnow() if backend.name == "postgresql" else format_time(utcnow())
    (slipped,), = await backend.raw(
        f"INSERT INTO links (document_id, kind, payload, client, created_at) VALUES "
        f"({p(1)}, 'void', '{{}}', 'nobody', {p(2)}) RETURNING id", order.id, now)
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.link_id) == (
        False, None, "link_unchained", slipped), result
    assert f"link {slipped}" in result.message
    await backend.raw(f"DELETE FROM links WHERE id = {p(1)}", slipped)

    await backend.raw(f"DELETE FROM links WHERE id = {p(1)}", received.link_ids[0])
    result = await verify_trail(storage, None)
    assert (result.ok, result.first_bad_seq, result.problem, result.link_id) == (
        False, auto.seq, "link_missing", received.link_ids[0]), result


async def test_rows_archived_before_the_upgrade_are_chained_with_their_links(
        backend: Backend) -> None:
    """A database from before the chain pinned rows: its documents and their links are adopted
    once on open (migration 0004), a link payload kept by jsonb included, and are pinned from
    then on."""
    contents = [f"<old n='{n}'/>".encode() for n in range(3)]
    ids = await database_before_chained_documents(backend, contents)
    p = backend.p
    created = utcnow() if backend.name == "postgresql" else format_time(utcnow())
    cast = "::jsonb" if backend.name == "postgresql" else ""
    await backend.raw(f"INSERT INTO links (document_id, kind, payload, client, created_at) VALUES "
                      f"({p(1)}, 'shipment', {p(2)}{cast}, 'supplier-1', {p(3)})",
                      ids[1], '{"packages": 1e20}', created)
    async with backend.storage() as storage:
        (adopted,) = await storage.audit_records(0, 100)
        assert adopted.event_type == "archive.adopted"
        assert set(adopted.details[ARCHIVED_KEY]) == set(adopted.details[ARCHIVED_ROW_KEY]) == set(ids)
        assert len(adopted.details[LINKED_KEY]) == 1
        result = await verify_trail(storage, None)
        assert result.ok and result.links_checked == 1 and result.documents_checked == 3, result
        await backend.drop_protection("documents")
        await _edit(backend, "documents", "client", "someone-else", ids[2])
        result = await verify_trail(storage, None)
        assert (result.ok, result.problem, result.document_id) == (
            False, "document_modified", ids[2]), result
