-- Audit log: one row per mutating request and per denied request. Append-only (the
-- triggers refuse UPDATE, DELETE and TRUNCATE) and hash-chained: each row's `hash`
-- covers its content and the previous row's hash, so editing or removing a row is found
-- by `gateway admin verify-audit`.
CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL,
    principal_id   uuid,
    principal_name text,
    tenant         text,
    action         text NOT NULL,
    target         text NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('allowed', 'denied', 'failed')),
    status         smallint NOT NULL,
    request_id     text NOT NULL,
    source         text,
    prev_hash      bytea NOT NULL,
    hash           bytea NOT NULL UNIQUE
);

CREATE INDEX audit_log_tenant ON audit_log (tenant, id DESC);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Keys are listed per tenant.
CREATE INDEX principals_tenant ON principals (tenant) WHERE tenant IS NOT NULL;
