"""The storage interface: archive, linked records, API clients and the audit trail.

One interface, two engines (embedded SQLite, the default; PostgreSQL when
`GATEWAY_DATABASE_URL=postgresql://...`). Everything the gateway must keep for DEA lives here:

* the archive of every signed or verified document, byte for byte, with its verification report
  (21 CFR 1305.27, 1311.60, 1311.305: kept at least two years, readily retrievable);
* records linked to an archived document (shipments, receipts, voids: 21 CFR 1305.22(d));
* API clients (hashed tokens, one role, the key labels they may use);
* the tamper-evident audit trail (21 CFR 1311.150, 1311.215): a hash chain with signed checkpoints.

Archived documents, linked records, audit records and checkpoints are append-only; the database
itself refuses UPDATE and DELETE on them (triggers), so a bug in the gateway cannot rewrite history.

Writes go through one *unit of work* (`Storage.commit_unit`): the documents, links and audit
events of one request are committed atomically, and a request is acknowledged only after its unit
is durably committed. Concurrent units share one commit (group commit), so throughput does not
fall to one fsync per request.

Ids: documents get a UUID string chosen when the `NewDocument` is built, so links and audit events
in the same unit can name it before it is stored. Links get an integer id from the database; audit
records are numbered by `seq` (1, 2, ...) along the chain.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

# --- vocabulary ------------------------------------------------------------------------------

ROLES: tuple[str, ...] = ("purchaser", "supplier", "prescriber_app", "pharmacy", "compliance", "admin")
OUTCOMES: tuple[str, ...] = ("success", "failure", "refused")
GENESIS_HASH = "0" * 64  # prev_hash of audit record 1
# A retain_until computed by the caller a moment before the commit is still "two years".
RETENTION_SLACK = timedelta(days=1)

Outcome = Literal["success", "failure", "refused"]

# Key columns sit in B-tree indexes, whose entries PostgreSQL caps at about 2,700 bytes: longer
# values are refused up front (UTF-8 bytes), never half-way through a shared commit.
MAX_KIND_BYTES = 128
MAX_NATURAL_KEY_BYTES = 1024
MAX_NAME_BYTES = 256  # client names, key labels, content types, ids
# The key in the details of the audit event of a unit that archives documents: document id ->
# SHA-256 of the archived content, so the chain pins the archive (`gateway audit verify`).
ARCHIVED_KEY = "archived_sha256"
# Beside it: document id -> SHA-256 of the rest of its archive row (`archive_row_digest`: kind,
# client, key label, verification report, natural key, times, the stored sha256 column), and
# link id -> SHA-256 of each linked record the unit writes (`link_row_digest`). The chain thus
# pins every column, not only the signed bytes: a report turned from failed to passed, a
# shortened retention or another client named is caught too.
ARCHIVED_ROW_KEY = "archived_row_sha256"
LINKED_KEY = "linked_sha256"
# The event a unit that archives documents without an audit event of its own gets.
ARCHIVED_EVENT = "document.archived"
# ... and one that only writes linked records.
LINKED_EVENT = "document.linked"
# Chains documents archived before audit events carried their hashes (upgrade, migrations 0003
# and 0004).
ADOPTED_EVENT = "archive.adopted"
# The time of a stored record whose time cannot be read (it was edited in the database).
UNREADABLE_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def minimum_retention(created_at: datetime) -> datetime:
    """created_at + 2 years (21 CFR 1305.27, 1311.305); Feb 29 rolls to Feb 28."""
    try:
        return created_at.replace(year=created_at.year + 2)
    except ValueError:
        return created_at.replace(year=created_at.year + 2, day=28)


def format_time(t: datetime) -> str:
    """The one text form of a timestamp used in hashes and signatures: UTC, microseconds, `Z`."""
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def clean_text(value: str | None) -> str | None:
    """NUL, which PostgreSQL text cannot hold, as U+FFFD: the same on both engines, so an event
    or document naming a NUL-carrying input is still written rather than refused."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _clean_fields(obj: object, *names: str,
                  clean: Callable[[str | None], str | None] = clean_text) -> None:
    for name in names:
        value = getattr(obj, name)
        cleaned = clean(value)
        if cleaned is not value:
            object.__setattr__(obj, name, cleaned)


def _too_long(value: str | None, limit: int) -> bool:
    return isinstance(value, str) and len(value) > limit // 4 and len(value.encode("utf-8")) > limit


def canonical_json(value: Any) -> str:
    """Sorted keys, compact separators, UTF-8 kept as is: the encoding hashed by the audit chain."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _row_digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def _time_text(t: datetime | str | None) -> Any:
    # the stored value is hashed as it is (SQLite's column, PostgreSQL's to_char): an edited time
    # that no longer parses, or that has no text form (None), still differs
    return format_time(t) if isinstance(t, datetime) else t


def archive_row_digest(*, id: str, kind: str, content_type: str, sha256: str,  # noqa: A002
                       report: str | None, client: str | None, key_label: str | None,
                       natural_key: str | None, created_at: datetime | str | None,
                       retain_until: datetime | str | None) -> str:
    """SHA-256 over every column of an archive row but the content (which the chain pins by its
    own hash): `report` as the stored text. Written into the unit's audit event, recomputed from
    the row by `audit verify` (21 CFR 1311.150: records protected from modification)."""
    return _row_digest({"id": id, "kind": kind, "content_type": content_type, "sha256": sha256,
                        "report": report, "client": client, "key_label": key_label,
                        "natural_key": natural_key, "created_at": _time_text(created_at),
                        "retain_until": _time_text(retain_until)})


def link_row_digest(*, id: int, document_id: str, kind: str, payload: str,  # noqa: A002
                    client: str | None, created_at: datetime | str | None) -> str:
    """SHA-256 over every column of a linked record (`payload` as the stored text)."""
    return _row_digest({"id": id, "document_id": document_id, "kind": kind, "payload": payload,
                        "client": client, "created_at": _time_text(created_at)})


def lookup_ids(ids: Sequence[Any], *, nul: bool = True) -> list[str]:
    """The distinct ids of `ids` a stored row can have: text UTF-8 can encode (and, when `nul`
    is False, without NUL, which PostgreSQL text cannot hold). The ids `audit verify` looks up
    come from audit details, which an edit in the database can fill with anything: one such id
    names no row, and must neither fail nor empty the lookup of the others."""
    found: list[str] = []
    for value in dict.fromkeys(ids):
        if isinstance(value, str) and (nul or "\x00" not in value):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                continue
            found.append(value)
    return found


def lookup_link_ids(ids: Sequence[Any]) -> list[int]:
    """The distinct ids of `ids` a stored link can have: positive 64-bit integers."""
    return [i for i in dict.fromkeys(ids)
            if isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2 ** 63]


# --- errors ----------------------------------------------------------------------------------

class StorageError(Exception):
    """Base of every storage failure; `code` is stable and maps onto the HTTP error codes."""

    code = "storage_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class StorageUnavailable(StorageError):
    """The database cannot be reached or refused to commit (disk full, connection lost): 503."""

    code = "database_unavailable"


class DuplicateDocument(StorageError):
    """A document with the same (kind, natural_key) is already archived: 409. Nothing was written.

    `existing_id` names the archived document.
    """

    code = "duplicate_document"

    def __init__(self, kind: str, natural_key: str, existing_id: str | None) -> None:
        super().__init__(f"a {kind} with key {natural_key!r} is already archived",
                         kind=kind, natural_key=natural_key, existing_id=existing_id)
        self.kind = kind
        self.natural_key = natural_key
        self.existing_id = existing_id


class InvalidRecord(StorageError):
    """A record fails a storage rule before anything is written (bad role, short retention...)."""

    code = "invalid_record"


class DocumentNotFound(StorageError):
    """A link names a document that is not archived."""

    code = "document_not_found"


class ClientExists(StorageError):
    """A client with that name already exists."""

    code = "client_exists"


class ClientNotFound(StorageError):
    """No client has that name."""

    code = "client_not_found"


class ImmutableRecord(StorageError):
    """The database refused to change or delete an append-only record."""

    code = "record_immutable"


class MigrationError(StorageError):
    """A schema migration failed or the database is newer than this code."""

    code = "migration_failed"


# --- records ---------------------------------------------------------------------------------

def _new_document_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewDocument:
    """A document to archive. `id` is chosen now so links/audit in the same unit can name it.

    kind: what it is ("csos_order", "newrx", "signed_xml", "signed_cms", "verified_xml", ...).
    natural_key: business identity for duplicate detection, unique per kind (e.g. order number +
        purchaser DEA number); None when the kind has none.
    retain_until: None means created_at + 2 years; an earlier date is refused (21 CFR 1305.27).
    """

    kind: str
    content: bytes
    content_type: str
    client: str | None = None  # name of the client that submitted it
    key_label: str | None = None  # HSM key that signed it (None for verified-only documents)
    report: Mapping[str, Any] | None = None  # verification report, JSON-serialisable
    natural_key: str | None = None
    retain_until: datetime | None = None
    id: str = field(default_factory=_new_document_id)

    def __post_init__(self) -> None:
        if not self.kind:
            raise InvalidRecord("document kind is empty")
        if not isinstance(self.content, bytes | bytearray | memoryview):
            raise InvalidRecord("document content must be bytes")
        if self.retain_until is not None and self.retain_until.tzinfo is None:
            raise InvalidRecord("retain_until must be timezone-aware")
        _clean_fields(self, "kind", "content_type", "client", "key_label", "natural_key")
        for name, limit in (("kind", MAX_KIND_BYTES), ("natural_key", MAX_NATURAL_KEY_BYTES),
                            ("client", MAX_NAME_BYTES), ("key_label", MAX_NAME_BYTES),
                            ("content_type", MAX_NAME_BYTES), ("id", MAX_NAME_BYTES)):
            if _too_long(getattr(self, name), limit):
                raise InvalidRecord(f"document {name} is longer than {limit} bytes", field=name)

    @functools.cached_property
    def sha256(self) -> str:
        # computed once: the archive row and the unit's audit event both carry it
        return hashlib.sha256(bytes(self.content)).hexdigest()


@dataclass(frozen=True)
class DocumentRecord:
    """An archived document as stored."""

    id: str
    kind: str
    content: bytes
    content_type: str
    sha256: str  # hex of SHA-256 over content
    report: dict[str, Any] | None
    client: str | None
    key_label: str | None
    natural_key: str | None
    created_at: datetime
    retain_until: datetime


@dataclass(frozen=True)
class NewLink:
    """A record linked to an archived document (shipment, receipt, void, SOM decision...)."""

    document_id: str
    kind: str
    payload: Mapping[str, Any]
    client: str | None = None

    def __post_init__(self) -> None:
        _clean_fields(self, "document_id", "kind", "client")
        for name in ("document_id", "kind", "client"):
            if _too_long(getattr(self, name), MAX_NAME_BYTES):
                raise InvalidRecord(f"link {name} is longer than {MAX_NAME_BYTES} bytes", field=name)


@dataclass(frozen=True)
class LinkedRecord:
    id: int
    document_id: str
    kind: str
    payload: dict[str, Any]
    client: str | None
    created_at: datetime


@dataclass(frozen=True)
class AuditEvent:
    """One auditable event (21 CFR 1311.150, 1311.215): date and time, type, identity, outcome.

    actor: the client name, or "system" / "cli".
    subject: what it was about (a document id, a key label, a client name), or None.
    """

    event_type: str
    actor: str
    outcome: Outcome
    subject: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    time: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise InvalidRecord(f"audit outcome must be one of {OUTCOMES}, not {self.outcome!r}")
        if not self.event_type or not self.actor:
            raise InvalidRecord("audit event_type and actor are required")
        if self.time.tzinfo is None:
            raise InvalidRecord("audit time must be timezone-aware")
        # A refusal naming a NUL-carrying input (a key label, a document id) is still audited.
        # So is one naming a lone surrogate (an undecodable byte of a command-line path), which
        # UTF-8 cannot encode: without this the event was refused and the action went unrecorded
        # (21 CFR 1311.150). Both as U+FFFD: the record says what it could.
        _clean_fields(self, "event_type", "actor", "subject", "request_id",
                      clean=lambda value: _without_surrogates(clean_text(value)))
        try:
            details = _without_surrogates(self.details)
        except RecursionError:
            details = self.details  # nested too deep: refused as such when stored
        if details is not self.details:
            object.__setattr__(self, "details", details)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> Any:
    """`value` (JSON-like) with lone surrogates in its strings and keys as U+FFFD; the same
    object when it has none, so the usual event costs a walk and no copy."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if _LONE_SURROGATE.search(value) else value
    if isinstance(value, Mapping):
        items = [(_without_surrogates(k), _without_surrogates(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, list | tuple):
        cleaned = [_without_surrogates(v) for v in value]
        return value if all(a is b for a, b in zip(cleaned, value, strict=True)) else cleaned
    return value


@dataclass(frozen=True)
class AuditRecord:
    """An audit event as chained: `hash` = SHA-256 over `canonical_bytes()` (which include prev_hash)."""

    seq: int
    time: datetime
    event_type: str
    actor: str
    outcome: str
    subject: str | None
    details: dict[str, Any]
    request_id: str | None
    prev_hash: str
    hash: str
    # Set when the stored row could not be decoded (edited in the database): what was wrong.
    damaged: str | None = None

    def canonical_bytes(self) -> bytes:
        return audit_canonical(self.seq, self.time, self.event_type, self.actor, self.outcome,
                               self.subject, self.details, self.request_id, self.prev_hash)

    def expected_hash(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def audit_canonical(seq: int, time: datetime, event_type: str, actor: str, outcome: str,
                    subject: str | None, details: Mapping[str, Any], request_id: str | None,
                    prev_hash: str) -> bytes:
    """The bytes an audit record's hash covers: sorted-key compact JSON of every field + prev_hash."""
    return canonical_json({
        "seq": seq, "time": format_time(time), "event_type": event_type, "actor": actor,
        "outcome": outcome, "subject": subject, "details": dict(details),
        "request_id": request_id, "prev_hash": prev_hash,
    }).encode("utf-8")


def _not_json(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


def decode_audit_row(row: Sequence[Any], time_of: Any) -> AuditRecord:
    """An audit record from a stored row (the columns of `AuditRecord` in order, details as JSON
    text); `time_of` turns the stored time into a datetime. A row edited in the database so that
    it no longer decodes gives a record with `damaged` set, never an exception: `audit verify`
    reports it at its seq and `audit list` shows it."""
    problems: list[str] = []
    seq = row[0]
    try:
        time = time_of(row[1])
        if not isinstance(time, datetime) or time.tzinfo is None:
            raise ValueError(time)
    except Exception:  # noqa: BLE001 - any garbage in the column is a damaged record
        time = UNREADABLE_TIME
        problems.append("time")
    texts: list[Any] = []
    for index, name, optional in ((2, "event_type", False), (3, "actor", False),
                                  (4, "outcome", False), (5, "subject", True),
                                  (7, "request_id", True), (8, "prev_hash", False),
                                  (9, "hash", False)):
        value = row[index]
        if not (isinstance(value, str) or (optional and value is None)):
            problems.append(name)
            value = None if optional else "?"
        texts.append(value)
    try:
        # NaN and numbers past float range load but cannot be hashed (canonical_json refuses
        # them): refused here, so that verification never meets them
        details = json.loads(row[6], parse_constant=_not_json, parse_float=_finite)
        if not isinstance(details, dict):
            raise ValueError("not an object")
    except Exception:  # noqa: BLE001 - not JSON, not text, or nested past the parser's depth
        details = {}
        problems.append("details")
    event_type, actor, outcome, subject, request_id, prev_hash, digest = texts
    return AuditRecord(seq, time, event_type, actor, outcome, subject, details, request_id,
                       prev_hash, digest,
                       damaged=f"unreadable {', '.join(problems)}" if problems else None)


def decode_checkpoint_row(row: Sequence[Any], time_of: Any) -> Checkpoint:
    """A checkpoint from a stored row (id, seq, hash, time, key_label, algorithm, signature); one
    that no longer decodes gets `damaged` set, like `decode_audit_row`."""
    problems: list[str] = []
    try:
        time = time_of(row[3])
        if not isinstance(time, datetime) or time.tzinfo is None:
            raise ValueError(time)
    except Exception:  # noqa: BLE001
        time = UNREADABLE_TIME
        problems.append("time")
    texts: list[str] = []
    for index, name in ((2, "hash"), (4, "key_label"), (5, "algorithm")):
        value = row[index]
        if not isinstance(value, str):
            problems.append(name)
            value = "?"
        texts.append(value)
    signature = row[6]
    if isinstance(signature, bytes | bytearray | memoryview):
        signature = bytes(signature)
    else:
        problems.append("signature")
        signature = b""
    seq = row[1]
    if not isinstance(seq, int):
        problems.append("seq")
        seq = -1
    return Checkpoint(row[0], seq, texts[0], time, texts[1], texts[2], signature,
                      damaged=f"unreadable {', '.join(problems)}" if problems else None)


def checkpoint_payload(seq: int, hash: str, time: datetime, key_label: str,  # noqa: A002
                       algorithm: str) -> bytes:
    """The bytes a checkpoint signature covers."""
    return canonical_json({
        "type": "gateway-audit-checkpoint", "seq": seq, "hash": hash, "time": format_time(time),
        "key_label": key_label, "algorithm": algorithm,
    }).encode("utf-8")


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the audit chain had head `hash` at `seq`", made by the HSM audit key."""

    id: int
    seq: int
    hash: str
    time: datetime
    key_label: str
    algorithm: str  # "rsa-sha256" | "ecdsa-sha256"
    signature: bytes
    damaged: str | None = None  # as for AuditRecord

    def payload(self) -> bytes:
        return checkpoint_payload(self.seq, self.hash, self.time, self.key_label, self.algorithm)


@dataclass(frozen=True)
class Client:
    """An API client: one role, the key labels it may use. The token itself is never stored."""

    id: str
    name: str
    role: str
    key_labels: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None = None
    token_id: str = ""  # public part of the token, used for lookup

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def may_use(self, key_label: str) -> bool:
        return self.active and key_label in self.key_labels


@dataclass(frozen=True)
class NewClient:
    """A client row to insert: `token_hash` = SHA-256 of the whole token (see gateway.clients)."""

    name: str
    role: str
    key_labels: frozenset[str]
    token_id: str
    token_hash: bytes
    id: str = field(default_factory=_new_document_id)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRecord(f"role must be one of {', '.join(ROLES)}, not {self.role!r}",
                                role=self.role)
        if not self.name:
            raise InvalidRecord("client name is empty")
        if _too_long(self.name, MAX_NAME_BYTES) or _too_long(self.token_id, MAX_NAME_BYTES):
            raise InvalidRecord(f"client name is longer than {MAX_NAME_BYTES} bytes")


@dataclass(frozen=True)
class CommitResult:
    """What one committed unit wrote, in the order given."""

    document_ids: tuple[str, ...] = ()
    link_ids: tuple[int, ...] = ()
    audit: tuple[AuditRecord, ...] = ()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


# --- the interface ---------------------------------------------------------------------------

class Storage(abc.ABC):
    """What the gateway keeps. All methods are coroutines and never block the event loop.

    Lifecycle: `storage = open_storage(settings)`, then `await storage.open()` (connects and
    applies pending migrations) ... `await storage.close()` (commits what is pending); or
    `async with open_storage(settings) as storage:`. An instance belongs to one event loop.
    """

    engine: str  # "sqlite" | "postgresql"

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, apply pending migrations, start the group-commit writer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending commits, stop the writer, close connections. Idempotent."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations (each once, recorded in schema_migrations); returns the
        versions applied now (empty when up to date). Safe when several processes start at once."""

    @abc.abstractmethod
    async def schema_versions(self) -> list[int]:
        """The migration versions recorded in schema_migrations, ascending."""

    # -- unit of work --------------------------------------------------------------------------

    @abc.abstractmethod
    async def commit_unit(self, *, documents: Sequence[NewDocument] = (),
                          links: Sequence[NewLink] = (),
                          audit: Sequence[AuditEvent] = ()) -> CommitResult:
        """Write documents, then links, then audit events atomically; return once durable.

        Either everything of the unit is committed or nothing is. Raises DuplicateDocument
        (natural key taken), DocumentNotFound (a link to an unknown document), InvalidRecord
        (anything else the unit's own records break), StorageUnavailable (the database; only
        this fails the other units of a shared commit). Concurrent calls share commits (group
        commit). The first audit event carries the SHA-256 of each document in its details
        (`archived_sha256`); documents without an event get a `document.archived` one.
        """

    async def append_audit(self, *events: AuditEvent) -> tuple[AuditRecord, ...]:
        """Append audit events alone (a refused request, a CLI action); returns the chained records."""
        return (await self.commit_unit(audit=events)).audit

    # -- archive -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_document(self, document_id: str) -> DocumentRecord | None:
        """The archived document, byte for byte, or None."""

    @abc.abstractmethod
    async def find_document(self, kind: str, natural_key: str) -> DocumentRecord | None:
        """The document of that kind with that natural key, or None."""

    @abc.abstractmethod
    async def list_documents(self, *, kind: str | None = None, client: str | None = None,
                             created_from: datetime | None = None,
                             created_to: datetime | None = None,
                             limit: int = 1000) -> list[DocumentRecord]:
        """Documents by creation time (oldest first), filtered; `created_to` is exclusive."""

    @abc.abstractmethod
    async def links(self, document_id: str, kind: str | None = None) -> list[LinkedRecord]:
        """Records linked to a document, in the order they were written."""

    @abc.abstractmethod
    async def document_digests(self, document_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """For each of these documents that exists: (SHA-256 of its stored content, computed now
        over the stored bytes rather than read from the `sha256` column; `archive_row_digest`
        of the rest of its row). What `audit verify` checks against the hashes the chain carries."""

    @abc.abstractmethod
    async def link_digests(self, link_ids: Sequence[int]) -> dict[int, str]:
        """`link_row_digest` of each of these linked records that exists."""

    @abc.abstractmethod
    async def count_links(self) -> int:
        """How many linked records are stored."""

    @abc.abstractmethod
    async def link_ids(self, after: int = 0, limit: int = 1000) -> list[int]:
        """Ids of linked records greater than `after`, ascending."""

    @abc.abstractmethod
    async def count_documents(self) -> int:
        """How many documents are archived."""

    @abc.abstractmethod
    async def document_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        """Ids of archived documents greater than `after`, ascending."""

    # -- clients -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_client(self, client: NewClient, audit: Sequence[AuditEvent] = ()) -> Client:
        """Insert a client (with its audit events, atomically). Raises ClientExists."""

    @abc.abstractmethod
    async def revoke_client(self, name: str, audit: Sequence[AuditEvent] = (),
                            at: datetime | None = None) -> Client:
        """Set revoked_at (once; revoking again keeps the first time). Raises ClientNotFound."""

    @abc.abstractmethod
    async def set_client_keys(self, name: str, key_labels: frozenset[str],
                              audit: Sequence[AuditEvent] = ()) -> Client:
        """Replace the key labels a client may use. Raises ClientNotFound (or revoked)."""

    @abc.abstractmethod
    async def get_client(self, name: str) -> Client | None:
        """The client with that name, revoked or not."""

    @abc.abstractmethod
    async def client_by_token_id(self, token_id: str) -> tuple[Client, bytes] | None:
        """The client and its stored token hash, for `gateway.clients.authenticate`."""

    @abc.abstractmethod
    async def list_clients(self) -> list[Client]:
        """All clients by name, revoked ones included."""

    # -- audit trail ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last audit record as kept in the head row; (0, GENESIS_HASH) if empty."""

    @abc.abstractmethod
    async def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        """Audit records with seq > after_seq, by seq (as stored, not re-checked)."""

    @abc.abstractmethod
    async def add_checkpoint(self, seq: int, hash: str, time: datetime, key_label: str,  # noqa: A002
                             algorithm: str, signature: bytes,
                             audit: Sequence[AuditEvent] = ()) -> Checkpoint:
        """Store a signed checkpoint (see gateway.audit.checkpoint, which makes them) with its
        audit events, atomically; the first event's details get the new `checkpoint_id`."""

    @abc.abstractmethod
    async def checkpoints(self, after: tuple[int, int] | None = None,
                          limit: int | None = None) -> list[Checkpoint]:
        """Checkpoints by (seq, id): all of them, or a page of at most `limit` after the
        (seq, id) `after`."""

    @abc.abstractmethod
    async def last_checkpoint(self) -> Checkpoint | None:
        """The checkpoint with the highest seq (the latest of those), or None."""

    # -- operations ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def health_check(self) -> None:
        """A real write and read round trip (for /readyz); raises StorageUnavailable. SQLite
        also fails while its filesystem has less than `min_free_bytes` free ([database])."""
