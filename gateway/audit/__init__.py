"""The tamper-evident audit trail (21 CFR 1311.150, 1311.215).

Records are appended through `Storage.commit_unit(audit=[AuditEvent(...)])` (atomically with the
change they describe) or `Storage.append_audit(...)`. Each record is chained by SHA-256 to the one
before; checkpoints signed by the HSM audit key pin the chain; `verify_trail` checks it all.
"""

from gateway.audit.checkpoint import AUDIT_KEY_LABEL, AuditKey, Checkpointer, make_checkpoint
from gateway.audit.verify import PROBLEMS, AuditVerifyResult, checkpoint_signature_ok, verify_trail
from gateway.storage.base import AuditEvent, AuditRecord, Checkpoint

__all__ = [
    "AUDIT_KEY_LABEL", "PROBLEMS", "AuditEvent", "AuditKey", "AuditRecord", "AuditVerifyResult",
    "Checkpoint", "Checkpointer", "checkpoint_signature_ok", "make_checkpoint", "verify_trail",
]
