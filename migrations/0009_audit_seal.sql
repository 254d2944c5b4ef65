-- An audit trail nothing can lose (issue 11 §3). A request that changes state writes its
-- audit row in the transaction of the change; every other row is written just after
-- the answer. Rows are inserted unsealed (no hash) and a sealer chains them afterwards,
-- in the order it finds them committed: `chain_seq` is the row's place in the chain,
-- `prev_hash`/`hash` the chain itself. Writers never take the chain's lock; only the
-- sealer does, once per batch. Never edit this file once it has shipped.

ALTER TABLE audit_log
    ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL,
    ADD COLUMN chain_seq bigint UNIQUE;

-- Rows written before this migration were chained in id order as they were appended.
DROP TRIGGER audit_log_no_change ON audit_log;
UPDATE audit_log SET chain_seq = id;

-- The sealer's queue: rows not yet chained, oldest first. It stays small.
CREATE INDEX audit_log_unsealed ON audit_log (id) WHERE hash IS NULL;

-- Still append-only: the one change allowed is sealing an unsealed row, once, without
-- touching its content.
CREATE FUNCTION audit_log_seal_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.hash IS NULL AND OLD.chain_seq IS NULL
       AND NEW.hash IS NOT NULL AND NEW.prev_hash IS NOT NULL AND NEW.chain_seq IS NOT NULL
       AND (NEW.id, NEW.at, NEW.principal_id, NEW.principal_name, NEW.tenant, NEW.action,
            NEW.target, NEW.outcome, NEW.status, NEW.request_id, NEW.source)
           IS NOT DISTINCT FROM
           (OLD.id, OLD.at, OLD.principal_id, OLD.principal_name, OLD.tenant, OLD.action,
            OLD.target, OLD.outcome, OLD.status, OLD.request_id, OLD.source)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_seal_only();

-- Audit rows are looked up by request ID (tests, and operators following a request).
CREATE INDEX audit_log_request_id ON audit_log (request_id);
