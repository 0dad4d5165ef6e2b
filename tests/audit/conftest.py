"""Audit fixtures: the storage backends of tests/storage (SQLite and PostgreSQL)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "storage"))

from storage_backends import backend, storage  # noqa: E402,F401 - fixtures

from gateway.audit import AuditKey  # noqa: E402


@pytest.fixture(scope="session")
def audit_key(hsm, rsa_key) -> AuditKey:  # noqa: ANN001 - the lead's session fixtures
    """Checkpoints are signed by a real key in the session's SoftHSM token."""
    return AuditKey.from_signer(hsm.signer(rsa_key))


@pytest.fixture(scope="session")
def audit_public_key(hsm, rsa_key):  # noqa: ANN001, ANN201
    return hsm.public_key(rsa_key)
