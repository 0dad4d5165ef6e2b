"""`gateway clients ...` and `gateway audit ...`: API clients and the audit trail.

Every command here that changes something writes an audit event with actor "cli".
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gateway.cli import CommandError, Context, pass_context
from gateway.storage import ROLES, Storage, StorageError, open_storage

T = TypeVar("T")

EXIT_BROKEN = 1
EXIT_UNUSABLE = 2


class _StorageFailed(CommandError):
    """A storage refusal, `error [code] message`; `audit verify` exits 2 (could not check)."""

    def __init__(self, code: str, message: str, exit_code: int) -> None:
        super().__init__(code, message)
        self.exit_code = exit_code


def _run(ctx: Context, fn: Callable[[Storage], Awaitable[T]], *, read_only: bool = False,
         exit_code: int = 1) -> T:
    """Open the home's storage, run fn, close; storage errors become clean CLI errors.

    `read_only`: a command that only reads never creates the database (a missing one is
    `database_unavailable`) and does not wait for the migration lock when the schema is current.
    """

    async def main() -> T:
        async with open_storage(ctx.settings, read_only=read_only) as storage:
            return await fn(storage)

    try:
        return asyncio.run(main())
    except StorageError as exc:
        raise _StorageFailed(exc.code, exc.message, exit_code) from exc


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


# --- clients -----------------------------------------------------------------------------------

@click.group("clients")
def clients_group() -> None:
    """API clients: tokens, roles and the HSM keys each client may use."""


@clients_group.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="The client's one role.")
@click.option("--keys", default="", help="Comma-separated key labels the client may use.")
@pass_context
def clients_add(ctx: Context, name: str, role: str, keys: str) -> None:
    """Add a client and print its token (shown once, only its hash is kept)."""
    from gateway.clients import add_client

    client, token = _run(ctx, lambda s: add_client(s, name, role, keys))
    click.echo(token)
    click.echo(f"client {client.name} ({client.role}) added; keys: "
               f"{', '.join(sorted(client.key_labels)) or '-'}. Store the token now: "
               "it cannot be shown again.", err=True)


@clients_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@pass_context
def clients_list(ctx: Context, as_json: bool) -> None:
    """List clients, revoked ones included (tokens are never shown)."""
    clients = _run(ctx, lambda s: s.list_clients(), read_only=True)
    if as_json:
        click.echo(json.dumps([{
            "name": c.name, "role": c.role, "keys": sorted(c.key_labels), "token_id": c.token_id,
            "created_at": _fmt_time(c.created_at), "revoked_at": _fmt_time(c.revoked_at)
            if c.revoked_at else None} for c in clients], indent=2))
        return
    rows = [("NAME", "ROLE", "KEYS", "CREATED", "REVOKED")] + [
        (c.name, c.role, ",".join(sorted(c.key_labels)) or "-", _fmt_time(c.created_at),
         _fmt_time(c.revoked_at)) for c in clients]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@clients_group.command("revoke")
@click.argument("name")
@pass_context
def clients_revoke(ctx: Context, name: str) -> None:
    """Revoke a client's token for good."""
    from gateway.clients import find_client, revoke_client

    async def revoke(storage: Storage) -> tuple[bool, Any]:
        before = await find_client(storage, name)
        return before is not None and before.revoked_at is not None, await revoke_client(storage, name)

    already, client = _run(ctx, revoke)
    state = "was already revoked" if already else "revoked"
    click.echo(f"client {client.name} {state} at {_fmt_time(client.revoked_at)}")


@clients_group.command("keys")
@click.argument("name")
@click.option("--keys", required=True, help="Comma-separated key labels (replaces the set).")
@pass_context
def clients_keys(ctx: Context, name: str, keys: str) -> None:
    """Replace the key labels a client may use."""
    from gateway.clients import set_client_keys

    client = _run(ctx, lambda s: set_client_keys(s, name, keys))
    click.echo(f"client {client.name} may use: {', '.join(sorted(client.key_labels)) or '-'}")


# --- audit -------------------------------------------------------------------------------------

@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail (21 CFR 1311.150, 1311.215)."""


def _load_public_key(path: Path) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = path.read_bytes()
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data)
    return load_pem_public_key(data)


_ANCHOR = re.compile(r"([1-9][0-9]{0,18}):([0-9a-f]{64})")


def _parse_anchors(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> dict[int, str]:
    """`SEQ:HASH` (as the `head:` line prints it) -> {seq: hash}."""
    anchors: dict[int, str] = {}
    for value in values:
        match = _ANCHOR.fullmatch(value.strip().lower())
        if match is None:
            raise click.BadParameter(f"{value!r} is not SEQ:HASH (a record number, a colon and "
                                     "64 hex digits)", ctx, param)
        seq, digest = int(match.group(1)), match.group(2)
        if anchors.setdefault(seq, digest) != digest:
            raise click.BadParameter(f"two hashes for record {seq}", ctx, param)
    return anchors


def _audit_key_from_hsm(ctx: Context, label: str) -> tuple[Any, str | None]:
    """(public key or certificate, None) or (None, why not)."""
    from gateway.signing.hsm import Hsm, HsmError, KeyNotFound

    try:
        with Hsm.open(ctx.settings) as hsm:
            cert = hsm.certificate(label)
            return (cert if cert is not None else hsm.public_key(label)), None
    except KeyNotFound:
        return None, (f"the audit key '{label}' is not in the HSM; `gateway init` generates it")
    except HsmError as exc:
        return None, f"the HSM is unavailable ({exc}); is the home set up (`gateway init`)?"


@audit_group.command("verify")
@click.option("--public-key", "public_key_path", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="Verify checkpoints with this PEM public key or certificate "
              "instead of the HSM audit key.")
@click.option("--key", "label", default="audit", show_default=True, help="HSM audit key label.")
@click.option("--anchor", "anchors", multiple=True, callback=_parse_anchors, metavar="SEQ:HASH",
              help="A record an earlier run reported (its `head:` line), kept outside the "
              "database: it must still be there with that hash (detects a rollback, a cut tail or "
              "a rebuilt trail). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def audit_verify(ctx: Context, public_key_path: Path | None, label: str,
                 anchors: dict[int, str], as_json: bool) -> None:
    """Check the audit trail and the archive end to end; exit 0 intact, 1 broken (names the first
    bad record, and the document at fault), 2 when it could not be checked (checkpoint
    signatures, or the database unavailable)."""
    from gateway.audit import verify_trail

    key_problem = None
    if public_key_path is not None:
        try:
            key = _load_public_key(public_key_path)
        except ValueError as exc:
            raise CommandError("certificate_unreadable", f"cannot read {public_key_path}: {exc}") from exc
    else:
        key, key_problem = _audit_key_from_hsm(ctx, label)
    result = _run(ctx, lambda s: verify_trail(s, key, anchors=anchors), read_only=True,
                  exit_code=EXIT_UNUSABLE)
    if as_json:
        out = result.as_dict()
        if key_problem:
            out["key_problem"] = key_problem
        click.echo(json.dumps(out, indent=2))
    elif result.ok:
        click.echo(f"audit trail intact: {result.records_checked} records, "
                   f"{result.checkpoints_checked} checkpoints, {result.documents_checked} "
                   f"archived documents, {result.links_checked} linked records matched")
        if result.last_seq:
            # What to keep outside the database: a later run given it as --anchor sees a rollback.
            click.echo(f"head: {result.last_seq}:{result.head_hash}")
    elif result.first_bad_seq is None:  # a document or link no record carries
        # the message names what the attacker wrote (a document id): shown, never obeyed
        click.echo(f"audit trail BROKEN: {result.problem}: {_shown(result.message)}")
    else:
        click.echo(f"audit trail BROKEN at record {result.first_bad_seq}: {result.problem}: "
                   f"{_shown(result.message)}")
    if not result.ok:
        raise SystemExit(EXIT_BROKEN)
    if result.checkpoints_unverified:
        click.echo(f"{result.checkpoints_unverified} checkpoint signatures NOT verified: "
                   f"{key_problem}", err=True)
        raise SystemExit(EXIT_UNUSABLE)
    if key_problem:
        click.echo(f"note: {key_problem} (no checkpoints to verify)", err=True)
    if result.unanchored_records and not as_json:
        # 21 CFR 1311.150: say what this run could not protect, rather than call it intact alone
        click.echo(f"note: {result.unanchored_records} records after record {result.anchored_seq}"
                   " are not covered by a signed checkpoint: a deletion of them, a rollback or a "
                   "rebuilt trail is not detectable without an --anchor kept from an earlier run",
                   err=True)


def _shown(text: str) -> str:
    """A record's text as the reviewer's terminal should show it: every character that is not
    printable (escape sequences, line breaks that would forge a row, bidi overrides, zero-width
    characters) as its code point, so a value cannot rewrite or hide what the review sees
    (21 CFR 1311.215: the trail is analysed daily)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"[U+{ord(c):04X}]" for c in text)


@audit_group.command("list")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), default=None,
              help="Only records at or after this UTC date/time.")
@click.option("--outcome", type=click.Choice(["success", "failure", "refused"]), default=None)
@click.option("--type", "event_type", default=None, help="Only this event type.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True,
              help="At most this many records (the most recent ones).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def audit_list(ctx: Context, since: Any, outcome: str | None, event_type: str | None,
               limit: int, as_json: bool) -> None:
    """Show audit records for review (21 CFR 1311.215: the trail is analysed daily)."""
    from collections import deque
    from datetime import UTC

    since_utc = since.replace(tzinfo=UTC) if since is not None else None

    async def collect(storage: Storage) -> list[Any]:
        kept: deque[Any] = deque(maxlen=limit)
        after = 0
        while batch := await storage.audit_records(after_seq=after, limit=5000):
            for rec in batch:
                if rec.damaged or ((since_utc is None or rec.time >= since_utc)
                                   and (outcome is None or rec.outcome == outcome)
                                   and (event_type is None or rec.event_type == event_type)):
                    kept.append(rec)
            after = batch[-1].seq
        return list(kept)

    for rec in _run(ctx, collect, read_only=True):
        # A row edited in the database so that it no longer decodes is shown, marked, with what
        # could be read: the review is where it should be seen (`audit verify` names it too).
        if as_json:
            out = {"seq": rec.seq, "time": rec.time.isoformat(), "event_type": rec.event_type,
                   "actor": rec.actor, "outcome": rec.outcome, "subject": rec.subject,
                   "details": rec.details, "request_id": rec.request_id}
            if rec.damaged:
                out["damaged"] = rec.damaged
            click.echo(json.dumps(out, sort_keys=True))
        else:
            click.echo(f"{rec.seq:>8}  {_fmt_time(rec.time)}  {_shown(rec.outcome):<8} "
                       f"{_shown(rec.event_type):<24} {_shown(rec.actor):<20} "
                       f"{_shown(rec.subject or '-')}"
                       + (f"  {json.dumps(rec.details, sort_keys=True)}" if rec.details else "")
                       + (f"  DAMAGED: {rec.damaged}" if rec.damaged else ""))


@audit_group.command("checkpoint")
@click.option("--key", "label", default="audit", show_default=True, help="HSM audit key label.")
@pass_context
def audit_checkpoint(ctx: Context, label: str) -> None:
    """Sign the current head of the audit trail with the HSM audit key, now."""
    from gateway.audit import AuditKey, make_checkpoint
    from gateway.signing.hsm import Hsm, HsmError, KeyNotFound

    try:
        hsm = Hsm.open(ctx.settings)
    except HsmError as exc:
        raise CommandError("hsm_unavailable", f"the HSM is unavailable ({exc}); is the home set up "
                           "(`gateway init`)?") from exc
    try:
        try:
            key = AuditKey.from_signer(hsm.signer(label))
        except KeyNotFound as exc:
            raise CommandError(
                "key_not_found", f"the audit key '{label}' is not in the HSM; `gateway init` generates it") from exc
        checkpoint = _run(ctx, lambda s: make_checkpoint(s, key, actor="cli", force=True))
    finally:
        hsm.close()
    if checkpoint is None:
        click.echo("the audit trail is empty: nothing to checkpoint")
        return
    click.echo(f"checkpoint {checkpoint.id}: record {checkpoint.seq} hash {checkpoint.hash} "
               f"signed by '{checkpoint.key_label}' ({checkpoint.algorithm})")


def register(group: click.Group) -> None:
    group.add_command(clients_group)
    group.add_command(audit_group)
