"""Checking the audit trail end to end (21 CFR 1311.150, 1311.215: records protected from
modification and deletion; the trail is analysed daily).

`verify_trail` walks the chain from seq 1 and stops at the first problem:

* a record whose stored hash is not SHA-256 over its canonical encoding: it was edited
  (`hash_mismatch`); one whose stored row cannot even be decoded (`record_undecodable`);
* a gap in seq: a record was deleted (`missing_record`);
* a record whose prev_hash is not the hash of the record before: records were reordered or a
  record was replaced together with its hash (`chain_broken`);
* a checkpoint whose hash differs from the record at its seq, or that names a seq past the end of
  the trail (`checkpoint_mismatch`, `missing_record`);
* a checkpoint whose signature does not verify with the audit public key
  (`checkpoint_signature_invalid`);
* an `audit_checkpoint` record whose checkpoint row is gone or says otherwise
  (`checkpoint_missing`, `checkpoint_mismatch`): deleting the checkpoints that pin a stretch of
  the trail, then rewriting it, is caught by the records that name them;
* an archived document whose content no longer has the SHA-256 the audit event of its unit
  carries, whose other columns (kind, client, key label, verification report, natural key,
  times) no longer have the digest it carries, or that is gone (`document_modified`,
  `document_missing`, naming the document), and a document that no audit event carries
  (`document_unchained`); the same for linked records (`link_modified`, `link_missing`,
  `link_unchained`, naming the link);
* the head row disagreeing with the last record: the tail was cut off (`head_mismatch`);
* a record named by an anchor kept outside the database (`anchors`: seq -> hash, from an earlier
  run) that is gone or differs (`anchor_mismatch`).

What the database alone cannot show: records after the last signed checkpoint can be cut off, or
the database rolled back to a backup, or the whole chain rebuilt with its checkpoints removed,
and the rest is consistent. The result says how much is so exposed (`anchored_seq`: the last
record a verified checkpoint covers; `unanchored_records`: those after it) and gives the head
(`last_seq`, `head_hash`) to keep elsewhere and pass back as an anchor: a rollback or rebuild to
before an anchor is then caught, since a record's hash pins every record before it.

A rewrite of the whole chain after an edit (every hash recomputed) is caught by any signed
checkpoint after the edit: the attacker cannot sign without the HSM audit key. Checkpoints are
read page by page along the records, and documents are hashed by the database one at a time, so
memory stays flat however long the trail.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gateway.storage.base import (
    ADOPTED_EVENT, ARCHIVED_KEY, ARCHIVED_ROW_KEY, GENESIS_HASH, LINKED_KEY, AuditRecord,
    Checkpoint, Storage,
)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# How many times verify_trail reads on when the head moved past what it read (live appends).
_CATCH_UP_ROUNDS = 1000

PROBLEMS = {
    "hash_mismatch": "the record's content does not match its hash (edited)",
    "record_undecodable": "the stored record or checkpoint cannot be read (edited in the database)",
    "missing_record": "a record is missing (deleted)",
    "chain_broken": "the record does not follow the one before it (reordered or replaced)",
    "checkpoint_mismatch": "a signed checkpoint does not match the record at its seq",
    "checkpoint_signature_invalid": "a checkpoint's signature does not verify with the audit key",
    "checkpoint_missing": "the checkpoint this record names is missing (deleted)",
    "document_modified": "an archived document does not match the hash the trail recorded (edited)",
    "document_missing": "an archived document the trail records is missing (deleted)",
    "document_unchained": "an archived document is not in the audit trail (inserted)",
    "link_modified": "a linked record does not match the hash the trail recorded (edited)",
    "link_missing": "a linked record the trail records is missing (deleted)",
    "link_unchained": "a linked record is not in the audit trail (inserted)",
    "late_adoption": "rows were adopted into the trail after audit events pinned rows one unit "
                     "at a time (listed for adoption in the database after the upgrade)",
    "head_mismatch": "the chain head does not match the last record (records cut off)",
    "anchor_mismatch": "the record an anchor kept outside the database names is gone or differs "
                       "(rolled back, cut off or rebuilt)",
}


@dataclass(frozen=True)
class AuditVerifyResult:
    """The outcome of `verify_trail`; when not ok, `first_bad_seq` names the first bad record
    (None for a document or link no record carries), `document_id` the document and `link_id`
    the linked record, if one is at fault."""

    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_seq: int | None = None
    problem: str | None = None  # a key of PROBLEMS
    message: str = ""
    last_seq: int = 0  # seq of the last record checked
    checkpoints_unverified: int = 0  # checkpoints whose signature was not checked (no key given)
    documents_checked: int = 0
    document_id: str | None = None
    head_hash: str = GENESIS_HASH  # hash of record `last_seq`: an anchor to keep elsewhere
    anchored_seq: int = 0  # the last record a checkpoint with a verified signature covers
    anchors_checked: int = 0
    links_checked: int = 0
    link_id: int | None = None

    @property
    def unanchored_records(self) -> int:
        """Records after the last verified checkpoint: their deletion (with the head moved
        back), a rollback, or a rebuild without checkpoints is not detectable from the database
        alone (an anchor kept outside it detects it)."""
        return max(self.last_seq - self.anchored_seq, 0)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok, "records_checked": self.records_checked,
            "checkpoints_checked": self.checkpoints_checked, "first_bad_seq": self.first_bad_seq,
            "problem": self.problem, "message": self.message, "last_seq": self.last_seq,
            "checkpoints_unverified": self.checkpoints_unverified,
            "documents_checked": self.documents_checked, "document_id": self.document_id,
            "head_hash": self.head_hash, "anchored_seq": self.anchored_seq,
            "unanchored_records": self.unanchored_records, "anchors_checked": self.anchors_checked,
            "links_checked": self.links_checked, "link_id": self.link_id,
        }


def _public_key(key: PublicKey | x509.Certificate | None) -> PublicKey | None:
    if isinstance(key, x509.Certificate):
        return key.public_key()  # type: ignore[return-value]
    return key


def checkpoint_signature_ok(checkpoint: Checkpoint, public_key: PublicKey) -> bool:
    data = checkpoint.payload()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if checkpoint.algorithm != "rsa-sha256":
                return False
            public_key.verify(checkpoint.signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if checkpoint.algorithm != "ecdsa-sha256":
                return False
            public_key.verify(checkpoint.signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class _Problem:
    problem: str
    seq: int | None
    detail: str = ""
    document_id: str | None = None
    link_id: int | None = None


def _link_id(key: object) -> int | None:
    """The link id a `linked_sha256` key names, as the storage writes it (the decimal digits of
    a positive 64-bit id); None for anything else. A key edited in the database ('²', which
    str.isdigit accepts and int() refuses, or a number past any id) is then reported at its
    record rather than crashing the walk or failing the lookup of every link of its page."""
    if not (isinstance(key, str) and key.isascii() and key.isdecimal()) or key.startswith("0"):
        return None
    value = int(key)
    return value if value < 2 ** 63 else None


def _hash_of(rec: AuditRecord) -> str | None:
    """The record's expected hash; None when its content cannot even be encoded."""
    try:
        return rec.expected_hash()
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None


class _CheckpointPages:
    """The checkpoints by (seq, id), read a page at a time as the walk reaches their seq."""

    def __init__(self, storage: Storage, page: int) -> None:
        self.storage = storage
        self.page = page
        self.buffer: deque[Checkpoint] = deque()
        self.after: tuple[int, int] | None = None
        self.exhausted = False
        self.seen_damaged: set[int] = set()

    async def upto(self, seq: int | None) -> list[Checkpoint]:
        """The checkpoints not handed out yet with seq <= `seq` (None: all of them)."""
        out: list[Checkpoint] = []
        while True:
            while self.buffer and (seq is None or self.buffer[0].seq <= seq):
                out.append(self.buffer.popleft())
            if self.buffer or self.exhausted:
                return out
            got = await self.storage.checkpoints(after=self.after, limit=self.page)
            self.exhausted = len(got) < self.page
            progressed = False
            for cp in got:
                if cp.damaged and "seq" in cp.damaged:
                    # A seq edited into text (SQLite keeps it) sorts after every number in the
                    # database but decodes as -1: handed out first, once, and never used to page.
                    if cp.id not in self.seen_damaged:
                        self.seen_damaged.add(cp.id)
                        self.buffer.appendleft(cp)
                        progressed = True
                elif self.after is None or (cp.seq, cp.id) > self.after:
                    self.buffer.append(cp)
                    self.after = (cp.seq, cp.id)
                    progressed = True
            if not progressed:
                self.exhausted = True


class _Walk:
    """One pass along the chain; the state `verify_trail` reports from."""

    def __init__(self, storage: Storage, key: PublicKey | None, page: int,
                 anchors: dict[int, str]) -> None:
        self.storage = storage
        self.key = key
        self.page = page
        self.anchors = anchors
        self.anchors_checked = 0
        self.anchored_seq = 0
        self.checkpoints = _CheckpointPages(storage, page)
        self.expected_seq = 1
        self.prev_hash = GENESIS_HASH
        self.records = 0
        self.checked_cps = 0
        self.verified_cps = 0
        self.unverified = 0
        self.documents = 0
        self.links = 0
        # whether a unit's own event pinned archive rows yet: the upgrade's adoption comes first
        self.rows_pinned = False
        # checkpoints met at their seq whose `audit_checkpoint` record is still to come
        self.pending: dict[int, Checkpoint] = {}

    def _signature_problem(self, cp: Checkpoint) -> _Problem | None:
        if cp.damaged:
            return _Problem("record_undecodable", max(cp.seq, 1),
                            f"checkpoint {cp.id}: {cp.damaged}")
        if self.key is None:
            self.unverified += 1
        elif not checkpoint_signature_ok(cp, self.key):
            return _Problem("checkpoint_signature_invalid", cp.seq, f"checkpoint {cp.id}")
        else:
            self.verified_cps += 1
        return None

    async def _match(self, cp: Checkpoint, rec: AuditRecord | None) -> _Problem | None:
        """A checkpoint against the record at its seq: `rec` (the record being checked), or,
        for a checkpoint stored behind the walk (a live gateway checkpointing meanwhile), the
        record at its seq, checked already and read again."""
        target = rec
        if rec is None or cp.seq != rec.seq:
            found = (await self.storage.audit_records(after_seq=cp.seq - 1, limit=1)
                     if 0 < cp.seq < self.expected_seq else [])
            if not found or found[0].seq != cp.seq:
                return _Problem("checkpoint_mismatch", max(cp.seq, 1) if rec is None else rec.seq,
                                f"checkpoint {cp.id} names seq {cp.seq}")
            target = found[0]
        if cp.hash != target.hash:
            return _Problem("checkpoint_mismatch", cp.seq, f"checkpoint {cp.id}")
        self.checked_cps += 1
        if self.key is not None:  # its signature verified (`_signature_problem` came first)
            self.anchored_seq = max(self.anchored_seq, cp.seq)
        self.pending[cp.id] = cp
        return None

    async def _checkpoint_record(self, rec: AuditRecord) -> _Problem | None:
        """An `audit_checkpoint` record names its checkpoint (details checkpoint_id and hash,
        subject the seq it covers): the row must still be there and say the same."""
        cid = rec.details.get("checkpoint_id")
        if not isinstance(cid, int) or cid not in self.pending:
            # made while this walk ran, after its page of checkpoints was read: read on
            self.checkpoints.exhausted = False
            for cp in await self.checkpoints.upto(rec.seq):
                problem = self._signature_problem(cp) or await self._match(cp, rec)
                if problem is not None:
                    return problem
        cp = self.pending.pop(cid, None) if isinstance(cid, int) else None
        if cp is None:
            return _Problem("checkpoint_missing", rec.seq, f"checkpoint {cid!r}")
        if rec.subject != str(cp.seq) or rec.details.get("hash") != cp.hash:
            return _Problem("checkpoint_mismatch", rec.seq,
                            f"checkpoint {cid} covers seq {cp.seq}, the record says {rec.subject}")
        return None

    def _archive_problem(self, rec: AuditRecord, digests: dict[str, tuple[str, str]],
                         links: dict[int, str]) -> _Problem | None:
        """The documents and links the record pins, as they are stored now: content first, then
        the rest of each row, then each link."""
        pinned = {key: rec.details[key] for key in (ARCHIVED_KEY, ARCHIVED_ROW_KEY, LINKED_KEY)
                  if key in rec.details}
        if not all(isinstance(v, dict) for v in pinned.values()) or not all(
                _link_id(k) is not None for k in pinned.get(LINKED_KEY, {})):
            return _Problem("document_modified", rec.seq, "its document hashes are not readable")
        if pinned and rec.event_type == ADOPTED_EVENT:
            # Adoption chains what migrations 0003/0004 listed, on the first open after the
            # upgrade, before any unit is written. One after units pinned their own rows chains
            # rows someone listed in the adoption tables: an inserted document made to look
            # archived, or one pinned twice so that the counts hide an inserted one.
            if self.rows_pinned:
                adopted = sorted(pinned.get(ARCHIVED_KEY, {}).keys()
                                 | pinned.get(ARCHIVED_ROW_KEY, {}).keys())
                return _Problem("late_adoption", rec.seq,
                                f"{len(adopted)} documents, {len(pinned.get(LINKED_KEY, {}))} "
                                "linked records", adopted[0] if adopted else None)
        elif ARCHIVED_ROW_KEY in pinned or LINKED_KEY in pinned:
            self.rows_pinned = True
        for column, (key, what) in enumerate(((ARCHIVED_KEY, "content"),
                                              (ARCHIVED_ROW_KEY, "archive record"))):
            for doc_id, expected in sorted(pinned.get(key, {}).items()):
                self.documents += key == ARCHIVED_KEY
                actual = digests.get(doc_id)
                if actual is None:
                    return _Problem("document_missing", rec.seq, f"document {doc_id}", doc_id)
                if actual[column] != expected:
                    return _Problem("document_modified", rec.seq, f"document {doc_id}: its {what}",
                                    doc_id)
        for link_id, expected in sorted(pinned.get(LINKED_KEY, {}).items(), key=lambda i: int(i[0])):
            self.links += 1
            actual_link = links.get(int(link_id))
            if actual_link is None:
                return _Problem("link_missing", rec.seq, f"link {link_id}", link_id=int(link_id))
            if actual_link != expected:
                return _Problem("link_modified", rec.seq, f"link {link_id}", link_id=int(link_id))
        return None

    async def _record(self, rec: AuditRecord, digests: dict[str, tuple[str, str]],
                      links: dict[int, str]) -> _Problem | None:
        # Signatures first: a forged checkpoint at or before this record is the problem to name.
        cps = await self.checkpoints.upto(rec.seq)
        bad_sig = next((p for p in map(self._signature_problem, cps) if p is not None), None)
        problem: _Problem | None = None
        if rec.seq != self.expected_seq:
            # a gap: the first missing seq is the bad one
            problem = _Problem("missing_record", self.expected_seq,
                               f"next record present is {rec.seq}")
        elif rec.damaged:
            problem = _Problem("record_undecodable", rec.seq, rec.damaged)
        elif _hash_of(rec) != rec.hash:
            problem = _Problem("hash_mismatch", rec.seq)
        elif rec.prev_hash != self.prev_hash:
            problem = _Problem("chain_broken", rec.seq)
        if bad_sig is not None and (problem is None or (bad_sig.seq or 0) <= (problem.seq or 0)):
            return bad_sig
        if problem is not None:
            return problem
        if rec.seq in self.anchors:
            self.anchors_checked += 1
            if self.anchors[rec.seq] != rec.hash:
                return _Problem("anchor_mismatch", rec.seq,
                                f"the anchor says hash {self.anchors[rec.seq]}")
        self.records += 1
        for cp in cps:
            problem = await self._match(cp, rec)
            if problem is not None:
                return problem
        if rec.event_type == "audit_checkpoint":
            problem = await self._checkpoint_record(rec)
        if problem is None:
            problem = self._archive_problem(rec, digests, links)
        if problem is not None:
            return problem
        self.prev_hash = rec.hash
        self.expected_seq = rec.seq + 1
        return None

    async def page_of_records(self, after: int) -> tuple[list[AuditRecord], _Problem | None]:
        batch = await self.storage.audit_records(after_seq=after, limit=self.page)
        # the documents and links this page's records pin, hashed by the database in one round
        wanted = [doc_id for rec in batch if not rec.damaged for key in (ARCHIVED_KEY, ARCHIVED_ROW_KEY)
                  if isinstance(pinned := rec.details.get(key), dict) for doc_id in pinned]
        wanted_links = [link_id for rec in batch if not rec.damaged
                        and isinstance(pinned := rec.details.get(LINKED_KEY), dict)
                        for key in pinned if (link_id := _link_id(key)) is not None]
        digests = await self.storage.document_digests(wanted) if wanted else {}
        links = await self.storage.link_digests(wanted_links) if wanted_links else {}
        for rec in batch:
            problem = await self._record(rec, digests, links)
            if problem is not None:
                return batch, problem
        return batch, None

    async def after_the_walk(self) -> _Problem | None:
        """The checkpoints not met along the walk: those stored behind it meanwhile are matched
        with their records; those past the last record mean records cut off (a bad signature
        among them is named first)."""
        self.checkpoints.exhausted = False
        first: Checkpoint | None = None
        for cp in await self.checkpoints.upto(None):
            problem = self._signature_problem(cp)
            if problem is None and cp.seq < self.expected_seq:
                problem = await self._match(cp, None)
            elif problem is None:
                first = first or cp
            if problem is not None:
                return problem
        if first is not None:
            return _Problem("missing_record", self.expected_seq,
                            f"checkpoint {first.id} covers seq {first.seq}")
        return None


async def _chained(storage: Storage, page: int, key: str) -> set[str]:
    """The ids every audit record pins under `key`. Built on failure only (the counts say a row
    is not in the trail), so memory stays flat when all is well."""
    chained: set[str] = set()
    after = 0
    while batch := await storage.audit_records(after_seq=after, limit=page):
        for rec in batch:
            pinned = rec.details.get(key)
            if isinstance(pinned, dict):
                chained.update(map(str, pinned))
        after = batch[-1].seq
    return chained


async def _first_unchained(storage: Storage, page: int, key: str,
                           ids_after: Callable[..., Awaitable[list[Any]]], start: Any) -> Any:
    """The first id (ascending, from `ids_after(after=, limit=)`: archived documents or linked
    records) that no audit record pins under `key`."""
    chained = await _chained(storage, page, key)
    last = start
    while ids := await ids_after(after=last, limit=page):
        for row_id in ids:
            if str(row_id) not in chained:
                return row_id
        last = ids[-1]
    return None


def _result(walk: _Walk, problem: _Problem | None, last_seq: int) -> AuditVerifyResult:
    anchoring = {"head_hash": walk.prev_hash, "anchored_seq": walk.anchored_seq,
                 "anchors_checked": walk.anchors_checked, "links_checked": walk.links}
    if problem is None:
        return AuditVerifyResult(True, walk.records, walk.checked_cps, None, None,
                                 f"{walk.records} audit records intact, {walk.verified_cps} "
                                 f"checkpoints verified, {walk.documents} archived documents "
                                 f"and {walk.links} linked records match", last_seq,
                                 walk.unverified, walk.documents, **anchoring)
    where = (f"audit record {problem.seq}" if problem.seq is not None
             else f"link {problem.link_id}" if problem.link_id is not None
             else f"document {problem.document_id}")
    message = f"{where}: {PROBLEMS[problem.problem]}" + (f" ({problem.detail})"
                                                          if problem.detail else "")
    return AuditVerifyResult(False, walk.records, walk.checked_cps, problem.seq, problem.problem,
                             message, last_seq, walk.unverified, walk.documents,
                             problem.document_id, link_id=problem.link_id, **anchoring)


async def verify_trail(storage: Storage, public_key: PublicKey | x509.Certificate | None,
                       *, page: int = 5000,
                       anchors: Mapping[int, str] | None = None) -> AuditVerifyResult:
    """Check every record, checkpoint and archived document; report the first problem by seq.

    `public_key`: the audit key (or its certificate) checkpoints are verified with. None checks
    the chain only and counts the checkpoints as unverified. `anchors`: seq -> hash of records
    seen by an earlier run and kept outside the database (21 CFR 1311.150: records protected
    from deletion; the only way to see a rollback of what no checkpoint covers): each must still
    be there with that hash.
    """
    walk = _Walk(storage, _public_key(public_key), page, dict(anchors or {}))
    # Counted before the walk: every document counted now was committed with its audit event,
    # which the walk (which reads up to a head read later) therefore meets.
    documents_before = await storage.count_documents()
    links_before = await storage.count_links()
    problem: _Problem | None = None
    after = 0
    head_seq, head_hash = 0, GENESIS_HASH
    for _ in range(_CATCH_UP_ROUNDS):
        read_from = walk.expected_seq
        while problem is None:
            batch, problem = await walk.page_of_records(after)
            if not batch:
                break
            after = batch[-1].seq
        # The head is read after the records: on a live gateway, records appended meanwhile
        # move it past what was read. They are not "cut off": read on and check them too. A head
        # past records that are not there (this round found none) is a cut tail.
        head_seq, head_hash = await storage.audit_head()
        if (problem is not None or head_seq <= walk.expected_seq - 1
                or walk.expected_seq == read_from):
            break
        walk.checkpoints.exhausted = False

    last_seq = walk.expected_seq - 1
    if problem is None:
        problem = await walk.after_the_walk()
    if problem is None and (head_seq != last_seq or (head_seq and head_hash != walk.prev_hash)):
        problem = _Problem("head_mismatch",
                           min(head_seq, last_seq) + 1 if head_seq != last_seq else head_seq,
                           f"head says seq {head_seq}")
    if problem is None and (beyond := [seq for seq in walk.anchors if seq > last_seq]):
        problem = _Problem("anchor_mismatch", min(beyond),
                           f"the trail ends at record {last_seq}")
    if problem is None and documents_before > walk.documents:
        doc_id = await _first_unchained(storage, page, ARCHIVED_KEY, storage.document_ids, "")
        problem = _Problem("document_unchained", None,
                           f"{documents_before} archived, {walk.documents} in the trail", doc_id)
    if problem is None and links_before > walk.links:
        link_id = await _first_unchained(storage, page, LINKED_KEY, storage.link_ids, 0)
        problem = _Problem("link_unchained", None,
                           f"{links_before} stored, {walk.links} in the trail", link_id=link_id)
    return _result(walk, problem, last_seq)
