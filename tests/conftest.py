"""Shared fixtures. Areas add their own in tests/<area>/conftest.py."""
