"""`gateway clients ...` and `gateway audit ...` through click, on both engines.

The home is the session's SoftHSM home; GATEWAY_DATABASE_URL points each test at its own database.
"""

from __future__ import annotations

import asyncio
import json
import re

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from storage_backends import Backend

from gateway import clients
from gateway.cli import Context
from gateway.cli import cli as gateway_cli
from gateway.cli.admin import register
from gateway.config import Settings

AUDIT_LABEL = "audit"


def _cli() -> click.Group:
    if "clients" in gateway_cli.commands and "audit" in gateway_cli.commands:
        return gateway_cli

    @click.group()
    @click.option("--home", default=None)
    @click.pass_context
    def cli(ctx: click.Context, home: str | None) -> None:
        ctx.obj = Context(home)

    register(cli)
    return cli


@pytest.fixture
def gw(backend: Backend, softhsm_settings: Settings, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.cli_url)
    group = _cli()
    runner = CliRunner()

    def run(*args: str):  # noqa: ANN202
        return runner.invoke(group, ["--home", str(softhsm_settings.home), *args],
                             catch_exceptions=False)

    return run


@pytest.fixture(scope="module")
def audit_label(hsm) -> str:  # noqa: ANN001
    """The HSM audit key (`gateway init` makes it in a real home)."""
    if AUDIT_LABEL not in {k.label for k in hsm.list_keys()}:
        hsm.generate_keypair(AUDIT_LABEL, "rsa2048")
    return AUDIT_LABEL


def authenticate(backend: Backend, token: str):  # noqa: ANN201
    async def go():  # noqa: ANN202
        async with backend.storage() as s:
            return await clients.authenticate(s, token)
    return asyncio.run(go())


def test_clients_add_list_revoke(gw, backend: Backend) -> None:  # noqa: ANN001
    result = gw("clients", "add", "acme", "--role", "purchaser", "--keys", "k1,k2")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    assert re.fullmatch(r"gw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
    assert "cannot be shown again" in result.stderr
    assert authenticate(backend, token).name == "acme"

    listed = gw("clients", "list")
    assert listed.exit_code == 0
    assert re.search(r"acme\s+purchaser\s+k1,k2\s+\S+ \S+\s+-", listed.output), listed.output
    assert token not in listed.output

    assert gw("clients", "add", "acme", "--role", "admin").exit_code == 1  # name taken
    bad_role = gw("clients", "add", "x", "--role", "root")
    assert bad_role.exit_code == 2 and "root" in bad_role.output

    revoked = gw("clients", "revoke", "acme")
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert authenticate(backend, token) is None
    assert gw("clients", "revoke", "nobody").exit_code == 1
    assert '"revoked_at": null' not in gw("clients", "list", "--json").output


def test_audit_checkpoint_and_verify(gw, backend: Backend, audit_label: str, hsm,  # noqa: ANN001
                                     tmp_path) -> None:  # noqa: ANN001
    gw("clients", "add", "a", "--role", "pharmacy")
    cp = gw("audit", "checkpoint")
    assert cp.exit_code == 0, cp.output
    assert "record 1" in cp.output and f"'{audit_label}'" in cp.output
    gw("clients", "add", "b", "--role", "supplier")

    ok = gw("audit", "verify")
    assert ok.exit_code == 0, ok.output
    assert "intact: 3 records, 1 checkpoints, 0 archived documents, 0 linked records matched" in ok.output

    # the same with the public key exported to a file (verification away from the HSM)
    pem = hsm.public_key(audit_label).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "audit.pem"
    path.write_bytes(pem)
    assert gw("audit", "verify", "--public-key", str(path)).exit_code == 0

    # an attacker edits record 2 (after removing the table's protection)
    async def tamper() -> None:
        await backend.drop_protection("audit_log")
        await backend.raw("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")

    asyncio.run(tamper())
    broken = gw("audit", "verify")
    assert broken.exit_code == 1
    assert "BROKEN at record 2: hash_mismatch" in broken.output
    as_json = gw("audit", "verify", "--json")
    assert as_json.exit_code == 1 and '"first_bad_seq": 2' in as_json.output


def test_audit_key_missing_is_said_clearly(gw) -> None:  # noqa: ANN001
    gw("clients", "add", "a", "--role", "pharmacy")
    missing = gw("audit", "checkpoint", "--key", "no-such-audit-key")
    assert missing.exit_code == 1
    assert "audit key 'no-such-audit-key' is not in the HSM" in missing.output
    assert "gateway init" in missing.output
    # no checkpoints yet: the chain is checked and the missing key only noted
    noted = gw("audit", "verify", "--key", "no-such-audit-key")
    assert noted.exit_code == 0 and "not in the HSM" in noted.stderr


def test_audit_verify_without_key_but_with_checkpoints_is_not_a_pass(gw, audit_label: str) -> None:  # noqa: ANN001
    gw("clients", "add", "a", "--role", "pharmacy")
    assert gw("audit", "checkpoint").exit_code == 0
    result = gw("audit", "verify", "--key", "no-such-audit-key")
    assert result.exit_code == 2
    assert "NOT verified" in result.stderr and "not in the HSM" in result.stderr


def test_audit_list_for_daily_review(gw) -> None:  # noqa: ANN001
    for name in ("a", "b", "c"):
        assert gw("clients", "add", name, "--role", "pharmacy").exit_code == 0
    assert gw("clients", "revoke", "b").exit_code == 0
    listed = gw("audit", "list")
    assert listed.exit_code == 0
    lines = listed.output.strip().splitlines()
    assert len(lines) == 4 and "client_revoked" in lines[-1] and " b" in lines[-1]
    only = gw("audit", "list", "--type", "client_added", "--limit", "2", "--json")
    records = [json.loads(line) for line in only.output.strip().splitlines()]
    assert [(r["seq"], r["subject"]) for r in records] == [(2, "b"), (3, "c")]
    assert gw("audit", "list", "--since", "2999-01-01").output == ""
    assert gw("audit", "list", "--outcome", "refused").output == ""


def _run_on(url: str, softhsm_settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str):  # noqa: ANN202
    monkeypatch.setenv("GATEWAY_DATABASE_URL", url)
    return CliRunner().invoke(_cli(), ["--home", str(softhsm_settings.home), *args],
                              catch_exceptions=False)


def test_read_only_commands_refuse_a_missing_database(tmp_path, softhsm_settings: Settings,  # noqa: ANN001
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      audit_label: str) -> None:
    """`audit verify` on a database that is not there used to create it and call it intact."""
    path = tmp_path / "nowhere" / "gateway.sqlite3"
    url = f"sqlite:///{path}"
    verify = _run_on(url, softhsm_settings, monkeypatch, "audit", "verify")
    assert verify.exit_code == 2 and "database_unavailable" in verify.output, verify.output
    assert "intact" not in verify.output
    for args in (("audit", "list"), ("clients", "list")):
        result = _run_on(url, softhsm_settings, monkeypatch, *args)
        assert result.exit_code == 1 and "database_unavailable" in result.output, result.output
    assert not path.exists() and not path.parent.exists()


def test_audit_list_and_verify_on_a_busy_sqlite_database(tmp_path, softhsm_settings: Settings,  # noqa: ANN001
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway holding the write lock does not keep the daily review waiting 30 s."""
    import sqlite3
    import time

    path = tmp_path / "gateway.sqlite3"
    url = f"sqlite:///{path}"
    assert _run_on(url, softhsm_settings, monkeypatch, "clients", "add", "a",
                   "--role", "pharmacy").exit_code == 0
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        listed = _run_on(url, softhsm_settings, monkeypatch, "audit", "list")
        verified = _run_on(url, softhsm_settings, monkeypatch, "audit", "verify",
                           "--key", "no-such-audit-key")
        assert time.monotonic() - started < 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert listed.exit_code == 0 and "client_added" in listed.output, listed.output
    assert verified.exit_code == 0 and "intact: 1 records" in verified.output, verified.output


def test_undecodable_record_is_listed_and_reported(gw, backend: Backend) -> None:  # noqa: ANN001
    for name in ("a", "b", "c"):
        assert gw("clients", "add", name, "--role", "pharmacy").exit_code == 0

    async def tamper() -> None:
        await backend.drop_protection("audit_log")
        await backend.raw("UPDATE audit_log SET details = '{\"role\": ' WHERE seq = 2")

    asyncio.run(tamper())
    listed = gw("audit", "list")
    assert listed.exit_code == 0
    lines = listed.output.strip().splitlines()
    assert len(lines) == 3 and "DAMAGED: unreadable details" in lines[1], listed.output
    # shown whatever the filters: the review is where it must be seen
    only = gw("audit", "list", "--type", "client_revoked", "--json")
    assert [json.loads(line)["seq"] for line in only.output.strip().splitlines()] == [2]
    broken = gw("audit", "verify", "--key", "no-such-audit-key")
    assert broken.exit_code == 1
    assert "BROKEN at record 2: record_undecodable" in broken.output


def test_modified_archived_document_named_by_audit_verify(gw, backend: Backend) -> None:  # noqa: ANN001
    from gateway.storage import AuditEvent, NewDocument

    doc = NewDocument("signed_xml", b"<order qty='10'/>", "application/xml", client="a")

    async def archive_then_tamper() -> None:
        async with backend.storage() as s:
            await s.commit_unit(documents=[doc], audit=[AuditEvent("document.signed", "a",
                                                                   "success", subject=doc.id)])
        await backend.drop_protection("documents")
        await backend.raw(f"UPDATE documents SET content = {backend.p(1)}", b"<order qty='90'/>")

    asyncio.run(archive_then_tamper())
    broken = gw("audit", "verify", "--key", "no-such-audit-key", "--json")
    assert broken.exit_code == 1
    out = json.loads(broken.output)
    assert (out["first_bad_seq"], out["problem"], out["document_id"]) == (
        1, "document_modified", doc.id)
