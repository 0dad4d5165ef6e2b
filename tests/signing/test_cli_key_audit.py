"""Key and PKI changes made from the command line land in the audit trail (21 CFR 1311.150)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

from gateway.config import Settings
from gateway.storage import open_storage


def _events(settings: Settings) -> list:
    async def read() -> list:
        async with open_storage(settings) as storage:
            return await storage.audit_records(after_seq=0, limit=100000)

    return asyncio.run(read())


def test_key_generation_and_refusal_are_audited(initialized_home: dict, softhsm_settings: Settings) -> None:
    label = f"audited-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway", "--home", str(softhsm_settings.home), *args],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())

    assert run("keys", "generate", "--label", label, "--type", "p256").returncode == 0
    assert run("keys", "generate", "--label", label, "--type", "p256").returncode == 1
    mine = [r for r in _events(softhsm_settings) if r.subject == label and r.event_type == "key.generated"]
    assert [r.outcome for r in mine] == ["success", "failure"]
    assert mine[0].actor == "cli" and len(mine[0].details["spki_sha256"]) == 64
    assert mine[1].details["code"] == "key_exists"


def test_a_change_failing_unexpectedly_is_audited_too(initialized_home: dict, softhsm_settings: Settings) -> None:
    """Not only refusals with a code: an attempt that breaks on something unforeseen (here the
    certificate file cannot be written) is an audit record with outcome failure."""
    label = f"audited-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway", "--home", str(softhsm_settings.home), *args],
                              capture_output=True, text=True, timeout=120, env=os.environ.copy())

    assert run("keys", "generate", "--label", label, "--type", "p256").returncode == 0
    (softhsm_settings.keys_dir / f"{label}.pem").mkdir(parents=True)  # in the way of the file
    proc = run("pki", "issue", "--label", label, "--profile", "epcs-pharmacy")
    assert proc.returncode != 0
    mine = [r for r in _events(softhsm_settings) if r.subject == label and r.event_type == "key.certificate_issued"]
    assert [r.outcome for r in mine] == ["failure"]
    assert mine[0].details["code"] == "unexpected_error" and "IsADirectoryError" in mine[0].details["message"]
