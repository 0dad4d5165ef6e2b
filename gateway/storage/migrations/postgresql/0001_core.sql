-- Core schema: archive, linked records, clients, audit trail, checkpoints.

-- Raised by the triggers of every append-only table.
CREATE FUNCTION gateway_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END;
$$;

-- Archive (21 CFR 1305.27, 1311.60, 1311.305): every signed or verified document, byte for byte.
CREATE TABLE documents (
    id           text PRIMARY KEY,
    kind         text NOT NULL,
    content_type text NOT NULL,
    content      bytea NOT NULL,
    sha256       text NOT NULL CHECK (length(sha256) = 64),
    report       jsonb,
    client       text,
    key_label    text,
    natural_key  text,
    created_at   timestamptz NOT NULL,
    retain_until timestamptz NOT NULL CHECK (retain_until > created_at),
    rowno        bigint GENERATED ALWAYS AS IDENTITY,  -- write order, for listings
    UNIQUE (kind, natural_key)
);
CREATE INDEX documents_kind_created ON documents (kind, created_at);
CREATE INDEX documents_client_created ON documents (client, created_at);
CREATE TRIGGER documents_append_only BEFORE UPDATE OR DELETE ON documents
    FOR EACH ROW EXECUTE FUNCTION gateway_refuse_change();
CREATE TRIGGER documents_no_truncate BEFORE TRUNCATE ON documents
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- Records linked to an archived document (21 CFR 1305.22(d)): shipments, receipts, voids.
CREATE TABLE links (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id text NOT NULL REFERENCES documents (id),
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    client      text,
    created_at  timestamptz NOT NULL
);
CREATE INDEX links_document ON links (document_id, id);
CREATE TRIGGER links_append_only BEFORE UPDATE OR DELETE ON links
    FOR EACH ROW EXECUTE FUNCTION gateway_refuse_change();
CREATE TRIGGER links_no_truncate BEFORE TRUNCATE ON links
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- API clients: only a hash of the token is kept.
CREATE TABLE clients (
    id         text PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    role       text NOT NULL
               CHECK (role IN ('purchaser', 'supplier', 'prescriber_app', 'pharmacy', 'compliance', 'admin')),
    key_labels jsonb NOT NULL,
    token_id   text NOT NULL UNIQUE,
    token_hash bytea NOT NULL CHECK (length(token_hash) = 32),
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
-- Clients are kept for the audit trail: never deleted; identity never changes; revocation is final.
CREATE FUNCTION gateway_clients_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'clients are never deleted; revoke instead' USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.name IS DISTINCT FROM OLD.name
       OR NEW.role IS DISTINCT FROM OLD.role OR NEW.token_id IS DISTINCT FROM OLD.token_id
       OR NEW.token_hash IS DISTINCT FROM OLD.token_hash OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR (OLD.revoked_at IS NOT NULL AND (NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
                                           OR NEW.key_labels IS DISTINCT FROM OLD.key_labels)) THEN
        RAISE EXCEPTION 'clients: only key labels and revocation may change' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER clients_guard BEFORE UPDATE OR DELETE ON clients
    FOR EACH ROW EXECUTE FUNCTION gateway_clients_guard();
CREATE TRIGGER clients_no_truncate BEFORE TRUNCATE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- Audit trail (21 CFR 1311.150, 1311.215): a SHA-256 hash chain, append-only. `details` is kept as
-- text, exactly as hashed.
CREATE TABLE audit_log (
    seq        bigint PRIMARY KEY,
    time       timestamptz NOT NULL,
    event_type text NOT NULL,
    actor      text NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('success', 'failure', 'refused')),
    subject    text,
    details    text NOT NULL,
    request_id text,
    prev_hash  text NOT NULL,
    hash       text NOT NULL
);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION gateway_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- The chain head: one row, moves forward only. Writers on every node lock it (FOR UPDATE) in
-- the transaction that appends, so all nodes extend ONE chain.
CREATE TABLE audit_head (
    id   integer PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE FUNCTION gateway_audit_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.seq < OLD.seq OR NEW.id IS DISTINCT FROM OLD.id THEN
        RAISE EXCEPTION 'audit_head only moves forward' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER audit_head_guard BEFORE UPDATE OR DELETE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION gateway_audit_head_guard();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- Checkpoints signed by the HSM audit key.
CREATE TABLE audit_checkpoints (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq       bigint NOT NULL,
    hash      text NOT NULL,
    time      timestamptz NOT NULL,
    key_label text NOT NULL,
    algorithm text NOT NULL,
    signature bytea NOT NULL
);
CREATE INDEX audit_checkpoints_seq ON audit_checkpoints (seq);
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION gateway_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_refuse_change();

-- For readiness checks: a real write that touches no record.
CREATE TABLE health (
    id         integer PRIMARY KEY CHECK (id = 1),
    checked_at timestamptz NOT NULL
);
