"""The PostgreSQL engine (`GATEWAY_DATABASE_URL=postgresql://...`), asyncpg with a pool.

Group commit: one batch = one transaction. The fast path writes the whole batch with a few
statements (executemany); if any unit breaks a rule, the transaction is rolled back and the batch
is written again unit by unit, each in its own savepoint, so the offending unit fails alone.

Several gateway nodes share one database: a transaction that appends audit records first locks
the one-row `audit_head` (SELECT ... FOR UPDATE), so appends of all nodes serialise and form ONE
chain. Migrations run under a transaction-scoped advisory lock, so two nodes starting at once
apply each migration once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from gateway.storage import migrations
from gateway.storage.base import (
    GENESIS_HASH, AuditRecord, Checkpoint, Client, ClientExists, ClientNotFound, CommitResult,
    DocumentNotFound, DocumentRecord, DuplicateDocument, InvalidRecord, LinkedRecord,
    MigrationError, StorageError, StorageUnavailable, archive_row_digest, decode_audit_row,
    decode_checkpoint_row, link_row_digest, lookup_ids, lookup_link_ids, utcnow,
)
from gateway.storage.group_commit import (
    Adoption, ClientChange, DocumentRow, GroupCommitStorage, GroupCommitter, NewCheckpoint, Unit,
    UnitResult, chain, dump_json, link_digest, link_payload, unit_events,
)

_DOC_COLUMNS = ("id, kind, content, content_type, sha256, report, client, key_label, natural_key, "
                "created_at, retain_until")
_AUDIT_COLUMNS = "seq, time, event_type, actor, outcome, subject, details, request_id, prev_hash, hash"
_CLIENT_COLUMNS = "id, name, role, key_labels, created_at, revoked_at, token_id"
_CHECKPOINT_COLUMNS = "id, seq, hash, time, key_label, algorithm, signature"

_INSERT_DOC = (f"INSERT INTO documents ({_DOC_COLUMNS}) "
               "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
_INSERT_LINK = ("INSERT INTO links (document_id, kind, payload, client, created_at) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id")
# A time as format_time's text, made by the database whatever the session's time zone: an edited
# time asyncpg cannot turn into a datetime ('infinity', the year 10000) then hashes differently
# (NULL, five digits) instead of failing the whole read, and `audit verify` names its row.
_UTC_TEXT = "pg_catalog.to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS {}"
# The columns of an archive row `archive_row_digest` covers (all but the content), and of a link.
_ROW_COLUMNS = ("d.id, d.kind, d.content_type, d.sha256, d.report, d.client, d.key_label, "
                f"d.natural_key, {_UTC_TEXT.format('d.created_at', 'created_at')}, "
                f"{_UTC_TEXT.format('d.retain_until', 'retain_until')}")
_LINK_COLUMNS = ("l.id, l.document_id, l.kind, l.payload, l.client, "
                 f"{_UTC_TEXT.format('l.created_at', 'created_at')}")
_INSERT_AUDIT = (f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) "
                 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
_T = TypeVar("_T")

# InternalClientError: asyncpg's answer on a pooled connection the server has just terminated
# ("cannot switch to state ..."); the pool replaces the connection.
_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                      asyncpg.InternalClientError)
# A connection found dead (terminated while idle in the pool, a failover): worth one more try on
# a fresh connection when nothing can have been committed. Not a timeout: that would wait again.
_DEAD_CONNECTION = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError, ConnectionError)
# Errors of the database as a whole (connection, resources, shutdown, a transaction that must be
# retried, a schema or privilege that is not what the gateway expects): they fail the batch.
# Anything else raised while one unit is written (a constraint, a value PostgreSQL refuses, an
# index row too large, details nested too deep) fails that unit alone.
_BATCH_ERRORS = (*_CONNECTION_ERRORS, StorageUnavailable, MemoryError,
                 asyncpg.InsufficientResourcesError, asyncpg.OperatorInterventionError,
                 asyncpg.PostgresSystemError, asyncpg.TransactionRollbackError,
                 asyncpg.InvalidTransactionStateError, asyncpg.SyntaxOrAccessError,
                 asyncpg.LockNotAvailableError)


# Migrations may rewrite large tables, and a node waits for another's: not the statement timeout.
_MIGRATION_TIMEOUT_S = 3600.0


def _unit_level(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, _BATCH_ERRORS)


class _UnitFailed(Exception):
    """The fast path met a unit-level error: redo the batch with savepoints."""


class _NotCommitted(Exception):
    """The connection was found dead before COMMIT was sent: the batch may be written again."""


def _document(row: Mapping[str, Any]) -> DocumentRecord:
    return DocumentRecord(
        id=row["id"], kind=row["kind"], content=bytes(row["content"]),
        content_type=row["content_type"], sha256=row["sha256"],
        report=json.loads(row["report"]) if row["report"] is not None else None,
        client=row["client"], key_label=row["key_label"], natural_key=row["natural_key"],
        created_at=row["created_at"], retain_until=row["retain_until"])


def _row_digest(row: Mapping[str, Any]) -> str:
    """`archive_row_digest` of a row selected as _ROW_COLUMNS."""
    return archive_row_digest(
        id=row["id"], kind=row["kind"], content_type=row["content_type"], sha256=row["sha256"],
        report=row["report"], client=row["client"], key_label=row["key_label"],
        natural_key=row["natural_key"], created_at=row["created_at"],
        retain_until=row["retain_until"])


def _link_digest(row: Mapping[str, Any]) -> tuple[int, str]:
    """(id, `link_row_digest`) of a row selected as _LINK_COLUMNS."""
    return int(row["id"]), link_row_digest(
        id=int(row["id"]), document_id=row["document_id"], kind=row["kind"],
        payload=row["payload"], client=row["client"], created_at=row["created_at"])


def _same(value: Any) -> Any:
    return value


def _audit(row: Sequence[Any]) -> AuditRecord:
    return decode_audit_row(tuple(row), _same)


def _client(row: Mapping[str, Any]) -> Client:
    return Client(id=row["id"], name=row["name"], role=row["role"],
                  key_labels=frozenset(json.loads(row["key_labels"])),
                  created_at=row["created_at"], revoked_at=row["revoked_at"],
                  token_id=row["token_id"])


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    return decode_checkpoint_row(tuple(row), _same)


class PostgresStorage(GroupCommitStorage):
    engine = "postgresql"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8,
                 server_settings: Mapping[str, str] | None = None, max_batch: int = 256,
                 window_s: float = 0.001, connect_timeout_s: float = 10.0,
                 command_timeout_s: float = 30.0, read_only: bool = False) -> None:
        """`read_only`: for commands that only read: a schema without the gateway's tables is
        refused (StorageUnavailable), never created, and a current schema is used without
        taking the migration lock. `command_timeout_s`: the longest one statement (a COMMIT
        included) may take; past it the statement is cancelled and the batch fails with
        StorageUnavailable, so a lock held elsewhere or a silent server never holds the writer,
        and every caller queued behind it, for ever."""
        self.url = url
        self.read_only = read_only
        self._min_size = min_size
        self._max_size = max_size
        self._server_settings = dict(server_settings or {})
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self.committer = GroupCommitter(self._run_batch, max_batch=max_batch, window_s=window_s)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._min_size, max_size=self._max_size,
                server_settings=self._server_settings or None, timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError, ValueError, OverflowError) as exc:
            # an unknown database or role, a refused password, a malformed URL: no traceback
            raise StorageUnavailable(f"cannot connect to PostgreSQL: "
                                     f"{type(exc).__name__}: {exc}") from exc
        try:
            migrated = await self.migrate()
        except BaseException as exc:
            await self._pool.close()
            self._pool = None
            if isinstance(exc, (*_CONNECTION_ERRORS, asyncpg.PostgresError)):
                raise StorageUnavailable(f"cannot open the database: "
                                         f"{type(exc).__name__}: {exc}") from exc
            raise
        if self.committer.closed:  # reopened after close()
            self.committer = GroupCommitter(self._run_batch, max_batch=self.committer.max_batch,
                                            window_s=self.committer.window_s)
        self.committer.start()
        # A reader that had to migrate (`audit verify` first after an upgrade) has written
        # already: it chains what the migration listed too, or it would report the rows
        # archived before the upgrade as inserted (document_unchained, link_unchained).
        if not self.read_only or migrated:
            await self.adopt_archive()

    async def close(self) -> None:
        await self.committer.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageUnavailable("storage is not open")
        return self._pool

    def _failure(self, what: str, exc: BaseException) -> StorageUnavailable:
        if isinstance(exc, TimeoutError):  # its text is empty
            return StorageUnavailable(f"{what}: no answer from the database within "
                                      f"{self._command_timeout_s:g} s")
        return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}")

    async def _renew_connections(self) -> None:
        """One pooled connection found dead: the others most likely are too (the server
        restarted, a failover). Each is replaced when next taken from the pool."""
        await self._require_pool().expire_connections()

    async def _repeatable(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """`op()`, run once more on renewed connections when its pooled connection was found
        dead: for what can be repeated (a read, the readiness probe), unlike a commit."""
        try:
            return await op()
        except _DEAD_CONNECTION:
            await self._renew_connections()
            return await op()

    async def _fetch(self, sql: str, *args: Any, lookup: bool = False) -> list[asyncpg.Record]:
        """Rows of a query. `lookup`: the arguments are keys someone supplied; a key PostgreSQL
        cannot even compare (a NUL, which its text cannot hold) names nothing, so it finds
        nothing instead of failing the request."""
        try:
            return await self._repeatable(lambda: self._require_pool().fetch(sql, *args))
        except asyncpg.DataError:
            if lookup:
                return []
            raise
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # As for writes: whatever the server answers (not accepting connections, shutting
            # down, a cancelled statement) is the database's state, a 503, not a 500.
            raise self._failure("database read failed", exc) from exc

    async def _fetchrow(self, sql: str, *args: Any, lookup: bool = False) -> asyncpg.Record | None:
        rows = await self._fetch(sql, *args, lookup=lookup)
        return rows[0] if rows else None

    # -- migrations ----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        if self.read_only and await self._schema_current():
            return []
        applied: list[int] = []
        async with self._require_pool().acquire() as conn, conn.transaction():
            # one migrator per schema at a time, across processes and nodes
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':gateway_migrations'))",
                timeout=_MIGRATION_TIMEOUT_S)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            known = migrations.load("postgresql")
            unknown = done - {m.version for m in known}
            if unknown:
                raise MigrationError(f"database has migrations this code does not know: "
                                     f"{sorted(unknown)}")
            for m in known:
                if m.version in done:
                    continue
                try:
                    await conn.execute(m.sql, timeout=_MIGRATION_TIMEOUT_S)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {m.version} ({m.name}) failed: {exc}") from exc
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                   m.version, m.name)
                applied.append(m.version)
        return applied

    async def _schema_current(self) -> bool:
        """Whether every migration is applied, read without the migration lock."""
        try:
            rows = await self._require_pool().fetch("SELECT version FROM schema_migrations")
        except asyncpg.UndefinedTableError as exc:
            raise StorageUnavailable("the database holds no gateway schema") from exc
        return {r[0] for r in rows} == {m.version for m in migrations.load("postgresql")}

    async def schema_versions(self) -> list[int]:
        return [r[0] for r in await self._fetch(
            "SELECT version FROM schema_migrations ORDER BY version")]

    # -- writes --------------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Unit]) -> list[UnitResult | BaseException]:
        try:
            try:
                return await self._write_batch(batch)
            except _NotCommitted:
                # The connection was dead before COMMIT was sent: nothing of the batch is in
                # the database, so it is written once more, on a fresh connection.
                await self._renew_connections()
                return await self._write_batch(batch, last_try=True)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise self._failure("commit failed", exc) from exc

    async def _write_batch(self, batch: list[Unit], *,
                           last_try: bool = False) -> list[UnitResult | BaseException]:
        """One attempt; a dead connection met before COMMIT -> _NotCommitted (unless last_try)."""
        committing = False
        try:
            async with self._require_pool().acquire() as conn:
                if len(batch) > 1 and not any(u.adopt for u in batch):  # adoption: one by one
                    try:
                        async with conn.transaction():
                            results = await self._fast(conn, batch)
                            committing = True
                        return results
                    except _UnitFailed:
                        pass
                async with conn.transaction():
                    results = await self._one_by_one(conn, batch)
                    committing = True
                return results
        except _DEAD_CONNECTION as exc:
            if committing or last_try:  # lost during COMMIT: the outcome is unknown, never redone
                raise
            raise _NotCommitted() from exc

    @staticmethod
    async def _lock_head(conn: asyncpg.Connection, batch: list[Unit]) -> tuple[int, str] | None:
        if not any(u.audit or u.documents or u.links or u.adopt for u in batch):  # rows get an event
            return None
        row = await conn.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        return int(row["seq"]), row["hash"]

    @staticmethod
    def _document_values(row: DocumentRow) -> tuple[Any, ...]:
        doc = row.doc
        return (doc.id, doc.kind, bytes(doc.content), doc.content_type, doc.sha256, row.report,
                doc.client, doc.key_label, doc.natural_key, row.created_at, row.retain_until)

    @staticmethod
    async def _insert_links(conn: asyncpg.Connection, unit: Unit, now: datetime) -> dict[int, str]:
        """The unit's links written; link id -> row digest, in order."""
        links: dict[int, str] = {}
        for link in unit.links:
            payload = link_payload(link)
            link_id = int(await conn.fetchval(_INSERT_LINK, link.document_id, link.kind, payload,
                                              link.client, now))
            links[link_id] = link_digest(link_id, link, payload, now)
        return links

    @staticmethod
    def _audit_rows(records: Sequence[AuditRecord]) -> list[tuple[Any, ...]]:
        return [(r.seq, r.time, r.event_type, r.actor, r.outcome, r.subject,
                 dump_json(r.details, "audit details"), r.request_id, r.prev_hash, r.hash)
                for r in records]

    async def _fast(self, conn: asyncpg.Connection,
                    batch: list[Unit]) -> list[UnitResult | BaseException]:
        """The whole batch in a few statements; any unit-level error -> _UnitFailed."""
        try:
            head = await self._lock_head(conn, batch)
            now = utcnow()
            extras: list[tuple[Client | None, Checkpoint | None]] = []
            for unit in batch:
                client = (await self._apply_client(conn, unit.client_change, now)
                          if unit.client_change else None)
                checkpoint = (await self._apply_checkpoint(conn, unit.checkpoint)
                              if unit.checkpoint else None)
                extras.append((client, checkpoint))
            doc_rows = [[DocumentRow.of(d, now) for d in u.documents] for u in batch]
            if any(doc_rows):
                await conn.executemany(_INSERT_DOC, [self._document_values(r)
                                                     for rows in doc_rows for r in rows])
            link_ids = [await self._insert_links(conn, unit, now) for unit in batch]
            records: list[list[AuditRecord]] = []
            if head is not None:
                seq, digest = head
                for unit, rows, links, (_, checkpoint) in zip(batch, doc_rows, link_ids, extras,
                                                              strict=True):
                    chained = chain(unit_events(unit, {r.doc.id: r.digest() for r in rows}, links,
                                                None, checkpoint), seq, digest)
                    records.append(chained)
                    if chained:
                        seq, digest = chained[-1].seq, chained[-1].hash
                all_records = [r for rs in records for r in rs]
                await conn.executemany(_INSERT_AUDIT, self._audit_rows(all_records))
                await conn.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
                                   seq, digest)
            else:
                records = [[] for _ in batch]
        except Exception as exc:
            if not _unit_level(exc):
                raise
            raise _UnitFailed() from exc
        return [UnitResult(CommitResult(tuple(d.id for d in u.documents), tuple(ids), tuple(rs)),
                           client, checkpoint)
                for u, ids, rs, (client, checkpoint) in zip(batch, link_ids, records, extras,
                                                            strict=True)]

    async def _one_by_one(self, conn: asyncpg.Connection,
                          batch: list[Unit]) -> list[UnitResult | BaseException]:
        head = await self._lock_head(conn, batch)
        seq, digest = head if head is not None else (0, GENESIS_HASH)
        start_seq = seq
        results: list[UnitResult | BaseException] = []
        for unit in batch:
            try:
                async with conn.transaction():  # a savepoint
                    result, seq, digest = await self._apply(conn, unit, seq, digest)
            except Exception as exc:
                if not _unit_level(exc):
                    raise
                results.append(await self._unit_error(conn, unit, exc))
                continue
            results.append(result)
        if head is not None and seq != start_seq:
            await conn.execute("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", seq, digest)
        return results

    async def _apply(self, conn: asyncpg.Connection, unit: Unit, seq: int,
                     digest: str) -> tuple[UnitResult, int, str]:
        now = utcnow()
        client = await self._apply_client(conn, unit.client_change, now) if unit.client_change else None
        checkpoint = await self._apply_checkpoint(conn, unit.checkpoint) if unit.checkpoint else None
        doc_rows = [DocumentRow.of(d, now) for d in unit.documents]
        if doc_rows:
            await conn.executemany(_INSERT_DOC, [self._document_values(r) for r in doc_rows])
        link_ids = await self._insert_links(conn, unit, now)
        adopted = await self._take_adoption(conn, unit.adopt) if unit.adopt else None
        records = chain(unit_events(unit, {r.doc.id: r.digest() for r in doc_rows}, link_ids,
                                    adopted, checkpoint), seq, digest)
        if records:
            await conn.executemany(_INSERT_AUDIT, self._audit_rows(records))
            seq, digest = records[-1].seq, records[-1].hash
        commit = CommitResult(tuple(d.id for d in unit.documents), tuple(link_ids), tuple(records))
        return UnitResult(commit, client, checkpoint), seq, digest

    @staticmethod
    async def _take_adoption(conn: asyncpg.Connection, limit: int) -> Adoption:
        """Up to `limit` documents of each list still to be chained (migrations 0003, 0004),
        off the lists, with the SHA-256 of their content, or the digests of their rows and
        links (under the head lock: two nodes never take the same). A few statements an event
        whatever its size: a query a document, and a scan of the archive an event for entries
        whose document is gone, made the first start after an upgrade quadratic in the archive.
        Entries whose document is gone are dropped once, when nothing else is left."""
        adoption = Adoption()
        rows = await conn.fetch("SELECT a.document_id, encode(pg_catalog.sha256(d.content), 'hex') "
                                "AS digest FROM archive_adoption a JOIN documents d ON d.id = a.document_id "
                                "ORDER BY a.document_id LIMIT $1", limit)
        await conn.execute("DELETE FROM archive_adoption WHERE document_id = ANY($1::text[])",
                           [r["document_id"] for r in rows])
        adoption.content = {r["document_id"]: r["digest"] for r in rows}
        rows = await conn.fetch(f"SELECT {_ROW_COLUMNS} FROM archive_row_adoption a "
                                "JOIN documents d ON d.id = a.document_id "
                                "ORDER BY a.document_id LIMIT $1", limit)
        ids = [r["id"] for r in rows]
        adoption.rows = {r["id"]: _row_digest(r) for r in rows}
        adoption.links = dict(map(_link_digest, await conn.fetch(
            f"SELECT {_LINK_COLUMNS} FROM links l JOIN archive_row_adoption a ON a.document_id = l.document_id "
            "WHERE a.document_id = ANY($1::text[]) AND l.id <= a.links_upto ORDER BY l.id", ids)))
        await conn.execute("DELETE FROM archive_row_adoption WHERE document_id = ANY($1::text[])", ids)
        if not adoption:
            for table in ("archive_adoption", "archive_row_adoption"):
                await conn.execute(f"DELETE FROM {table} WHERE document_id NOT IN "
                                   "(SELECT id FROM documents)")
        return adoption

    @staticmethod
    async def _unit_error(conn: asyncpg.Connection, unit: Unit,
                          exc: BaseException) -> BaseException:
        if isinstance(exc, StorageError):
            return exc
        if not isinstance(exc, asyncpg.PostgresError):
            return InvalidRecord(f"record cannot be stored: {type(exc).__name__}: {exc}")
        if isinstance(exc, asyncpg.UniqueViolationError):
            constraint = exc.constraint_name or ""
            if constraint == "documents_kind_natural_key_key":
                for doc in unit.documents:
                    if doc.natural_key is None:
                        continue
                    existing = await conn.fetchval(
                        "SELECT id FROM documents WHERE kind = $1 AND natural_key = $2",
                        doc.kind, doc.natural_key)
                    if existing is not None:
                        return DuplicateDocument(doc.kind, doc.natural_key, existing)
                dup = next(d for d in unit.documents if d.natural_key is not None)
                return DuplicateDocument(dup.kind, dup.natural_key or "", None)
            if constraint == "clients_name_key" and unit.client_change is not None:
                return ClientExists(f"client {unit.client_change.name!r} already exists",
                                    name=unit.client_change.name)
            if constraint == "documents_pkey":
                return InvalidRecord("document id already used")
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            return DocumentNotFound("a link names a document that is not archived")
        return InvalidRecord(f"record refused by the database: {exc}")

    @staticmethod
    async def _apply_client(conn: asyncpg.Connection, change: ClientChange, now: datetime) -> Client:
        if change.action == "add":
            new = change.new
            assert new is not None
            await conn.execute(
                "INSERT INTO clients (id, name, role, key_labels, token_id, token_hash, created_at) "
                "VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)",
                new.id, new.name, new.role, json.dumps(sorted(new.key_labels)), new.token_id,
                new.token_hash, now)
        else:
            row = await conn.fetchrow("SELECT revoked_at FROM clients WHERE name = $1 FOR UPDATE",
                                      change.name)
            if row is None:
                raise ClientNotFound(f"no client named {change.name!r}", name=change.name)
            if change.action == "revoke":
                await conn.execute(
                    "UPDATE clients SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                    change.at or now, change.name)
            else:
                if row["revoked_at"] is not None:
                    raise InvalidRecord(f"client {change.name!r} is revoked", name=change.name)
                await conn.execute("UPDATE clients SET key_labels = $1::jsonb WHERE name = $2",
                                   json.dumps(sorted(change.key_labels or ())), change.name)
        row = await conn.fetchrow(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE name = $1",
                                  change.name)
        return _client(row)

    @staticmethod
    async def _apply_checkpoint(conn: asyncpg.Connection, cp: NewCheckpoint) -> Checkpoint:
        cid = await conn.fetchval(
            "INSERT INTO audit_checkpoints (seq, hash, time, key_label, algorithm, signature) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            cp.seq, cp.hash, cp.time, cp.key_label, cp.algorithm, cp.signature)
        return Checkpoint(int(cid), cp.seq, cp.hash, cp.time, cp.key_label, cp.algorithm,
                          cp.signature)

    # -- archive reads -------------------------------------------------------------------------

    async def get_document(self, document_id: str) -> DocumentRecord | None:
        row = await self._fetchrow(f"SELECT {_DOC_COLUMNS} FROM documents WHERE id = $1",
                                   document_id, lookup=True)
        return _document(row) if row else None

    async def find_document(self, kind: str, natural_key: str) -> DocumentRecord | None:
        row = await self._fetchrow(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE kind = $1 AND natural_key = $2",
            kind, natural_key, lookup=True)
        return _document(row) if row else None

    async def list_documents(self, *, kind: str | None = None, client: str | None = None,
                             created_from: datetime | None = None,
                             created_to: datetime | None = None,
                             limit: int = 1000) -> list[DocumentRecord]:
        where, args = [], []
        for column, op, value in (("kind", "=", kind), ("client", "=", client),
                                  ("created_at", ">=", created_from),
                                  ("created_at", "<", created_to)):
            if value is not None:
                args.append(value)
                where.append(f"{column} {op} ${len(args)}")
        args.append(limit)
        sql = (f"SELECT {_DOC_COLUMNS} FROM documents"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY created_at, rowno LIMIT ${len(args)}")
        return [_document(r) for r in await self._fetch(sql, *args, lookup=True)]

    async def links(self, document_id: str, kind: str | None = None) -> list[LinkedRecord]:
        sql = "SELECT id, document_id, kind, payload, client, created_at FROM links WHERE document_id = $1"
        args: list[Any] = [document_id]
        if kind is not None:
            sql += " AND kind = $2"
            args.append(kind)
        rows = await self._fetch(sql + " ORDER BY id", *args, lookup=True)
        return [LinkedRecord(r["id"], r["document_id"], r["kind"], json.loads(r["payload"]),
                             r["client"], r["created_at"]) for r in rows]

    async def document_digests(self, document_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        ids = lookup_ids(document_ids, nul=False)
        found: dict[str, tuple[str, str]] = {}
        for start in range(0, len(ids), 500):
            # pg_catalog named: a function of that name in the search path cannot stand in
            rows = await self._fetch(
                f"SELECT {_ROW_COLUMNS}, encode(pg_catalog.sha256(d.content), 'hex') AS digest "
                "FROM documents d WHERE d.id = ANY($1::text[])", ids[start:start + 500],
                lookup=True)
            found.update((r["id"], (r["digest"], _row_digest(r))) for r in rows)
        return found

    async def link_digests(self, link_ids: Sequence[int]) -> dict[int, str]:
        ids = lookup_link_ids(link_ids)
        found: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            found.update(map(_link_digest, await self._fetch(
                f"SELECT {_LINK_COLUMNS} FROM links l WHERE l.id = ANY($1::bigint[])",
                ids[start:start + 500], lookup=True)))
        return found

    async def count_links(self) -> int:
        return int((await self._fetchrow("SELECT count(*) FROM links"))[0])

    async def link_ids(self, after: int = 0, limit: int = 1000) -> list[int]:
        return [int(r["id"]) for r in await self._fetch(
            "SELECT id FROM links WHERE id > $1 ORDER BY id LIMIT $2", after, limit)]

    async def count_documents(self) -> int:
        return int((await self._fetchrow("SELECT count(*) FROM documents"))[0])

    async def document_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        return [r["id"] for r in await self._fetch(
            "SELECT id FROM documents WHERE id > $1 ORDER BY id LIMIT $2", after, limit)]

    # -- clients -------------------------------------------------------------------------------

    async def get_client(self, name: str) -> Client | None:
        row = await self._fetchrow(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE name = $1", name,
                                   lookup=True)
        return _client(row) if row else None

    async def client_by_token_id(self, token_id: str) -> tuple[Client, bytes] | None:
        row = await self._fetchrow(
            f"SELECT {_CLIENT_COLUMNS}, token_hash FROM clients WHERE token_id = $1", token_id,
            lookup=True)
        return (_client(row), bytes(row["token_hash"])) if row else None

    async def list_clients(self) -> list[Client]:
        return [_client(r) for r in await self._fetch(
            f"SELECT {_CLIENT_COLUMNS} FROM clients ORDER BY name")]

    # -- audit ---------------------------------------------------------------------------------

    async def audit_head(self) -> tuple[int, str]:
        row = await self._fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(row["seq"]), row["hash"]) if row else (0, GENESIS_HASH)

    async def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        rows = await self._fetch(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            after_seq, limit)
        return [_audit(r) for r in rows]

    async def checkpoints(self, after: tuple[int, int] | None = None,
                          limit: int | None = None) -> list[Checkpoint]:
        sql = f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints"
        args: list[Any] = []
        if after is not None:
            args += list(after)
            sql += " WHERE (seq, id) > ($1, $2)"
        sql += " ORDER BY seq, id"
        if limit is not None:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"
        return [_checkpoint(r) for r in await self._fetch(sql, *args)]

    async def last_checkpoint(self) -> Checkpoint | None:
        row = await self._fetchrow(f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints "
                                   "ORDER BY seq DESC, id DESC LIMIT 1")
        return _checkpoint(row) if row else None

    async def health_check(self) -> None:
        async def round_trip() -> None:
            async with self._require_pool().acquire() as conn:
                await conn.execute(
                    "INSERT INTO health (id, checked_at) VALUES (1, now()) "
                    "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at")
                await conn.fetchval("SELECT checked_at FROM health WHERE id = 1")

        try:
            await self._repeatable(round_trip)  # as for reads: a stale connection is no outage
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise self._failure("database write failed", exc) from exc
