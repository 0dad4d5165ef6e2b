"""Storage fixtures: every test taking `backend` or `storage` runs on SQLite AND PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from storage_backends import Backend, backend_params, drop_pg_schema, make_backend

from gateway.storage import Storage


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
