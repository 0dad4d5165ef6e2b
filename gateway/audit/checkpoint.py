"""Signed checkpoints of the audit chain.

A checkpoint says "at `time` the chain head was (`seq`, `hash`)", signed by the HSM audit key
(label `audit`). Whoever can rewrite the database cannot forge one, so any rewrite of records
before a checkpoint is detected by `verify_trail`. Checkpoints are made every N records or T
seconds (`Checkpointer`, run beside the service) and on demand (`gateway audit checkpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.storage.base import AuditEvent, Checkpoint, Storage, checkpoint_payload, utcnow

AUDIT_KEY_LABEL = "audit"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditKey:
    """What checkpoints are signed with: anything with label, algorithm and a blocking sign(data).

    A `gateway.signing.base.KeySigner` fits as is (`AuditKey.from_signer(hsm.signer("audit"))`).
    """

    label: str
    algorithm: str  # "rsa-sha256" | "ecdsa-sha256"
    sign: Callable[[bytes], bytes]

    @classmethod
    def from_signer(cls, signer: object) -> AuditKey:
        return cls(signer.label, signer.algorithm, signer.sign)  # type: ignore[attr-defined]


async def make_checkpoint(storage: Storage, key: AuditKey, *, actor: str = "system",
                          force: bool = False) -> Checkpoint | None:
    """Sign the current head and store the checkpoint; None when the chain is empty, or when the
    head is already checkpointed and `force` is False. The HSM call runs off the event loop."""
    seq, head_hash = await storage.audit_head()
    if seq == 0:
        return None
    if not force:
        # the last one only: a long-running gateway has hundreds of thousands
        last = await storage.last_checkpoint()
        if last is not None and last.seq >= seq:
            return None
        if last is not None and await _only_checkpoint_records_since(storage, last.seq, seq):
            # Nothing since the last checkpoint but checkpoint records. Signing those would make
            # a record that the next checkpointer (another node) signs in turn, for ever.
            return None
    now = utcnow()
    payload = checkpoint_payload(seq, head_hash, now, key.label, key.algorithm)
    signature = await asyncio.to_thread(key.sign, payload)
    # The checkpoint and its record commit together (the storage adds `checkpoint_id`): a
    # failure between two commits left a checkpoint that no record names, whose deletion
    # nothing would then reveal.
    return await storage.add_checkpoint(
        seq, head_hash, now, key.label, key.algorithm, signature,
        audit=[AuditEvent("audit_checkpoint", actor, "success", subject=str(seq),
                          details={"hash": head_hash, "key_label": key.label})])


async def _only_checkpoint_records_since(storage: Storage, checkpointed: int, head: int) -> bool:
    """Whether the records after seq `checkpointed` up to `head` are all checkpoint records
    (two nodes checkpointing the same head at once leave two)."""
    if not 0 < head - checkpointed <= _QUIET_LOOKBACK:
        return False
    records = await storage.audit_records(after_seq=checkpointed, limit=head - checkpointed)
    return bool(records) and all(r.event_type == "audit_checkpoint" for r in records)


_QUIET_LOOKBACK = 16


class Checkpointer:
    """Makes a checkpoint every `every_records` new records or `every_seconds`, whichever first.

    `start()` runs it as a task on the current loop; `stop()` makes a last checkpoint and ends it.
    A failed signature (HSM down) is logged and retried at the next tick, never fatal.
    """

    def __init__(self, storage: Storage, key: AuditKey, *, every_records: int = 1000,
                 every_seconds: float = 300.0, poll_seconds: float = 1.0) -> None:
        self.storage = storage
        self.key = key
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.poll_seconds = min(poll_seconds, every_seconds)
        self._task: asyncio.Task[None] | None = None
        self._last_seq = 0
        self._last_time: float | None = None  # loop time of the last checkpoint, or of the first look
        self.made = 0

    async def tick(self) -> Checkpoint | None:
        loop = asyncio.get_running_loop()
        if self._last_time is None:
            # The clock starts when we start watching (the loop's clock counts from boot).
            self._last_time = loop.time()
        seq, _ = await self.storage.audit_head()
        due_records = seq - self._last_seq >= self.every_records
        due_time = seq > self._last_seq and loop.time() - self._last_time >= self.every_seconds
        if not (due_records or due_time):
            return None
        checkpoint = await make_checkpoint(self.storage, self.key)
        self._last_time = loop.time()
        if checkpoint is not None:
            self.made += 1
            # the checkpoint's own audit event follows it; do not count it as new activity
            self._last_seq = checkpoint.seq + 1
        return checkpoint

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep checkpointing alive; logged
                log.exception("audit checkpoint failed; retrying at the next tick")

    def start(self) -> None:
        if self._task is None:
            self._last_time = asyncio.get_running_loop().time()
            self._task = asyncio.create_task(self._run(), name="audit-checkpointer")

    async def stop(self, final: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if final:
            try:
                await make_checkpoint(self.storage, self.key)
            except Exception:  # noqa: BLE001
                log.exception("final audit checkpoint failed")
