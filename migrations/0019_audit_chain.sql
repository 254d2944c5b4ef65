-- The audit chain moves to a table of its own (issue 12: sealing was an `UPDATE` of
-- every row, each a new row version touching every index of `audit_log` and running a
-- row trigger, 20–30 ms per 400 rows under load). `audit_log` is now strictly
-- append-only again: no `UPDATE` at all. The sealer appends one `audit_chain` row per
-- audit row, in the order of `(xid, id)`.
--
-- Which rows are final: every row carries the ID of the transaction that wrote it
-- (`xid`). Rows whose transaction ID is below the oldest transaction still running
-- (`pg_snapshot_xmin(pg_current_snapshot())`) can no longer change or appear, so the
-- sealer chains exactly those, after the last one it chained: a cursor over the index
-- on `(xid, id)`, each row once, none skipped, however commits interleave.
-- Never edit this file once it has shipped: add a new migration instead.

CREATE TABLE audit_chain (
    -- The row's place in the chain, dense from 1.
    chain_seq  bigint PRIMARY KEY,
    -- The audit row it seals; each at most once.
    audit_id   bigint NOT NULL UNIQUE,
    -- That row's `xid` (the sealer's cursor); NULL for rows sealed before this
    -- migration.
    xid        xid8,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);

-- The chain as the old sealer left it.
INSERT INTO audit_chain (chain_seq, audit_id, prev_hash, hash)
    SELECT chain_seq, id, prev_hash, hash FROM audit_log WHERE chain_seq IS NOT NULL;

ALTER TABLE audit_log ADD COLUMN xid xid8;
-- Rows not yet sealed wait for the new sealer: they carry this transaction's ID. (The
-- one change ever made to a row's columns; the triggers are off only for it.)
ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change;
UPDATE audit_log SET xid = pg_current_xact_id() WHERE chain_seq IS NULL;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change;
ALTER TABLE audit_log ALTER COLUMN xid SET DEFAULT pg_current_xact_id();

DROP INDEX audit_log_unsealed;
ALTER TABLE audit_log DROP COLUMN chain_seq, DROP COLUMN prev_hash, DROP COLUMN hash;
CREATE INDEX audit_log_sealing ON audit_log (xid, id);

-- Append-only, both: no row of either table is ever changed or removed. One refusal
-- for both, naming the table it guards.
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;
DROP TRIGGER audit_log_no_change ON audit_log;
DROP FUNCTION audit_log_seal_only();
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_chain_no_change BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
