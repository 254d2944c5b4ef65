-- A new operation that can run at once is inserted `pending` with its first message
-- (issue 12: one row write instead of an insert and an update). Its events stay what
-- they were when it was inserted `queued` and then made `pending` in the same
-- transaction: `operation.created`, carrying the operation as it was created (`queued`,
-- no message yet), then `operation.pending`, carrying the row as inserted.
-- Never edit this file once it has shipped: add a new migration instead.
CREATE OR REPLACE FUNCTION record_operation_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
        VALUES ('operation.created', NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id,
                NEW.request_id,
                to_jsonb(NEW) || jsonb_build_object('state', 'queued', 'dispatches', 0));
        IF NEW.state = 'queued' THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
    VALUES ('operation.' || NEW.state, NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id,
            NEW.request_id, to_jsonb(NEW));
    RETURN NULL;
END
$$;
