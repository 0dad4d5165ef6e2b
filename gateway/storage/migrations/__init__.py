"""Numbered schema migrations, one folder per engine: `<engine>/NNNN_name.sql`.

To extend the schema (CSOS, EPCS tables...), add `NNNN_name.sql` with the next number to BOTH
folders. A migration runs once, inside a transaction, and is recorded in `schema_migrations`;
never edit one that has shipped, add a new one. Append-only tables get the refuse-change triggers
(see 0001): `gateway_refuse_change()` on PostgreSQL, RAISE(ABORT) triggers on SQLite.
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources

from gateway.storage.base import Migration

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def load(engine: str) -> list[Migration]:
    """The migrations of an engine ("sqlite" | "postgresql"), by version; numbers must not repeat."""
    folder = resources.files(__package__) / engine
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if not m:
            continue
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two {engine} migrations numbered {version}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def split_sqlite(script: str) -> list[str]:
    """Split a script into statements (trigger bodies with `;` inside stay whole)."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        if not buf and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:80]}")
    return statements
