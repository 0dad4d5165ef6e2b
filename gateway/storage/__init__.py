"""Storage: the archive, linked records, API clients and the audit trail (see `base`).

`open_storage(settings)` picks the engine from the database URL: empty or `sqlite:///PATH` ->
embedded SQLite (the default, `<home>/gateway.sqlite3`); `postgresql://...` -> PostgreSQL.
The returned storage is not yet open: `await storage.open()` or `async with`.
"""

from __future__ import annotations

from gateway.config import Settings
from gateway.storage.base import (
    ROLES, AuditEvent, AuditRecord, Checkpoint, Client, ClientExists, ClientNotFound,
    CommitResult, DocumentNotFound, DocumentRecord, DuplicateDocument, ImmutableRecord,
    InvalidRecord, LinkedRecord, MigrationError, NewClient, NewDocument, NewLink, Storage,
    StorageError, StorageUnavailable,
)

__all__ = [
    "ROLES", "AuditEvent", "AuditRecord", "Checkpoint", "Client", "ClientExists", "ClientNotFound",
    "CommitResult", "DocumentNotFound", "DocumentRecord", "DuplicateDocument", "ImmutableRecord",
    "InvalidRecord", "LinkedRecord", "MigrationError", "NewClient", "NewDocument", "NewLink",
    "Storage", "StorageError", "StorageUnavailable", "open_storage", "storage_for_url",
]


def storage_for_url(url: str, **options: object) -> Storage:
    """A storage for a database URL (`sqlite:///path` or `postgresql://...`), not yet open."""
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.storage.postgres import PostgresStorage
        return PostgresStorage(url, **options)  # type: ignore[arg-type]
    if url.startswith("sqlite:///"):
        from gateway.storage.sqlite import SqliteStorage
        return SqliteStorage(url.removeprefix("sqlite:///"), **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported database URL {url.split(':', 1)[0]!r}: "
                     "use sqlite:///PATH or postgresql://...")


def open_storage(settings: Settings, **options: object) -> Storage:
    """The storage the settings name (GATEWAY_DATABASE_URL / [database] url, else SQLite in the
    home), with the engine's `[database]` settings; `options` override them."""
    url = settings.effective_database_url
    if url.startswith("sqlite:///"):
        configured: dict[str, object] = {"min_free_bytes": settings.database.min_free_bytes}
    else:
        configured = {"command_timeout_s": settings.database.command_timeout_s}
    return storage_for_url(url, **{**configured, **options})
