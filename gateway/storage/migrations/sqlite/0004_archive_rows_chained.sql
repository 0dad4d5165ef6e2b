-- From this version each unit's audit event pins every column of the documents and linked
-- records it writes (archived_row_sha256, linked_sha256), not only the documents' content. The
-- rows written before are chained once, in `archive.adopted` audit events, when the database is
-- next opened for writing (GroupCommitStorage.adopt_archive): each document with its linked
-- records up to `links_upto`, the last link written before this migration.
CREATE TABLE archive_row_adoption (document_id TEXT PRIMARY KEY, links_upto INTEGER NOT NULL);
INSERT INTO archive_row_adoption (document_id, links_upto)
    SELECT id, (SELECT coalesce(max(id), 0) FROM links) FROM documents;
