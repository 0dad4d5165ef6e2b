"""Audit fixtures: the storage backends of tests/storage (SQLite and PostgreSQL)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "storage"))

from storage_backends import (  # noqa: E402
    Backend, backend_params, drop_pg_schema, make_backend,
)

from gateway.audit import AuditKey  # noqa: E402
from gateway.storage import Storage  # noqa: E402


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


@pytest.fixture(scope="session")
def audit_key(hsm, rsa_key) -> AuditKey:  # noqa: ANN001 - the lead's session fixtures
    """Checkpoints are signed by a real key in the session's SoftHSM token."""
    return AuditKey.from_signer(hsm.signer(rsa_key))


@pytest.fixture(scope="session")
def audit_public_key(hsm, rsa_key):  # noqa: ANN001, ANN201
    return hsm.public_key(rsa_key)
