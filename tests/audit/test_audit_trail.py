"""The tamper-evident audit trail (21 CFR 1311.150, 1311.215), on SQLite and PostgreSQL.

Audit rows are protected by database triggers, so every tampering test first removes that
protection the way an attacker with direct database access would (DROP TRIGGER on SQLite,
ALTER TABLE ... DISABLE TRIGGER USER on PostgreSQL), then edits rows with plain SQL.
Checkpoints are signed by a real key in the session's SoftHSM token.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from storage_backends import Backend

from gateway.audit import AuditKey, Checkpointer, make_checkpoint, verify_trail
from gateway.storage import AuditEvent, Storage
from gateway.storage.base import GENESIS_HASH, audit_canonical, checkpoint_payload, utcnow

WORKER = Path(__file__).with_name("audit_append_worker.py")


async def fill(storage: Storage, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await storage.append_audit(AuditEvent(
            "document_signed", f"client-{i % 3}", "success", subject=f"doc-{i}",
            details={"i": i, "key": "k1"}, request_id=f"req-{i}"))


async def trail_with_checkpoint(storage: Storage, key: AuditKey) -> None:
    """Records 1-8, a checkpoint at 8 (its own audit event is 9), then records 10-12."""
    await fill(storage, 8)
    cp = await make_checkpoint(storage, key)
    assert cp is not None and cp.seq == 8
    await fill(storage, 3, start=8)


async def rehash(backend: Backend, storage: Storage, from_seq: int) -> None:
    """What a knowledgeable attacker does after an edit: recompute hashes and links from
    `from_seq` on, and move the head, so the chain itself is consistent again."""
    records = await storage.audit_records()
    prev = GENESIS_HASH if from_seq == 1 else records[from_seq - 2].hash
    for rec in records[from_seq - 1:]:
        digest = hashlib.sha256(audit_canonical(
            rec.seq, rec.time, rec.event_type, rec.actor, rec.outcome, rec.subject, rec.details,
            rec.request_id, prev)).hexdigest()
        await backend.raw(f"UPDATE audit_log SET prev_hash = {backend.p(1)}, hash = {backend.p(2)} "
                          f"WHERE seq = {backend.p(3)}", prev, digest, rec.seq)
        prev = digest
    await backend.drop_protection("audit_head")
    await backend.raw(f"UPDATE audit_head SET hash = {backend.p(1)}", prev)


async def test_intact_trail_verifies(storage: Storage, audit_key: AuditKey,
                                     audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    second = await make_checkpoint(storage, audit_key)
    assert second is not None and second.seq == 12
    result = await verify_trail(storage, audit_public_key)
    assert result.ok, result
    assert (result.records_checked, result.checkpoints_checked) == (13, 2)
    assert result.first_bad_seq is None and result.problem is None
    # the record format: sequence, time, type, identity, outcome (21 CFR 1311.150, 1311.215)
    rec = (await storage.audit_records(after_seq=1, limit=1))[0]
    assert (rec.seq, rec.event_type, rec.actor, rec.outcome, rec.subject) == (
        2, "document_signed", "client-1", "success", "doc-1")
    assert rec.prev_hash == (await storage.audit_records(limit=1))[0].hash


async def test_empty_trail_verifies(storage: Storage, audit_public_key: rsa.RSAPublicKey) -> None:
    result = await verify_trail(storage, audit_public_key)
    assert result.ok and result.records_checked == 0
    assert await make_checkpoint(storage, AuditKey("x", "rsa-sha256", lambda d: b"")) is None


async def test_edited_record_detected(backend: Backend, storage: Storage, audit_key: AuditKey,
                                      audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"UPDATE audit_log SET outcome = 'failure' WHERE seq = {backend.p(1)}", 5)
    result = await verify_trail(storage, audit_public_key)
    assert not result.ok
    assert (result.first_bad_seq, result.problem) == (5, "hash_mismatch")
    assert result.records_checked == 4


async def test_edited_details_detected(backend: Backend, storage: Storage, audit_key: AuditKey,
                                       audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"UPDATE audit_log SET details = {backend.p(1)} WHERE seq = {backend.p(2)}",
                      '{"i":10,"key":"k1"}', 11)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 11, "hash_mismatch")


async def test_deleted_record_detected(backend: Backend, storage: Storage, audit_key: AuditKey,
                                       audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"DELETE FROM audit_log WHERE seq = {backend.p(1)}", 6)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 6, "missing_record")


async def test_deleted_and_renumbered_detected(backend: Backend, storage: Storage,
                                               audit_key: AuditKey,
                                               audit_public_key: rsa.RSAPublicKey) -> None:
    """Delete record 6, shift the later ones down and re-hash everything: the chain is
    consistent again, but the signed checkpoint no longer matches."""
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"DELETE FROM audit_log WHERE seq = {backend.p(1)}", 6)
    for seq in range(7, 13):
        await backend.raw(f"UPDATE audit_log SET seq = {backend.p(1)} WHERE seq = {backend.p(2)}",
                          seq - 1, seq)
    await rehash(backend, storage, 6)
    await backend.raw("UPDATE audit_head SET seq = 11")
    result = await verify_trail(storage, audit_public_key)
    assert not result.ok
    assert (result.first_bad_seq, result.problem) == (8, "checkpoint_mismatch")
    # without checkpoints this rewrite would pass: they are what pins history
    assert (await verify_trail(storage, None)).problem == "checkpoint_mismatch"


async def test_reordered_records_detected(backend: Backend, storage: Storage,
                                          audit_key: AuditKey,
                                          audit_public_key: rsa.RSAPublicKey) -> None:
    """Swap records 4 and 5 and give each a correct hash of its own: the links break."""
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    for a, b in ((4, -1), (5, 4), (-1, 5)):
        await backend.raw(f"UPDATE audit_log SET seq = {backend.p(1)} WHERE seq = {backend.p(2)}",
                          b, a)
    for rec in (await storage.audit_records(after_seq=3, limit=2)):
        digest = hashlib.sha256(audit_canonical(
            rec.seq, rec.time, rec.event_type, rec.actor, rec.outcome, rec.subject, rec.details,
            rec.request_id, rec.prev_hash)).hexdigest()
        await backend.raw(f"UPDATE audit_log SET hash = {backend.p(1)} WHERE seq = {backend.p(2)}",
                          digest, rec.seq)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 4, "chain_broken")


async def test_reordered_without_rehash_detected(backend: Backend, storage: Storage,
                                                 audit_key: AuditKey,
                                                 audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    for a, b in ((2, -1), (3, 2), (-1, 3)):
        await backend.raw(f"UPDATE audit_log SET seq = {backend.p(1)} WHERE seq = {backend.p(2)}",
                          b, a)
    result = await verify_trail(storage, audit_public_key)
    assert not result.ok and result.first_bad_seq == 2


async def test_forged_checkpoint_detected(backend: Backend, storage: Storage,
                                          audit_key: AuditKey,
                                          audit_public_key: rsa.RSAPublicKey) -> None:
    """An attacker rewrites history and signs a checkpoint with a key of their own."""
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"UPDATE audit_log SET actor = 'nobody' WHERE seq = {backend.p(1)}", 10)
    await rehash(backend, storage, 10)
    seq, head = await storage.audit_head()
    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = utcnow()
    forged = own.sign(checkpoint_payload(seq, head, now, "audit", "rsa-sha256"),
                      padding.PKCS1v15(), hashes.SHA256())
    await storage.add_checkpoint(seq, head, now, "audit", "rsa-sha256", forged)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (
        False, seq, "checkpoint_signature_invalid")


async def test_altered_checkpoint_signature_detected(backend: Backend, storage: Storage,
                                                     audit_key: AuditKey,
                                                     audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_checkpoints")
    (sig,) = (await backend.raw("SELECT signature FROM audit_checkpoints"))[0]
    bad = bytes(sig[:-1]) + bytes([sig[-1] ^ 1])
    await backend.raw(f"UPDATE audit_checkpoints SET signature = {backend.p(1)}", bad)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (
        False, 8, "checkpoint_signature_invalid")


async def test_checkpoint_moved_to_other_seq_detected(backend: Backend, storage: Storage,
                                                      audit_key: AuditKey,
                                                      audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_checkpoints")
    await backend.raw("UPDATE audit_checkpoints SET seq = 7")
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (
        False, 7, "checkpoint_signature_invalid")


async def test_cut_tail_detected(backend: Backend, storage: Storage, audit_key: AuditKey,
                                 audit_public_key: rsa.RSAPublicKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    await backend.drop_protection("audit_log")
    await backend.raw(f"DELETE FROM audit_log WHERE seq > {backend.p(1)}", 10)
    result = await verify_trail(storage, audit_public_key)
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 11, "head_mismatch")
    # cutting at or before a checkpoint is caught by the checkpoint even if the head is moved too
    await backend.raw(f"DELETE FROM audit_log WHERE seq > {backend.p(1)}", 5)
    result = await verify_trail(storage, audit_public_key)
    assert (result.first_bad_seq, result.problem) == (6, "missing_record")


async def test_checkpoints_unverified_without_key(storage: Storage, audit_key: AuditKey) -> None:
    await trail_with_checkpoint(storage, audit_key)
    result = await verify_trail(storage, None)
    assert result.ok and result.checkpoints_unverified == 1


async def test_checkpointer_every_n_records(storage: Storage, audit_key: AuditKey,
                                            audit_public_key: rsa.RSAPublicKey) -> None:
    checkpointer = Checkpointer(storage, audit_key, every_records=5, every_seconds=3600)
    await fill(storage, 4)
    assert await checkpointer.tick() is None  # not yet due
    await fill(storage, 1, start=4)
    made = await checkpointer.tick()
    assert made is not None and made.seq == 5
    assert await checkpointer.tick() is None  # its own audit event does not trigger another
    await fill(storage, 5, start=5)
    assert (await checkpointer.tick()).seq == 11
    checkpointer.start()
    await fill(storage, 2, start=10)
    await checkpointer.stop()  # a last checkpoint on the way out
    cps = await storage.checkpoints()
    assert [c.seq for c in cps] == [5, 11, 14]
    result = await verify_trail(storage, audit_public_key)
    assert result.ok and result.checkpoints_checked == 3


async def test_checkpointer_every_t_seconds(storage: Storage, audit_key: AuditKey) -> None:
    checkpointer = Checkpointer(storage, audit_key, every_records=10_000, every_seconds=0.05,
                                poll_seconds=0.01)
    checkpointer.start()
    try:
        await fill(storage, 1)
        for _ in range(200):
            if await storage.checkpoints():
                break
            await asyncio.sleep(0.01)
    finally:
        await checkpointer.stop(final=False)
    assert [c.seq for c in await storage.checkpoints()] == [1]


async def test_two_processes_append_one_chain(backend: Backend,
                                              audit_public_key: rsa.RSAPublicKey,
                                              audit_key: AuditKey) -> None:
    """Two gateway processes start on a fresh database at once (both run the migrations) and
    append at the same time: each migration applied once, one chain, no seq twice, verifies."""
    import os

    env = {**os.environ, **backend.env}
    procs = [subprocess.Popen([sys.executable, str(WORKER), name, "8", "25"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in ("node-a", "node-b")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:  # start both at once
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    versions = [r[0] for r in await backend.raw("SELECT version FROM schema_migrations")]
    assert sorted(versions) == versions and len(set(versions)) == len(versions) >= 1
    async with backend.storage() as storage:
        records = await storage.audit_records(limit=10_000)
        assert [r.seq for r in records] == list(range(1, 401))
        actors = [r.actor for r in records]
        assert actors.count("node-a") == actors.count("node-b") == 200
        switches = sum(1 for a, b in zip(actors, actors[1:], strict=False) if a != b)
        if backend.name == "postgresql":
            # row lock waiters are queued fairly: the appends interleave. (SQLite's busy handler
            # polls, so one process may well finish before the other gets the write lock.)
            assert switches > 1, "the two processes did not overlap"
        await make_checkpoint(storage, audit_key)
        result = await verify_trail(storage, audit_public_key)
    assert result.ok and result.records_checked == 401, result


async def test_checkpoint_with_p256_key(storage: Storage, hsm, ec_key: str) -> None:  # noqa: ANN001
    key = AuditKey.from_signer(hsm.signer(ec_key))
    assert key.algorithm == "ecdsa-sha256"
    await fill(storage, 3)
    cp = await make_checkpoint(storage, key)
    assert cp is not None and cp.algorithm == "ecdsa-sha256"
    assert (await verify_trail(storage, hsm.public_key(ec_key))).ok
    # the RSA audit key does not verify an ECDSA checkpoint
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert (await verify_trail(storage, rsa_public)).problem == "checkpoint_signature_invalid"


async def test_checkpointer_survives_hsm_failure(storage: Storage, audit_key: AuditKey) -> None:
    from gateway.signing.hsm import TokenUnavailable

    calls = {"n": 0}

    def flaky_sign(data: bytes) -> bytes:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise TokenUnavailable("HSM down")
        return audit_key.sign(data)

    key = AuditKey(audit_key.label, audit_key.algorithm, flaky_sign)
    checkpointer = Checkpointer(storage, key, every_records=1, every_seconds=3600,
                                poll_seconds=0.01)
    await fill(storage, 2)
    checkpointer.start()
    try:
        for _ in range(300):
            if await storage.checkpoints():
                break
            await asyncio.sleep(0.01)
    finally:
        await checkpointer.stop(final=False)
    assert calls["n"] >= 3  # failed twice, kept going, then signed
    assert [c.seq for c in await storage.checkpoints()] == [2]


async def test_verify_while_the_gateway_appends(storage: Storage, audit_public_key: rsa.RSAPublicKey) -> None:
    """`gateway audit verify` runs beside a live gateway: records appended while it reads are
    not "cut off", they are read and checked too."""
    await fill(storage, 5)
    stop = asyncio.Event()

    async def append() -> None:
        i = 5
        while not stop.is_set():
            await fill(storage, 1, start=i)
            i += 1

    writer = asyncio.create_task(append())
    try:
        results = [await verify_trail(storage, audit_public_key, page=3) for _ in range(30)]
    finally:
        stop.set()
        await writer
    assert [r.problem for r in results if not r.ok] == []
    assert results[-1].records_checked > 5
    final = await verify_trail(storage, audit_public_key)
    assert final.ok and final.last_seq == (await storage.audit_head())[0]


async def test_two_nodes_checkpointing_one_chain_go_quiet(storage: Storage, audit_key: AuditKey,
                                                          audit_public_key: rsa.RSAPublicKey) -> None:
    """Two gateway nodes share one chain, each with its checkpointer. A checkpoint's own audit
    record is not activity: once the nodes are idle, checkpoints stop (they used to answer each
    other's checkpoint records for ever)."""
    nodes = [Checkpointer(storage, audit_key, every_records=1000, every_seconds=0.02, poll_seconds=0.005)
             for _ in range(2)]
    for node in nodes:
        node.start()
    try:
        await fill(storage, 3)
        await asyncio.sleep(0.3)
        settled = len(await storage.checkpoints())
        await asyncio.sleep(0.3)
        assert len(await storage.checkpoints()) == settled >= 1
    finally:
        for node in nodes:
            await node.stop(final=False)
    result = await verify_trail(storage, audit_public_key)
    assert result.ok and result.checkpoints_checked == settled
