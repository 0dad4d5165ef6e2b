-- Core schema: archive, linked records, clients, audit trail, checkpoints.
-- Times are TEXT in one form (UTC, microseconds, 'Z'), so they sort and hash the same everywhere.

-- Archive (21 CFR 1305.27, 1311.60, 1311.305): every signed or verified document, byte for byte.
CREATE TABLE documents (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content      BLOB NOT NULL,
    sha256       TEXT NOT NULL CHECK (length(sha256) = 64),
    report       TEXT,
    client       TEXT,
    key_label    TEXT,
    natural_key  TEXT,
    created_at   TEXT NOT NULL,
    retain_until TEXT NOT NULL CHECK (retain_until > created_at),
    UNIQUE (kind, natural_key)
);
CREATE INDEX documents_kind_created ON documents (kind, created_at);
CREATE INDEX documents_client_created ON documents (client, created_at);
CREATE TRIGGER documents_no_update BEFORE UPDATE ON documents
BEGIN SELECT RAISE(ABORT, 'documents is append-only'); END;
CREATE TRIGGER documents_no_delete BEFORE DELETE ON documents
BEGIN SELECT RAISE(ABORT, 'documents is append-only'); END;

-- Records linked to an archived document (21 CFR 1305.22(d)): shipments, receipts, voids.
CREATE TABLE links (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents (id),
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    client      TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX links_document ON links (document_id, id);
CREATE TRIGGER links_no_update BEFORE UPDATE ON links
BEGIN SELECT RAISE(ABORT, 'links is append-only'); END;
CREATE TRIGGER links_no_delete BEFORE DELETE ON links
BEGIN SELECT RAISE(ABORT, 'links is append-only'); END;

-- API clients: only a hash of the token is kept.
CREATE TABLE clients (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL
               CHECK (role IN ('purchaser', 'supplier', 'prescriber_app', 'pharmacy', 'compliance', 'admin')),
    key_labels TEXT NOT NULL,
    token_id   TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL CHECK (length(token_hash) = 32),
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
-- Clients are kept for the audit trail: never deleted; identity never changes; revocation is final.
CREATE TRIGGER clients_no_delete BEFORE DELETE ON clients
BEGIN SELECT RAISE(ABORT, 'clients are never deleted; revoke instead'); END;
CREATE TRIGGER clients_limited_update BEFORE UPDATE ON clients
WHEN NEW.id IS NOT OLD.id OR NEW.name IS NOT OLD.name OR NEW.role IS NOT OLD.role
  OR NEW.token_id IS NOT OLD.token_id OR NEW.token_hash IS NOT OLD.token_hash
  OR NEW.created_at IS NOT OLD.created_at
  OR (OLD.revoked_at IS NOT NULL AND (NEW.revoked_at IS NOT OLD.revoked_at
                                      OR NEW.key_labels IS NOT OLD.key_labels))
BEGIN SELECT RAISE(ABORT, 'clients: only key labels and revocation may change'); END;

-- Audit trail (21 CFR 1311.150, 1311.215): a SHA-256 hash chain, append-only.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    event_type TEXT NOT NULL,
    actor      TEXT NOT NULL,
    outcome    TEXT NOT NULL CHECK (outcome IN ('success', 'failure', 'refused')),
    subject    TEXT,
    details    TEXT NOT NULL,
    request_id TEXT,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

-- The chain head: one row, moves forward only. Writers serialise on it.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE TRIGGER audit_head_forward_only BEFORE UPDATE ON audit_head
WHEN NEW.seq < OLD.seq OR NEW.id IS NOT OLD.id
BEGIN SELECT RAISE(ABORT, 'audit_head only moves forward'); END;
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'audit_head is never deleted'); END;

-- Checkpoints signed by the HSM audit key.
CREATE TABLE audit_checkpoints (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    time      TEXT NOT NULL,
    key_label TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX audit_checkpoints_seq ON audit_checkpoints (seq);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;

-- For readiness checks: a real write that touches no record.
CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at TEXT NOT NULL
);
