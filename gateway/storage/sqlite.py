"""The embedded SQLite engine (the default: `<home>/gateway.sqlite3`).

WAL journal, `synchronous=FULL` (a commit is on disk when it returns). All writes happen on ONE
dedicated writer thread with its own connection; reads go to a small pool of reader threads with
their own connections (WAL lets them read while the writer writes). The event loop never runs
sqlite3. Writers of several processes serialise on `BEGIN IMMEDIATE`, which also makes the audit
chain one chain when two gateway processes share the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.request import pathname2url

from gateway.storage import migrations
from gateway.storage.base import (
    GENESIS_HASH, AuditRecord, Checkpoint, Client, ClientExists, ClientNotFound,
    CommitResult, DocumentNotFound, DocumentRecord, DuplicateDocument, InvalidRecord,
    LinkedRecord, MigrationError, StorageError, StorageUnavailable, archive_row_digest,
    decode_audit_row, decode_checkpoint_row, format_time, link_row_digest, lookup_ids,
    lookup_link_ids, parse_time, utcnow,
)
from gateway.storage.group_commit import (
    Adoption, ClientChange, DocumentRow, GroupCommitStorage, GroupCommitter, NewCheckpoint, Unit,
    UnitResult, chain, dump_json, link_digest, link_payload, unit_events,
)

T = TypeVar("T")

_DOC_COLUMNS = ("id, kind, content, content_type, sha256, report, client, key_label, natural_key, "
                "created_at, retain_until")
# The columns of an archive row `archive_row_digest` covers (all but the content), and of a link.
_ROW_COLUMNS = ("d.id, d.kind, d.content_type, d.sha256, d.report, d.client, d.key_label, "
                "d.natural_key, d.created_at, d.retain_until")
_LINK_COLUMNS = "id, document_id, kind, payload, client, created_at"
_AUDIT_COLUMNS = "seq, time, event_type, actor, outcome, subject, details, request_id, prev_hash, hash"
_CLIENT_COLUMNS = "id, name, role, key_labels, created_at, revoked_at, token_id"
_CHECKPOINT_COLUMNS = "id, seq, hash, time, key_label, algorithm, signature"


def _time(value: str | None) -> datetime | None:
    return parse_time(value) if value is not None else None


def _document(row: Sequence[Any]) -> DocumentRecord:
    return DocumentRecord(
        id=row[0], kind=row[1], content=bytes(row[2]), content_type=row[3], sha256=row[4],
        report=json.loads(row[5]) if row[5] is not None else None, client=row[6],
        key_label=row[7], natural_key=row[8], created_at=parse_time(row[9]),
        retain_until=parse_time(row[10]))


def _stored_text(value: Any) -> Any:
    # TEXT columns hold what was written unless edited behind the gateway: anything else (a
    # BLOB, a number) is hashed as a [type, repr] pair, which no text equals (its bare repr did:
    # a natural key "b'order-7'" turned into the BLOB b'order-7' kept its digest)
    return value if value is None or isinstance(value, str) else [type(value).__name__, repr(value)]


def _row_digest(row: Sequence[Any]) -> str:
    """`archive_row_digest` of a row selected as _ROW_COLUMNS (times as the stored text)."""
    t = [_stored_text(v) for v in row[:10]]
    return archive_row_digest(id=t[0] or "", kind=t[1] or "", content_type=t[2] or "",
                              sha256=t[3] or "", report=t[4], client=t[5], key_label=t[6],
                              natural_key=t[7], created_at=t[8] or "", retain_until=t[9] or "")


def _link_digest(row: Sequence[Any]) -> tuple[int, str]:
    """(id, `link_row_digest`) of a row selected as _LINK_COLUMNS."""
    t = [_stored_text(v) for v in row[1:6]]
    return int(row[0]), link_row_digest(id=int(row[0]), document_id=t[0] or "", kind=t[1] or "",
                                        payload=t[2] or "", client=t[3], created_at=t[4] or "")


def _audit(row: Sequence[Any]) -> AuditRecord:
    return decode_audit_row(row, parse_time)


def _client(row: Sequence[Any]) -> Client:
    return Client(id=row[0], name=row[1], role=row[2], key_labels=frozenset(json.loads(row[3])),
                  created_at=parse_time(row[4]), revoked_at=_time(row[5]), token_id=row[6])


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    return decode_checkpoint_row(row, parse_time)


def _sha256_hex(content: bytes | str | None) -> str | None:
    if content is None:
        return None
    return hashlib.sha256(content.encode("utf-8") if isinstance(content, str)
                          else bytes(content)).hexdigest()


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None when nothing is there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _unit_level(exc: BaseException) -> bool:
    """Whether an error belongs to one unit (a record the database or the encoder refuses: a
    constraint, a value it cannot bind, details nested too deep) rather than to the database
    (locked, full, I/O, corrupt), which fails the whole batch."""
    if isinstance(exc, StorageUnavailable | MemoryError) or not isinstance(exc, Exception):
        return False
    if isinstance(exc, sqlite3.Error):
        return isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError
                          | sqlite3.ProgrammingError)
    return True


class SqliteStorage(GroupCommitStorage):
    engine = "sqlite"

    def __init__(self, path: str | Path, *, readers: int = 2, max_batch: int = 256,
                 window_s: float = 0.001, busy_timeout_s: float = 30.0,
                 read_only: bool = False, min_free_bytes: int = 0) -> None:
        """`read_only`: for commands that only read (`audit verify`, `audit list`): a missing
        database is refused (StorageUnavailable), never created, and a current schema is used
        without taking the migration write lock. `min_free_bytes`: `health_check` fails while
        the database's filesystem has less free space (0: no check)."""
        self.path = Path(path)
        self.read_only = read_only
        self.min_free_bytes = min_free_bytes
        self._busy_timeout_s = busy_timeout_s
        self._readers = readers
        self._writer: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.committer = GroupCommitter(self._run_batch, max_batch=max_batch, window_s=window_s)
        self._opened = False
        # The database file, its WAL and WAL index as opened, recorded once open. A connection
        # keeps writing to a file deleted or replaced under it, and such commits are lost at the
        # next start (a crash loses what a removed WAL held: the whole database, before a
        # checkpoint); another process would build a second WAL index and overwrite our frames.
        # SQLite removes neither the WAL nor its index while a connection (ours) is open.
        self._file: tuple[int, int] | None = None
        self._wal: tuple[int, int] | None = None
        self._shm: tuple[int, int] | None = None
        self._wal_path = Path(f"{self.path}-wal")
        self._shm_path = Path(f"{self.path}-shm")

    # -- connections ---------------------------------------------------------------------------

    def _connect(self, *, reader: bool) -> sqlite3.Connection:
        try:
            if self.read_only or self._file is not None:
                # mode=rw: a database that is not there is refused, not created (a connection
                # made after open() must not leave an empty file where the database was)
                conn = sqlite3.connect(f"file:{pathname2url(str(self.path.absolute()))}?mode=rw",
                                       uri=True, timeout=self._busy_timeout_s,
                                       isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                       isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot open the database {self.path}: {exc}",
                                     path=str(self.path)) from exc
        moved = self._file_moved()
        if moved is not None:
            # Closed before it reads anything, so it never touches the -wal and -shm files
            # that the connections to the original file still use.
            conn.close()
            raise moved
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            # INSERT OR REPLACE deletes the row it replaces WITHOUT firing delete triggers unless
            # recursive triggers are on: without this, one REPLACE would rewrite an audit record
            # or move the chain head back past every append-only trigger.
            conn.execute("PRAGMA recursive_triggers = ON")
            conn.execute("PRAGMA busy_timeout = %d" % int(self._busy_timeout_s * 1000))
            if reader:
                conn.execute("PRAGMA query_only = ON")
            else:
                conn.execute("PRAGMA synchronous = FULL")
            # `audit verify` hashes archived documents inside the reader thread, one at a time
            conn.create_function("gateway_sha256", 1, _sha256_hex, deterministic=True)
        except sqlite3.Error as exc:  # not a database, unreadable...
            conn.close()
            raise StorageUnavailable(f"cannot open the database {self.path}: {exc}",
                                     path=str(self.path)) from exc
        with self._lock:
            self._connections.append(conn)
        return conn

    def _file_moved(self) -> StorageUnavailable | None:
        """The error to raise when the database or WAL file at its path is not the one
        opened, else None."""
        for path, opened, name in ((self.path, self._file, "database file"),
                                   (self._wal_path, self._wal, "write-ahead log"),
                                   (self._shm_path, self._shm, "write-ahead log index")):
            now = _file_id(path)
            if opened is None or now == opened:
                continue
            what = "removed" if now is None else "replaced by another file"
            return StorageUnavailable(
                f"the {name} {path} was {what} while the gateway ran; writes are refused until "
                "the original file is back, or the gateway is stopped (cleanly: the stop writes "
                "what the WAL holds into the database file) and started again", path=str(path))
        return None

    def _require_same_file(self, conn: sqlite3.Connection) -> None:
        """On the writer: raise _file_moved(). While the database file is still the one
        opened, what the WAL holds (commits already acknowledged) is first copied into it, while
        this connection can still read it: a crash would lose it."""
        moved = self._file_moved()
        if moved is None:
            return
        if self._wal is not None and _file_id(self.path) == self._file:
            try:
                conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            except sqlite3.Error:
                pass  # refused all the same
        raise moved

    def _conn(self, *, reader: bool) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(reader=reader)
            self._local.conn = conn
        return conn

    async def _on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StorageUnavailable("storage is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, lambda: fn(self._conn(reader=False)))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader_pool is None:
            raise StorageUnavailable("storage is not open")
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(self._conn(reader=True))
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"database read failed: {exc}") from exc

        return await loop.run_in_executor(self._reader_pool, run)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            return
        try:
            if self.read_only:
                if not self.path.is_file():
                    raise StorageUnavailable(f"no database at {self.path} (`gateway init` "
                                             "creates it)", path=str(self.path))
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # The archive holds prescriptions (patient data) and the client token hashes:
                # owner only. SQLite gives its -wal and -shm files the database file's mode.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StorageUnavailable(f"cannot open the database {self.path}: {exc}",
                                     path=str(self.path)) from exc
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-reader")
        try:
            if not self.read_only:  # a reader uses the journal mode the database has
                await self._on_writer(self._enable_wal)
            migrated = await self.migrate()
            self._file = _file_id(self.path)
            if not self.read_only:  # both exist from the first write on (the migration)
                self._wal, self._shm = _file_id(self._wal_path), _file_id(self._shm_path)
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, sqlite3.Error):
                raise StorageUnavailable(f"cannot open the database {self.path}: {exc}",
                                         path=str(self.path)) from exc
            raise
        if self.committer.closed:  # reopened after close()
            self.committer = GroupCommitter(self._run_batch, max_batch=self.committer.max_batch,
                                            window_s=self.committer.window_s)
        self.committer.start()
        self._opened = True
        # A reader that had to migrate (`audit verify` first after an upgrade) has written
        # already: it chains what the migration listed too, or it would report the rows
        # archived before the upgrade as inserted (document_unchained, link_unchained).
        if not self.read_only or migrated:
            await self.adopt_archive()

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL. SQLite answers "database is locked" at once, without its busy handler,
        when another process is switching the same new file at that moment (two nodes starting
        together): retry for as long as the busy timeout would have waited."""
        deadline = time.monotonic() + self._busy_timeout_s
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def close(self) -> None:
        await self.committer.stop()
        await self._shutdown()
        self._opened = False

    async def _shutdown(self) -> None:
        for pool in (self._writer, self._reader_pool):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        self._writer = self._reader_pool = None
        self._file = self._wal = self._shm = None
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- migrations ----------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        if self.read_only and await self._on_writer(self._schema_current):
            return []
        return await self._on_writer(self._migrate_sync)

    def _schema_current(self, conn: sqlite3.Connection) -> bool:
        """Whether every migration is applied, read without a lock (a reader under WAL is not
        blocked by a writer: `audit list` does not wait for a busy gateway)."""
        try:
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise StorageUnavailable(f"{self.path} holds no gateway database",
                                         path=str(self.path)) from exc
            raise StorageUnavailable(f"cannot read the database {self.path}: {exc}",
                                     path=str(self.path)) from exc
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot read the database {self.path}: {exc}",
                                     path=str(self.path)) from exc
        return done == {m.version for m in migrations.load("sqlite")}

    @staticmethod
    def _migrate_sync(conn: sqlite3.Connection) -> list[int]:
        applied_now: list[int] = []
        # BEGIN IMMEDIATE takes the write lock: a second process starting at once waits, then
        # sees the versions already recorded.
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # locked past the busy timeout, read-only file...
            raise StorageUnavailable(f"cannot lock the database to migrate it: {exc}") from exc
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            known = migrations.load("sqlite")
            if done - {m.version for m in known}:
                raise MigrationError(f"database has migrations this code does not know: "
                                     f"{sorted(done - {m.version for m in known})}")
            for m in known:
                if m.version in done:
                    continue
                for statement in migrations.split_sqlite(m.sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                             (m.version, m.name, format_time(utcnow())))
                applied_now.append(m.version)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc)
                                                              or "readonly" in str(exc)):
                raise StorageUnavailable(f"cannot migrate the database: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise MigrationError(f"migration failed: {exc}") from exc
            raise
        return applied_now

    async def schema_versions(self) -> list[int]:
        return await self._read(lambda c: [r[0] for r in c.execute(
            "SELECT version FROM schema_migrations ORDER BY version")])

    # -- writes --------------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Unit]) -> list[UnitResult | BaseException]:
        return await self._on_writer(lambda conn: self._batch_sync(conn, batch))

    def _batch_sync(self, conn: sqlite3.Connection,
                    batch: list[Unit]) -> list[UnitResult | BaseException]:
        self._require_same_file(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot start a write transaction: {exc}") from exc
        try:
            head_seq, head_hash = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            start_seq = head_seq
            results: list[UnitResult | BaseException] = []
            for unit in batch:
                conn.execute("SAVEPOINT unit")
                try:
                    result, head_seq, head_hash = self._apply(conn, unit, head_seq, head_hash)
                except Exception as exc:
                    if not _unit_level(exc):
                        raise
                    conn.execute("ROLLBACK TO unit")
                    conn.execute("RELEASE unit")
                    results.append(self._unit_error(conn, unit, exc))
                    continue
                conn.execute("RELEASE unit")
                results.append(result)
            if head_seq != start_seq:
                conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1",
                             (head_seq, head_hash))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StorageUnavailable(f"commit failed: {exc}") from exc
            raise
        # Removed or replaced during the commit: it went to a file no one will open again.
        self._require_same_file(conn)
        return results

    @staticmethod
    def _unit_error(conn: sqlite3.Connection, unit: Unit, exc: BaseException) -> BaseException:
        if isinstance(exc, StorageError):
            return exc
        if not isinstance(exc, sqlite3.IntegrityError):
            return InvalidRecord(f"record cannot be stored: {type(exc).__name__}: {exc}")
        text = str(exc)
        if "documents.kind, documents.natural_key" in text:
            for doc in unit.documents:
                if doc.natural_key is None:
                    continue
                row = conn.execute("SELECT id FROM documents WHERE kind = ? AND natural_key = ?",
                                   (doc.kind, doc.natural_key)).fetchone()
                if row is not None:
                    return DuplicateDocument(doc.kind, doc.natural_key, row[0])
            dup = next(d for d in unit.documents if d.natural_key is not None)
            return DuplicateDocument(dup.kind, dup.natural_key or "", None)  # twice in one unit
        if "documents.id" in text:
            return InvalidRecord("document id already used")
        if "FOREIGN KEY" in text:
            return DocumentNotFound("a link names a document that is not archived")
        if "clients.name" in text and unit.client_change is not None:
            return ClientExists(f"client {unit.client_change.name!r} already exists",
                                name=unit.client_change.name)
        return InvalidRecord(f"record refused by the database: {text}")

    def _apply(self, conn: sqlite3.Connection, unit: Unit, head_seq: int,
               head_hash: str) -> tuple[UnitResult, int, str]:
        now = utcnow()
        client = self._apply_client(conn, unit.client_change, now) if unit.client_change else None
        checkpoint = self._apply_checkpoint(conn, unit.checkpoint) if unit.checkpoint else None
        rows: dict[str, str] = {}
        for row in (DocumentRow.of(doc, now) for doc in unit.documents):
            doc = row.doc
            conn.execute(
                f"INSERT INTO documents ({_DOC_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (doc.id, doc.kind, bytes(doc.content), doc.content_type, doc.sha256, row.report,
                 doc.client, doc.key_label, doc.natural_key, format_time(row.created_at),
                 format_time(row.retain_until)))
            rows[doc.id] = row.digest()
        links: dict[int, str] = {}
        for link in unit.links:
            payload = link_payload(link)
            cur = conn.execute(
                "INSERT INTO links (document_id, kind, payload, client, created_at) VALUES (?,?,?,?,?)",
                (link.document_id, link.kind, payload, link.client, format_time(now)))
            link_id = int(cur.lastrowid or 0)
            links[link_id] = link_digest(link_id, link, payload, now)
        adopted = self._take_adoption(conn, unit.adopt) if unit.adopt else None
        records = chain(unit_events(unit, rows, links, adopted, checkpoint), head_seq, head_hash)
        if records:
            conn.executemany(
                f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(r.seq, format_time(r.time), r.event_type, r.actor, r.outcome, r.subject,
                  dump_json(r.details, "audit details"), r.request_id, r.prev_hash, r.hash)
                 for r in records])
            head_seq, head_hash = records[-1].seq, records[-1].hash
        commit = CommitResult(tuple(d.id for d in unit.documents), tuple(links), tuple(records))
        return UnitResult(commit, client, checkpoint), head_seq, head_hash

    @staticmethod
    def _take_adoption(conn: sqlite3.Connection, limit: int) -> Adoption:
        """Up to `limit` documents of each list still to be chained (migrations 0003, 0004),
        off the lists, with the SHA-256 of their content, or the digests of their rows and links.
        Entries whose document is gone are dropped once, when nothing else is left (a scan of the
        archive an event made the first start after an upgrade quadratic in the archive)."""
        adoption = Adoption()
        found = conn.execute("SELECT a.document_id, d.content FROM archive_adoption a "
                             "JOIN documents d ON d.id = a.document_id ORDER BY a.document_id LIMIT ?",
                             (limit,)).fetchall()
        conn.executemany("DELETE FROM archive_adoption WHERE document_id = ?", [(r[0],) for r in found])
        adoption.content = {r[0]: hashlib.sha256(r[1]).hexdigest() for r in found}
        found = conn.execute(f"SELECT {_ROW_COLUMNS}, a.links_upto FROM archive_row_adoption a "
                             "JOIN documents d ON d.id = a.document_id ORDER BY a.document_id LIMIT ?",
                             (limit,)).fetchall()
        conn.executemany("DELETE FROM archive_row_adoption WHERE document_id = ?",
                         [(r[0],) for r in found])
        for r in found:
            adoption.rows[r[0]] = _row_digest(r)
            adoption.links.update(_link_digest(link) for link in conn.execute(
                f"SELECT {_LINK_COLUMNS} FROM links WHERE document_id = ? AND id <= ? ORDER BY id",
                (r[0], r[-1])))
        if not adoption:
            for table in ("archive_adoption", "archive_row_adoption"):
                conn.execute(f"DELETE FROM {table} WHERE document_id NOT IN (SELECT id FROM documents)")
        return adoption

    @staticmethod
    def _apply_client(conn: sqlite3.Connection, change: ClientChange, now: datetime) -> Client:
        if change.action == "add":
            new = change.new
            assert new is not None
            conn.execute(
                "INSERT INTO clients (id, name, role, key_labels, token_id, token_hash, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (new.id, new.name, new.role, json.dumps(sorted(new.key_labels)), new.token_id,
                 new.token_hash, format_time(now)))
        else:
            row = conn.execute("SELECT revoked_at FROM clients WHERE name = ?",
                               (change.name,)).fetchone()
            if row is None:
                raise ClientNotFound(f"no client named {change.name!r}", name=change.name)
            if change.action == "revoke":
                conn.execute("UPDATE clients SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                             (format_time(change.at or now), change.name))
            else:
                if row[0] is not None:
                    raise InvalidRecord(f"client {change.name!r} is revoked", name=change.name)
                conn.execute("UPDATE clients SET key_labels = ? WHERE name = ?",
                             (json.dumps(sorted(change.key_labels or ())), change.name))
        row = conn.execute(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE name = ?",
                           (change.name,)).fetchone()
        return _client(row)

    @staticmethod
    def _apply_checkpoint(conn: sqlite3.Connection, cp: NewCheckpoint) -> Checkpoint:
        cur = conn.execute(
            "INSERT INTO audit_checkpoints (seq, hash, time, key_label, algorithm, signature) "
            "VALUES (?,?,?,?,?,?)",
            (cp.seq, cp.hash, format_time(cp.time), cp.key_label, cp.algorithm, cp.signature))
        return Checkpoint(int(cur.lastrowid or 0), cp.seq, cp.hash, cp.time, cp.key_label,
                          cp.algorithm, cp.signature)

    # -- archive reads -------------------------------------------------------------------------

    async def get_document(self, document_id: str) -> DocumentRecord | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE id = ?", (document_id,)).fetchone())
        return _document(row) if row else None

    async def find_document(self, kind: str, natural_key: str) -> DocumentRecord | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_DOC_COLUMNS} FROM documents WHERE kind = ? AND natural_key = ?",
            (kind, natural_key)).fetchone())
        return _document(row) if row else None

    async def list_documents(self, *, kind: str | None = None, client: str | None = None,
                             created_from: datetime | None = None,
                             created_to: datetime | None = None,
                             limit: int = 1000) -> list[DocumentRecord]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if client is not None:
            where.append("client = ?")
            args.append(client)
        if created_from is not None:
            where.append("created_at >= ?")
            args.append(format_time(created_from))
        if created_to is not None:
            where.append("created_at < ?")
            args.append(format_time(created_to))
        sql = (f"SELECT {_DOC_COLUMNS} FROM documents"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at, rowid LIMIT ?")
        rows = await self._read(lambda c: c.execute(sql, (*args, limit)).fetchall())
        return [_document(r) for r in rows]

    async def links(self, document_id: str, kind: str | None = None) -> list[LinkedRecord]:
        sql = "SELECT id, document_id, kind, payload, client, created_at FROM links WHERE document_id = ?"
        args: tuple[Any, ...] = (document_id,)
        if kind is not None:
            sql += " AND kind = ?"
            args += (kind,)
        rows = await self._read(lambda c: c.execute(sql + " ORDER BY id", args).fetchall())
        return [LinkedRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], parse_time(r[5]))
                for r in rows]

    async def document_digests(self, document_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        ids = lookup_ids(document_ids)

        def read(conn: sqlite3.Connection) -> dict[str, tuple[str, str]]:
            found: dict[str, tuple[str, str]] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for row in conn.execute(
                        f"SELECT {_ROW_COLUMNS}, gateway_sha256(d.content) FROM documents d "
                        f"WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    found[row[0]] = (row[-1], _row_digest(row))
            return found

        return await self._read(read)

    async def link_digests(self, link_ids: Sequence[int]) -> dict[int, str]:
        ids = lookup_link_ids(link_ids)

        def read(conn: sqlite3.Connection) -> dict[int, str]:
            found: dict[int, str] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                found.update(_link_digest(row) for row in conn.execute(
                    f"SELECT {_LINK_COLUMNS} FROM links WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk))
            return found

        return await self._read(read)

    async def count_links(self) -> int:
        return int((await self._read(lambda c: c.execute(
            "SELECT count(*) FROM links").fetchone()))[0])

    async def link_ids(self, after: int = 0, limit: int = 1000) -> list[int]:
        return [r[0] for r in await self._read(lambda c: c.execute(
            "SELECT id FROM links WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall())]

    async def count_documents(self) -> int:
        return int((await self._read(lambda c: c.execute(
            "SELECT count(*) FROM documents").fetchone()))[0])

    async def document_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        return [r[0] for r in await self._read(lambda c: c.execute(
            "SELECT id FROM documents WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall())]

    # -- clients -------------------------------------------------------------------------------

    async def get_client(self, name: str) -> Client | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE name = ?", (name,)).fetchone())
        return _client(row) if row else None

    async def client_by_token_id(self, token_id: str) -> tuple[Client, bytes] | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_CLIENT_COLUMNS}, token_hash FROM clients WHERE token_id = ?",
            (token_id,)).fetchone())
        return (_client(row), bytes(row[7])) if row else None

    async def list_clients(self) -> list[Client]:
        rows = await self._read(lambda c: c.execute(
            f"SELECT {_CLIENT_COLUMNS} FROM clients ORDER BY name").fetchall())
        return [_client(r) for r in rows]

    # -- audit ---------------------------------------------------------------------------------

    async def audit_head(self) -> tuple[int, str]:
        row = await self._read(lambda c: c.execute(
            "SELECT seq, hash FROM audit_head WHERE id = 1").fetchone())
        return (int(row[0]), row[1]) if row else (0, GENESIS_HASH)

    async def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        rows = await self._read(lambda c: c.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit)).fetchall())
        return [_audit(r) for r in rows]

    async def checkpoints(self, after: tuple[int, int] | None = None,
                          limit: int | None = None) -> list[Checkpoint]:
        sql = f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints"
        args: tuple[Any, ...] = ()
        if after is not None:
            sql += " WHERE (seq, id) > (?, ?)"
            args = tuple(after)
        sql += " ORDER BY seq, id"
        if limit is not None:
            sql += " LIMIT ?"
            args += (limit,)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [_checkpoint(r) for r in rows]

    async def last_checkpoint(self) -> Checkpoint | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC, id DESC "
            "LIMIT 1").fetchone())
        return _checkpoint(row) if row else None

    def _check_free_space(self) -> None:
        """Raise StorageUnavailable while the database's filesystem has less than
        `min_free_bytes` free: the one-row probe write still fits on a nearly full disk, and
        readiness must fail before the archive's commits do (a document or a WAL checkpoint
        needs far more than one row)."""
        if self.min_free_bytes <= 0:
            return
        try:
            st = os.statvfs(self.path)
        except OSError as exc:
            raise StorageUnavailable(f"cannot read the free space of {self.path}: {exc}",
                                     path=str(self.path)) from exc
        free = st.f_bavail * st.f_frsize  # what an unprivileged writer may still use
        if free < self.min_free_bytes:
            raise StorageUnavailable(
                f"only {free} bytes free on the filesystem of {self.path}, below [database] "
                f"min_free_bytes = {self.min_free_bytes}: free space before writes fail",
                path=str(self.path), free_bytes=free, min_free_bytes=self.min_free_bytes)

    async def health_check(self) -> None:
        def write(conn: sqlite3.Connection) -> None:
            self._require_same_file(conn)
            self._check_free_space()
            try:
                conn.execute("INSERT INTO health (id, checked_at) VALUES (1, ?) "
                             "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                             (format_time(utcnow()),))
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"database write failed: {exc}") from exc

        await self._on_writer(write)
        await self._read(lambda c: c.execute("SELECT checked_at FROM health").fetchone())
