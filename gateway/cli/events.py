"""Audit events of command-line changes (21 CFR 1311.150: key, PKI and configuration changes,
and refused attempts at them, are auditable): written by the command that made the change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from gateway.cli import CommandError
from gateway.config import Settings


def record_event(settings: Settings, event_type: str, outcome: str, subject: str,
                 details: dict) -> None:
    """Append one audit event, actor `cli`; a failed write is a warning (the change is made)."""
    import asyncio

    from gateway.storage import open_storage
    from gateway.storage.base import AuditEvent

    async def write() -> None:
        async with open_storage(settings) as storage:
            await storage.append_audit(AuditEvent(event_type, "cli", outcome, subject=subject, details=details))

    try:
        asyncio.run(write())
    except Exception as exc:  # noqa: BLE001 - the change happened; say loudly that its record did not
        click.echo(f"warning [audit_write_failed]: {event_type} for {subject} not recorded: {exc}", err=True)


@contextmanager
def audited(settings: Settings, event_type: str, subject: str, **details: object) -> Iterator[dict]:
    """Record the command's outcome in the audit trail, success or refusal. Yields a dict the
    command may add details to."""
    extra: dict = dict(details)
    try:
        yield extra
    except CommandError as exc:
        record_event(settings, event_type, "failure", subject, {**extra, "code": exc.code, "message": exc.message})
        raise
    except Exception as exc:
        # An attempt that failed in an unforeseen way is still an attempt (21 CFR 1311.150).
        record_event(settings, event_type, "failure", subject,
                     {**extra, "code": "unexpected_error", "message": f"{type(exc).__name__}: {exc}"})
        raise
    record_event(settings, event_type, "success", subject, extra)
