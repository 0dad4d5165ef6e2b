"""Checking the audit trail end to end (21 CFR 1311.150, 1311.215: records protected from
modification and deletion; the trail is analysed daily).

`verify_trail` walks the chain from seq 1 and stops at the first problem:

* a record whose stored hash is not SHA-256 over its canonical encoding: it was edited
  (`hash_mismatch`);
* a gap in seq: a record was deleted (`missing_record`);
* a record whose prev_hash is not the hash of the record before: records were reordered or a
  record was replaced together with its hash (`chain_broken`);
* a checkpoint whose hash differs from the record at its seq, or that names a seq past the end of
  the trail (`checkpoint_mismatch`, `missing_record`);
* a checkpoint whose signature does not verify with the audit public key
  (`checkpoint_signature_invalid`);
* the head row disagreeing with the last record: the tail was cut off (`head_mismatch`).

A rewrite of the whole chain after an edit (every hash recomputed) is caught by any signed
checkpoint after the edit: the attacker cannot sign without the HSM audit key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gateway.storage.base import GENESIS_HASH, Checkpoint, Storage

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# How many times verify_trail reads on when the head moved past what it read (live appends).
_CATCH_UP_ROUNDS = 1000

PROBLEMS = {
    "hash_mismatch": "the record's content does not match its hash (edited)",
    "missing_record": "a record is missing (deleted)",
    "chain_broken": "the record does not follow the one before it (reordered or replaced)",
    "checkpoint_mismatch": "a signed checkpoint does not match the record at its seq",
    "checkpoint_signature_invalid": "a checkpoint's signature does not verify with the audit key",
    "head_mismatch": "the chain head does not match the last record (records cut off)",
}


@dataclass(frozen=True)
class AuditVerifyResult:
    """The outcome of `verify_trail`; when not ok, `first_bad_seq` names the first bad record."""

    ok: bool
    records_checked: int
    checkpoints_checked: int
    first_bad_seq: int | None = None
    problem: str | None = None  # a key of PROBLEMS
    message: str = ""
    last_seq: int = 0  # seq of the last record checked
    checkpoints_unverified: int = 0  # checkpoints whose signature was not checked (no key given)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok, "records_checked": self.records_checked,
            "checkpoints_checked": self.checkpoints_checked, "first_bad_seq": self.first_bad_seq,
            "problem": self.problem, "message": self.message, "last_seq": self.last_seq,
            "checkpoints_unverified": self.checkpoints_unverified,
        }


def _public_key(key: PublicKey | x509.Certificate | None) -> PublicKey | None:
    if isinstance(key, x509.Certificate):
        return key.public_key()  # type: ignore[return-value]
    return key


def checkpoint_signature_ok(checkpoint: Checkpoint, public_key: PublicKey) -> bool:
    data = checkpoint.payload()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if checkpoint.algorithm != "rsa-sha256":
                return False
            public_key.verify(checkpoint.signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if checkpoint.algorithm != "ecdsa-sha256":
                return False
            public_key.verify(checkpoint.signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _fail(problem: str, seq: int, records: int, checkpoints: int, last_seq: int,
          detail: str = "") -> AuditVerifyResult:
    message = f"audit record {seq}: {PROBLEMS[problem]}" + (f" ({detail})" if detail else "")
    return AuditVerifyResult(False, records, checkpoints, seq, problem, message, last_seq)


async def verify_trail(storage: Storage, public_key: PublicKey | x509.Certificate | None,
                       *, page: int = 5000) -> AuditVerifyResult:
    """Check every record and checkpoint; report the first problem by seq.

    `public_key`: the audit key (or its certificate) checkpoints are verified with. None checks
    the chain only and counts the checkpoints as unverified.
    """
    key = _public_key(public_key)
    checkpoints = await storage.checkpoints()
    by_seq: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
        by_seq.setdefault(cp.seq, []).append(cp)

    # Signatures first: a forged checkpoint is a problem wherever it points.
    unverified = 0
    signature_bad: list[Checkpoint] = []
    for cp in checkpoints:
        if key is None:
            unverified += 1
        elif not checkpoint_signature_ok(cp, key):
            signature_bad.append(cp)

    expected_seq = 1
    prev_hash = GENESIS_HASH
    records = 0
    checked_cps = 0
    after = 0
    first_bad: AuditVerifyResult | None = None
    head_seq, head_hash = 0, GENESIS_HASH
    for _ in range(_CATCH_UP_ROUNDS):
        read_from = expected_seq
        while first_bad is None:
            batch = await storage.audit_records(after_seq=after, limit=page)
            if not batch:
                break
            for rec in batch:
                if rec.seq != expected_seq:
                    # a gap: the first missing seq is the bad one
                    first_bad = _fail("missing_record", expected_seq, records, checked_cps,
                                      expected_seq - 1, f"next record present is {rec.seq}")
                    break
                if rec.expected_hash() != rec.hash:
                    first_bad = _fail("hash_mismatch", rec.seq, records, checked_cps, rec.seq)
                    break
                if rec.prev_hash != prev_hash:
                    first_bad = _fail("chain_broken", rec.seq, records, checked_cps, rec.seq)
                    break
                records += 1
                for cp in by_seq.get(rec.seq, ()):
                    if cp.hash != rec.hash:
                        first_bad = _fail("checkpoint_mismatch", rec.seq, records, checked_cps,
                                          rec.seq, f"checkpoint {cp.id}")
                        break
                    checked_cps += 1
                if first_bad is not None:
                    break
                prev_hash = rec.hash
                expected_seq = rec.seq + 1
            after = batch[-1].seq
        # The head is read after the records: on a live gateway, records appended meanwhile
        # move it past what was read. They are not "cut off": read on and check them too. A head
        # past records that are not there (this round found none) is a cut tail.
        head_seq, head_hash = await storage.audit_head()
        if first_bad is not None or head_seq <= expected_seq - 1 or expected_seq == read_from:
            break

    last_seq = expected_seq - 1
    bad_sig = min(signature_bad, key=lambda c: c.seq, default=None)
    if bad_sig is not None and (first_bad is None or bad_sig.seq <= (first_bad.first_bad_seq or 0)):
        return _fail("checkpoint_signature_invalid", bad_sig.seq, records, checked_cps, last_seq,
                     f"checkpoint {bad_sig.id}")
    if first_bad is not None:
        return first_bad

    beyond = [cp for cp in checkpoints if cp.seq > last_seq]
    if beyond:
        return _fail("missing_record", last_seq + 1, records, checked_cps, last_seq,
                     f"checkpoint {beyond[0].id} covers seq {beyond[0].seq}")
    if head_seq != last_seq or (head_seq and head_hash != prev_hash):
        return _fail("head_mismatch", min(head_seq, last_seq) + 1 if head_seq != last_seq
                     else head_seq, records, checked_cps, last_seq,
                     f"head says seq {head_seq}")
    return AuditVerifyResult(True, records, checked_cps, None, None,
                             f"{records} audit records intact, "
                             f"{len(checkpoints) - unverified} checkpoints verified",
                             last_seq, unverified)
