"""Units of work and group commit, shared by both engines.

A request's writes form one `Unit`. Units go to a queue; one writer task takes whatever is queued
(waiting up to `window_s` for stragglers when fewer are queued than the last batch had; at most
`max_batch` units), hands the batch to the engine, which writes every unit inside its own
savepoint in ONE transaction and commits once, then resolves each caller's future. A unit that breaks a rule (duplicate natural
key...) is rolled back to its savepoint and fails alone; the others still commit. A failing
commit fails every unit of the batch: nothing is acknowledged that is not durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.storage.base import (
    ADOPTED_EVENT, ARCHIVED_EVENT, ARCHIVED_KEY, ARCHIVED_ROW_KEY, LINKED_EVENT, LINKED_KEY,
    RETENTION_SLACK, AuditEvent, AuditRecord, Checkpoint, Client, CommitResult, InvalidRecord,
    NewClient, NewDocument, NewLink, Storage, StorageError, StorageUnavailable, archive_row_digest,
    audit_canonical, canonical_json, link_row_digest, minimum_retention,
)


@dataclass
class ClientChange:
    """One change to the clients table: add (new), revoke (at), or replace keys (key_labels)."""

    action: str  # "add" | "revoke" | "keys"
    name: str
    new: NewClient | None = None
    at: datetime | None = None
    key_labels: frozenset[str] | None = None


@dataclass
class NewCheckpoint:
    seq: int
    hash: str
    time: datetime
    key_label: str
    algorithm: str
    signature: bytes


@dataclass
class Unit:
    documents: Sequence[NewDocument] = ()
    links: Sequence[NewLink] = ()
    audit: Sequence[AuditEvent] = ()
    client_change: ClientChange | None = None
    checkpoint: NewCheckpoint | None = None
    adopt: int = 0  # chain at most this many documents of each adoption table (upgrade)
    future: asyncio.Future[UnitResult] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UnitResult:
    commit: CommitResult
    client: Client | None = None
    checkpoint: Checkpoint | None = None


def dump_json(value: Any, what: str) -> str:
    """JSON for a stored column; a value that is not JSON is the caller's error, not a 500."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"{what} is not JSON-serialisable: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRecord(f"{what} is nested too deeply to store") from exc


@dataclass(frozen=True)
class DocumentRow:
    """A document's archive row as both engines write it: the report as stored text, the times."""

    doc: NewDocument
    report: str | None
    created_at: datetime
    retain_until: datetime

    @classmethod
    def of(cls, doc: NewDocument, now: datetime) -> DocumentRow:
        """The row of `doc` archived at `now`; a retention under two years is refused
        (21 CFR 1305.27)."""
        retain = doc.retain_until or minimum_retention(now)
        if retain < minimum_retention(now - RETENTION_SLACK):
            raise InvalidRecord("retain_until is shorter than two years (21 CFR 1305.27)",
                                document_id=doc.id)
        report = dump_json(dict(doc.report), "report") if doc.report is not None else None
        return cls(doc, report, now, retain)

    def digest(self) -> str:
        d = self.doc
        return archive_row_digest(id=d.id, kind=d.kind, content_type=d.content_type,
                                  sha256=d.sha256, report=self.report, client=d.client,
                                  key_label=d.key_label, natural_key=d.natural_key,
                                  created_at=self.created_at, retain_until=self.retain_until)


def link_payload(link: NewLink) -> str:
    """A link's payload as stored (and hashed): canonical JSON text."""
    return dump_json(dict(link.payload), "link payload")


def link_digest(link_id: int, link: NewLink, payload: str, now: datetime) -> str:
    return link_row_digest(id=link_id, document_id=link.document_id, kind=link.kind,
                           payload=payload, client=link.client, created_at=now)


@dataclass
class Adoption:
    """Rows archived before the chain pinned them (migrations 0003, 0004), taken off the lists
    to be chained now: document id -> content SHA-256, document id -> row digest, link id ->
    row digest."""

    content: dict[str, str] = field(default_factory=dict)
    rows: dict[str, str] = field(default_factory=dict)
    links: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.content.keys() | self.rows.keys())


_PIN_KEYS = (ARCHIVED_KEY, ARCHIVED_ROW_KEY, LINKED_KEY)


def _pins(content: Mapping[str, str], rows: Mapping[str, str],
          links: Mapping[int, str]) -> dict[str, Any]:
    pins: dict[str, Any] = {}
    if content:
        pins[ARCHIVED_KEY] = dict(sorted(content.items()))
    if rows:
        pins[ARCHIVED_ROW_KEY] = dict(sorted(rows.items()))
    if links:
        pins[LINKED_KEY] = {str(i): d for i, d in sorted(links.items())}
    return pins


def unit_events(unit: Unit, rows: Mapping[str, str] | None = None,
                links: Mapping[int, str] | None = None, adopted: Adoption | None = None,
                checkpoint: Checkpoint | None = None) -> list[AuditEvent]:
    """The audit events a unit writes: its own, the first of them pinning everything the unit
    archives: the SHA-256 of every document's content (details `archived_sha256`: id -> hex),
    the digest of the rest of its row (`archived_row_sha256`, from `rows`) and of every linked
    record (`linked_sha256`: link id -> hex, from `links`). A unit that archives without an event
    of its own gets a `document.archived` (or `document.linked`) event. The chain thus pins every
    archived row (21 CFR 1311.150: records protected from modification and deletion), which
    `gateway audit verify` recomputes. `adopted`: rows archived before that, chained by an
    `archive.adopted` event. `checkpoint`: the one the unit stored, which its first event names
    (`checkpoint_id`)."""
    rows, links = rows or {}, links or {}
    if set(rows) != {doc.id for doc in unit.documents} or len(links) != len(unit.links):
        raise AssertionError("every archived row of a unit is pinned by its audit event")
    # Pins come from the storage only, in any event of any unit: one a caller wrote would pin a
    # row a second time, and `audit verify`, which counts pins, would miss an inserted row.
    for event in unit.audit:
        if taken := [key for key in _PIN_KEYS if key in event.details]:
            raise InvalidRecord(f"audit details key {taken[0]!r} is kept for the storage")
    events = list(unit.audit)
    if checkpoint is not None and events:
        events[0] = dataclasses.replace(
            events[0], details={**events[0].details, "checkpoint_id": checkpoint.id})
    if adopted:
        events.append(AuditEvent(ADOPTED_EVENT, "system", "success", details={
            **_pins(adopted.content, adopted.rows, adopted.links),
            "reason": "archived before audit events pinned every archived row (upgrade)"}))
    pins = _pins({doc.id: doc.sha256 for doc in unit.documents}, rows, links)
    if not pins:
        return events
    if not events:
        if unit.documents:
            first = unit.documents[0]
            return [AuditEvent(ARCHIVED_EVENT, first.client or "system", "success",
                               subject=first.id, details=pins)]
        link = unit.links[0]
        return [AuditEvent(LINKED_EVENT, link.client or "system", "success",
                           subject=link.document_id, details=pins)]
    events[0] = dataclasses.replace(events[0], details={**events[0].details, **pins})
    return events


def chain(events: Sequence[AuditEvent], head_seq: int, head_hash: str) -> list[AuditRecord]:
    """Chain events after (head_seq, head_hash): seq + 1, prev_hash = previous hash."""
    records = []
    for event in events:
        head_seq += 1
        details = json.loads(dump_json(dict(event.details), "audit details"))
        digest = hashlib.sha256(audit_canonical(
            head_seq, event.time, event.event_type, event.actor, event.outcome, event.subject,
            details, event.request_id, head_hash)).hexdigest()
        records.append(AuditRecord(head_seq, event.time, event.event_type, event.actor,
                                   event.outcome, event.subject, details, event.request_id,
                                   head_hash, digest))
        head_hash = digest
    return records


def _consume(fut: asyncio.Future[UnitResult]) -> None:
    # a caller that went away still leaves its outcome retrieved (no "never retrieved" noise)
    if not fut.cancelled():
        fut.exception()


BatchRunner = Callable[[list[Unit]], Awaitable[list[UnitResult | BaseException]]]


class GroupCommitter:
    """The writer task: batches queued units and commits each batch once."""

    def __init__(self, run_batch: BatchRunner, *, max_batch: int = 256,
                 window_s: float = 0.001) -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: asyncio.Queue[Unit | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_batch = 1
        # counters for metrics and benchmarks
        self.batches = 0
        self.units = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="storage-group-commit")

    async def submit(self, unit: Unit) -> UnitResult:
        if self._closed or self._task is None or self._task.done():
            raise StorageUnavailable("storage is closed")
        unit.future = asyncio.get_running_loop().create_future()
        unit.future.add_done_callback(_consume)
        self._queue.put_nowait(unit)
        # shield: a caller that goes away (client disconnect) does not cancel its unit's commit
        return await asyncio.shield(unit.future)

    async def stop(self) -> None:
        """Commit everything queued, then end the writer task."""
        if self._task is None or self._closed:
            self._closed = True
            return
        self._closed = True
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _drain(self, batch: list[Unit]) -> bool:
        """Move queued units into batch; True when the stop sentinel was seen."""
        while len(batch) < self.max_batch:
            try:
                unit = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return False
            if unit is None:
                return True
            batch.append(unit)
        return False

    async def _loop(self) -> None:
        stopping = False
        batch: list[Unit] = []
        try:
            while not stopping:
                batch = []
                first = await self._queue.get()
                if first is None:
                    break
                batch = [first]
                stopping = self._drain(batch)
                # Wait briefly for stragglers only when fewer units are here than last time:
                # under steady load the batch fills while the previous commit runs, and a lone
                # writer should not pay the window on every request.
                if (not stopping and self.window_s > 0
                        and len(batch) < min(self._last_batch, self.max_batch)):
                    await asyncio.sleep(self.window_s)
                    stopping = self._drain(batch)
                self._last_batch = len(batch)
                await self._commit(batch)
                batch = []
        finally:
            # Units queued after the sentinel (none normally), or left when the writer task was
            # cancelled or broke: refuse them, never leave a caller waiting for ever. A unit
            # cancelled mid-commit may still have been committed: "unavailable" is what the
            # caller can act on (retry; a duplicate is refused by its natural key).
            self._closed = True
            leftover = batch + [u for u in iter(self._get_nowait, None)]
            for unit in leftover:
                if unit.future is not None and not unit.future.done():
                    unit.future.set_exception(StorageUnavailable("storage is closed"))

    def _get_nowait(self) -> Unit | None:
        """The next queued unit, skipping stop marks; None when the queue is empty."""
        while True:
            try:
                unit = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if unit is not None:
                return unit

    async def _commit(self, batch: list[Unit]) -> None:
        try:
            results = await self._run_batch(batch)
        except StorageError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # noqa: BLE001 - every caller must hear of the failure
            results = [StorageUnavailable(f"commit failed: {exc}")] * len(batch)
        self.batches += 1
        self.units += len(batch)
        for unit, result in zip(batch, results, strict=True):
            fut = unit.future
            if fut is None or fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


class GroupCommitStorage(Storage):
    """The writes both engines make the same way: a unit handed to `self.committer`, which the
    engine's `_run_batch` writes. Engines set `committer` in their constructor."""

    committer: GroupCommitter

    async def commit_unit(self, *, documents: Sequence[NewDocument] = (),
                          links: Sequence[NewLink] = (),
                          audit: Sequence[AuditEvent] = ()) -> CommitResult:
        result = await self.committer.submit(Unit(list(documents), list(links), list(audit)))
        return result.commit

    async def adopt_archive(self, per_event: int = 1000) -> int:
        """Chain the rows archived before audit events pinned them (listed by migrations 0003:
        content, and 0004: every column, with the document's links), `per_event` documents to an
        `archive.adopted` event; the number of documents chained. Runs on every open for writing;
        after the first it finds nothing. Each event and the removal of what it chains from the
        lists commit together, so a crash midway leaves no row out."""
        total = 0
        while True:
            result = await self.committer.submit(Unit(adopt=per_event))
            chained = [r for r in result.commit.audit if r.event_type == ADOPTED_EVENT]
            if not chained:
                return total
            details = chained[0].details
            total += len(details.get(ARCHIVED_KEY, {}).keys()
                         | details.get(ARCHIVED_ROW_KEY, {}).keys())

    async def _client_unit(self, change: ClientChange, audit: Sequence[AuditEvent]) -> Client:
        result = await self.committer.submit(Unit(audit=list(audit), client_change=change))
        assert result.client is not None
        return result.client

    async def add_client(self, client: NewClient, audit: Sequence[AuditEvent] = ()) -> Client:
        return await self._client_unit(ClientChange("add", client.name, new=client), audit)

    async def revoke_client(self, name: str, audit: Sequence[AuditEvent] = (),
                            at: datetime | None = None) -> Client:
        return await self._client_unit(ClientChange("revoke", name, at=at), audit)

    async def set_client_keys(self, name: str, key_labels: frozenset[str],
                              audit: Sequence[AuditEvent] = ()) -> Client:
        return await self._client_unit(ClientChange("keys", name, key_labels=frozenset(key_labels)),
                                       audit)

    async def add_checkpoint(self, seq: int, hash: str, time: datetime, key_label: str,  # noqa: A002
                             algorithm: str, signature: bytes,
                             audit: Sequence[AuditEvent] = ()) -> Checkpoint:
        result = await self.committer.submit(Unit(audit=list(audit), checkpoint=NewCheckpoint(
            seq, hash, time, key_label, algorithm, signature)))
        assert result.checkpoint is not None
        return result.checkpoint
