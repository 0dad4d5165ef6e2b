-- A verification report is kept as text, exactly as the gateway encoded it (like audit_log.details):
-- jsonb rewrites numbers (1e20 became 100000000000000000000, -0.0 became 0), so a report read back
-- was not the one archived. The append-only triggers do not fire on a column type change; the
-- reports already stored keep jsonb's text form.
ALTER TABLE documents ALTER COLUMN report TYPE text USING report::text;
