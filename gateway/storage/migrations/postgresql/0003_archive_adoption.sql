-- Documents archived before each unit's audit event carried their SHA-256 (migration 0002 and
-- earlier). Opening the database for writing chains them once, in `archive.adopted` audit events
-- (GroupCommitStorage.adopt_archive), and empties this table as it goes.
CREATE TABLE archive_adoption (document_id TEXT PRIMARY KEY);
INSERT INTO archive_adoption (document_id) SELECT id FROM documents;
