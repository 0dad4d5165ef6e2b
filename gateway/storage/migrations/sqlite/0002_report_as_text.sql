-- PostgreSQL's 0002 turns documents.report from jsonb into text. SQLite has kept it as TEXT since
-- 0001: nothing to change, the number is kept so that both engines count the same migrations.
SELECT 1;
