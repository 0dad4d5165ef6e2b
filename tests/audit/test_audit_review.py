"""What the database alone cannot show, and how an anchor kept outside it shows it; what the daily
review prints. On SQLite and PostgreSQL, tampering through plain SQL after removing the triggers,
as an attacker with database access would; checkpoints signed by the session's SoftHSM key.

A cut tail (records after the last signed checkpoint deleted and the head moved back), a rollback
to a backup, or a trail rebuilt with its checkpoints removed is consistent in itself: `audit
verify` says how many records no verified checkpoint covers, and prints the head to keep; given
back as `--anchor SEQ:HASH`, a later run catches any of these that reaches before it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric import rsa
from storage_backends import Backend
from test_audit_trail import fill, rehash, trail_with_checkpoint

from gateway.audit import AuditKey, make_checkpoint, verify_trail
from gateway.config import Settings
from gateway.storage import AuditEvent, Storage
from gateway.storage.base import format_time, utcnow


async def cut_back_to(backend: Backend, storage: Storage, seq: int) -> None:
    """A rollback as the database sees it: records after `seq` and the checkpoints past it gone,
    the head moved back (a backup restored, or a cut tail)."""
    for table in ("audit_log", "audit_checkpoints", "audit_head"):
        await backend.drop_protection(table)
    kept = (await storage.audit_records(after_seq=seq - 1, limit=1))[0]
    await backend.raw(f"DELETE FROM audit_log WHERE seq > {backend.p(1)}", seq)
    await backend.raw(f"DELETE FROM audit_checkpoints WHERE seq >= {backend.p(1)}", seq)
    await backend.raw(f"UPDATE audit_head SET seq = {backend.p(1)}, hash = {backend.p(2)}",
                      seq, kept.hash)


async def test_rolled_back_tail_is_caught_only_by_an_anchor(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)  # records 1-12, checkpoint at 8 (record 9)
    before = await verify_trail(storage, audit_public_key)
    assert before.ok and (before.last_seq, before.anchored_seq) == (12, 8)
    assert before.unanchored_records == 4
    assert before.head_hash == (await storage.audit_head())[1]
    anchor = {before.last_seq: before.head_hash}

    # records 11 and 12 (after the last checkpoint) cut off: consistent, and said to be exposed
    await cut_back_to(backend, storage, 10)
    alone = await verify_trail(storage, audit_public_key)
    assert alone.ok and (alone.last_seq, alone.unanchored_records) == (10, 2)
    caught = await verify_trail(storage, audit_public_key, anchors=anchor)
    assert (caught.ok, caught.first_bad_seq, caught.problem) == (False, 12, "anchor_mismatch")

    # back past the checkpoint too (its row and its record gone): the same
    await cut_back_to(backend, storage, 5)
    alone = await verify_trail(storage, audit_public_key)
    assert alone.ok and (alone.checkpoints_checked, alone.anchored_seq) == (0, 0)
    caught = await verify_trail(storage, audit_public_key, anchors={8: "0" * 64, **anchor})
    assert (caught.ok, caught.first_bad_seq, caught.problem) == (False, 8, "anchor_mismatch")
    # an anchor the trail still holds, with its hash, passes
    intact = await verify_trail(storage, audit_public_key, anchors={5: alone.head_hash})
    assert intact.ok and intact.anchors_checked == 1


async def test_rebuilt_trail_without_checkpoints_is_caught_by_an_anchor(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        audit_public_key: rsa.RSAPublicKey) -> None:
    """Every checkpoint and checkpoint record removed, a record edited, the chain re-hashed and
    the head moved: nothing in the database disagrees any more."""
    await trail_with_checkpoint(storage, audit_key)
    second = await make_checkpoint(storage, audit_key)
    assert second is not None
    before = await verify_trail(storage, audit_public_key)
    assert before.ok and before.anchored_seq == 12 and before.unanchored_records == 1
    # what the daily review kept: a record a checkpoint covers
    seq8 = (await storage.audit_records(after_seq=7, limit=1))[0]

    for table in ("audit_log", "audit_checkpoints", "audit_head"):
        await backend.drop_protection(table)
    await backend.raw("DELETE FROM audit_checkpoints")
    await backend.raw("DELETE FROM audit_log WHERE seq > 8")
    await backend.raw("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
    await rehash(backend, storage, 1)
    await backend.raw(f"UPDATE audit_head SET seq = {backend.p(1)}", 8)

    alone = await verify_trail(storage, audit_public_key)
    assert alone.ok and alone.checkpoints_checked == 0
    assert (alone.anchored_seq, alone.unanchored_records) == (0, 8)
    caught = await verify_trail(storage, audit_public_key, anchors={8: seq8.hash})
    assert (caught.ok, caught.first_bad_seq, caught.problem) == (False, 8, "anchor_mismatch")


def _gateway(home: object, backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command. Its output is a pipe here, where click drops ANSI sequences it would
    send to a terminal: the tests check what the reviewer's terminal gets by the code points
    shown instead, and by the lines (a raw CR or LF reads as a line break here)."""
    env = {**os.environ, "GATEWAY_DATABASE_URL": backend.cli_url}
    return subprocess.run([sys.executable, "-m", "gateway", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=180, env=env)


async def test_verify_prints_the_head_and_checks_anchors(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        softhsm_settings: Settings) -> None:
    await trail_with_checkpoint(storage, audit_key)
    key = ("--key", audit_key.label)
    first = _gateway(softhsm_settings.home, backend, "audit", "verify", *key)
    assert first.returncode == 0, first.stdout + first.stderr
    head = next(line for line in first.stdout.splitlines() if line.startswith("head: "))
    anchor = head.removeprefix("head: ")
    assert anchor == f"12:{(await storage.audit_head())[1]}"
    assert "4 records after record 8 are not covered by a signed checkpoint" in first.stderr

    again = _gateway(softhsm_settings.home, backend, "audit", "verify", *key, "--anchor", anchor)
    assert again.returncode == 0, again.stdout + again.stderr

    await cut_back_to(backend, storage, 10)
    rolled = _gateway(softhsm_settings.home, backend, "audit", "verify", *key, "--anchor", anchor)
    assert rolled.returncode == 1
    assert "BROKEN at record 12: anchor_mismatch" in rolled.stdout
    as_json = _gateway(softhsm_settings.home, backend, "audit", "verify", *key, "--json")
    assert '"unanchored_records": 2' in as_json.stdout and as_json.returncode == 0

    bad = _gateway(softhsm_settings.home, backend, "audit", "verify", *key, "--anchor", "12:xyz")
    assert bad.returncode == 2 and "is not SEQ:HASH" in bad.stderr


async def test_review_listing_shows_control_characters_as_code_points(
        backend: Backend, storage: Storage, softhsm_settings: Settings) -> None:
    """A value with an escape sequence, a line break or a bidi override is hashed and stored as
    given; printed raw it would clear the reviewer's screen, recolour or forge a row, or read
    as another name (21 CFR 1311.215: the trail is analysed daily)."""
    await fill(storage, 2)
    await storage.append_audit(AuditEvent(
        "sign.refused\x1b[2K", "evil\x1b[2J\x1b[H", "refused",
        subject="x\n       4  2026-01-01 00:00:00Z  success  nothing_to_see",
        details={"why": "\x1b]0;title\x07"}, request_id="r"))
    await storage.append_audit(AuditEvent("client_added", "rtl\u202enimda", "success",
                                          subject="zero\u200bwidth"))
    listed = _gateway(softhsm_settings.home, backend, "audit", "list")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert not any(c in out for c in "\x1b\x07\u202e\u200b"), repr(out)
    lines = out.splitlines()
    assert len(lines) == 4  # one line per record: the line break forged no row
    assert "evil[U+001B][2J[U+001B][H" in lines[2] and "x[U+000A]" in lines[2]
    assert "rtl[U+202E]nimda" in lines[3] and "zero[U+200B]width" in lines[3]
    # the JSON form is escaped by JSON itself, and keeps the values exactly
    as_json = _gateway(softhsm_settings.home, backend, "audit", "list", "--json",
                       "--outcome", "refused")
    assert "\x1b" not in as_json.stdout and '"evil\\u001b[2J\\u001b[H"' in as_json.stdout


async def test_event_naming_a_lone_surrogate_is_still_recorded(
        storage: Storage, audit_public_key: rsa.RSAPublicKey) -> None:
    """`gateway sign FILE` with an undecodable byte in the file name signed the document and then
    lost its `document.signed` event (`audit_write_failed`): UTF-8 cannot encode the surrogate
    the byte decodes to. The event is kept, with U+FFFD for what could not be written."""
    signed = await storage.append_audit(AuditEvent(
        "document.signed", "cli\udcff", "success", subject="key\ud800",
        details={"file": "/tmp/x\udcff.xml", "k\udcfe": ["ok", {"deep": "\udfff"}], "n": 1},
        request_id="r\udc80"))
    assert len(signed) == 1
    stored = (await storage.audit_records())[0]
    assert (stored.actor, stored.subject, stored.request_id) == ("cli\ufffd", "key\ufffd", "r\ufffd")
    assert stored.details == {"file": "/tmp/x\ufffd.xml", "k\ufffd": ["ok", {"deep": "\ufffd"}],
                              "n": 1}
    result = await verify_trail(storage, audit_public_key)
    assert result.ok and result.records_checked == 1
    # an event without one is stored as given, its details the very object passed
    plain = {"a": ["b", {"c": 1.5}]}
    assert AuditEvent("x", "y", "success", details=plain).details is plain


async def test_broken_verdict_cannot_be_overwritten_by_what_it_names(
        backend: Backend, storage: Storage, audit_key: AuditKey,
        softhsm_settings: Settings) -> None:
    """A document slipped into the archive with an id that moves the cursor up and rewrites the
    line: printed raw, the terminal showed "audit trail intact" over the BROKEN verdict."""
    await fill(storage, 2)
    now = utcnow()
    created = now if backend.name == "postgresql" else format_time(now)
    retain = (now.replace(year=now.year + 3) if backend.name == "postgresql"
              else format_time(now.replace(year=now.year + 3)))
    p = backend.p
    evil_id = "x\r\x1b[2K\x1b[1Aaudit trail intact: 2 records"
    await backend.raw(
        "INSERT INTO documents (id, kind, content, content_type, sha256, client, created_at, "
        f"retain_until) VALUES ({p(1)}, 'signed_xml', {p(2)}, 'application/xml', {p(3)}, 'c1', "
        f"{p(4)}, {p(5)})", evil_id, b"<x/>", "0" * 64, created, retain)
    verdict = _gateway(softhsm_settings.home, backend, "audit", "verify", "--key", audit_key.label)
    assert verdict.returncode == 1
    assert "\x1b" not in verdict.stdout and "\r" not in verdict.stdout, repr(verdict.stdout)
    assert "BROKEN: document_unchained: document x[U+000D][U+001B][2K" in verdict.stdout
