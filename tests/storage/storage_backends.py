"""The two storage engines as test backends: SQLite in tmp_path, PostgreSQL in a fresh schema.

Used by tests/storage and tests/audit (their conftest files import the `backend` and `storage`
fixtures defined at the end).
PostgreSQL: postgresql://postgres@127.0.0.1:5432/test (override with GATEWAY_TEST_PG_URL); each
test gets its own schema `gw_test_<run>_<n>` (search_path set via server_settings), dropped at
the end. Unreachable server: skipped locally, a failure when CI is set.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.storage import Storage, storage_for_url

PG_URL = os.environ.get("GATEWAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN_ID = secrets.token_hex(3)
_counter = itertools.count(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def _pg_reachable() -> str | None:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


_reachability: dict[str, str | None] = {}


async def require_postgres() -> None:
    """Skip (locally) or fail (in CI) when the PostgreSQL server cannot be reached."""
    if "pg" not in _reachability:
        _reachability["pg"] = await _pg_reachable()
    problem = _reachability["pg"]
    if problem is not None:
        message = f"PostgreSQL at {PG_URL} unreachable: {problem}"
        if in_ci():
            pytest.fail(message + " (CI is set: PostgreSQL tests must run)")
        pytest.skip(message)


@dataclass
class Backend:
    """One engine under test. `raw()` talks to the database directly, as someone with database
    access (an administrator, or an attacker) would, bypassing the gateway."""

    name: str  # "sqlite" | "postgresql"
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    schema: str | None = None
    sqlite_path: Path | None = None

    def storage(self, **options: Any) -> Storage:
        return storage_for_url(self.url, **{**self.options, **options})

    @property
    def cli_url(self) -> str:
        """The URL for GATEWAY_DATABASE_URL (PostgreSQL: the schema as a server setting)."""
        return f"{self.url}?search_path={self.schema}" if self.schema else self.url

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should open this backend."""
        env = {"GATEWAY_TEST_DB_URL": self.url}
        if self.schema:
            env["GATEWAY_TEST_DB_SCHEMA"] = self.schema
        return env

    async def raw(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement outside the gateway (sqlite `?` / PostgreSQL `$1` placeholders)."""
        if self.name == "sqlite":
            return await asyncio.to_thread(self._raw_sqlite, sql, args)
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": self.schema or ""})
        try:
            rows = await conn.fetch(sql, *args)
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    def _raw_sqlite(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.sqlite_path, isolation_level=None)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def p(self, n: int) -> str:
        """The n-th placeholder (1-based) in this engine's syntax."""
        return "?" if self.name == "sqlite" else f"${n}"

    async def drop_protection(self, table: str) -> None:
        """Remove the append-only triggers of a table, as an attacker with DB access would."""
        if self.name == "sqlite":
            for (name,) in await self.raw(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", table):
                await self.raw(f"DROP TRIGGER {name}")
        else:
            await self.raw(f"ALTER TABLE {table} DISABLE TRIGGER USER")


async def make_pg_schema() -> str:
    schema = f"gw_test_{RUN_ID}_{next(_counter)}"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    return schema


async def drop_pg_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def backend_params() -> list[Any]:
    return ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


async def make_backend(name: str, tmp_path: Path) -> Backend:
    if name == "sqlite":
        path = tmp_path / "gateway.sqlite3"
        return Backend("sqlite", f"sqlite:///{path}", sqlite_path=path)
    await require_postgres()
    schema = await make_pg_schema()
    return Backend("postgresql", PG_URL, {"server_settings": {"search_path": schema}},
                   schema=schema)


# The `backend` and `storage` fixtures of tests/storage and tests/audit: their conftest files
# import these two names, so that both areas run every test on both engines the same way.

@pytest.fixture(params=backend_params())
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = await make_backend(request.param, tmp_path)
    yield b
    if b.schema:
        await drop_pg_schema(b.schema)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    s = backend.storage()
    await s.open()
    yield s
    await s.close()
