"""Storage fixtures: every test taking `backend` or `storage` runs on SQLite AND PostgreSQL."""

from __future__ import annotations

from storage_backends import backend, storage  # noqa: F401 - fixtures

