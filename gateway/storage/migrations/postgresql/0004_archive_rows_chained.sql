-- From this version each unit's audit event pins every column of the documents and linked
-- records it writes (archived_row_sha256, linked_sha256), not only the documents' content. The
-- rows written before are chained once, in `archive.adopted` audit events, when the database is
-- next opened for writing (GroupCommitStorage.adopt_archive): each document with its linked
-- records up to `links_upto`, the last link written before this migration.
--
-- A link's payload is kept as text, exactly as the gateway encoded it (as 0002 did for reports):
-- jsonb rewrites numbers, so the payload read back would not be the one whose hash was chained.
-- The append-only triggers do not fire on a column type change; payloads already stored keep
-- jsonb's text form, which is what their adoption hashes.
ALTER TABLE links ALTER COLUMN payload TYPE text USING payload::text;
CREATE TABLE archive_row_adoption (document_id text PRIMARY KEY, links_upto bigint NOT NULL);
INSERT INTO archive_row_adoption (document_id, links_upto)
    SELECT id, (SELECT coalesce(max(id), 0) FROM links) FROM documents;
