-- Which operation a resource event names. The rule was "the newest operation changed in
-- this transaction", which is wrong when one transaction ends an operation and starts
-- the next queued one on the same resource: the end's `resource.status_changed`
-- (phase `ready`, `failed` or `deleted`) named the operation started after it, so
-- `GET …/events?operation=` of the ended one missed the change it made. Now a change that
-- leaves the resource at rest names the oldest operation that ended in the transaction
-- (the one that was running: the others ended are queued ones cancelled with it), and a
-- change into an active phase names the newest operation still active; each falls back
-- to the old rule when there is no such operation.
CREATE OR REPLACE FUNCTION record_resource_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_type text;
    cause record;
    at_rest boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        event_type := 'resource.created';
    ELSIF NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL THEN
        event_type := 'resource.deleted';
    ELSIF NEW.spec IS DISTINCT FROM OLD.spec OR NEW.labels IS DISTINCT FROM OLD.labels
          OR NEW.generation IS DISTINCT FROM OLD.generation THEN
        event_type := 'resource.updated';
    ELSIF NEW.status IS DISTINCT FROM OLD.status OR NEW.phase IS DISTINCT FROM OLD.phase
          OR NEW.observed_generation IS DISTINCT FROM OLD.observed_generation THEN
        event_type := 'resource.status_changed';
    ELSE
        RETURN NULL;
    END IF;
    at_rest := NEW.phase IN ('ready', 'failed', 'deleted');
    SELECT o.id, o.request_id INTO cause FROM operations o
        WHERE o.resource_id = NEW.id AND o.updated_at = now()
        ORDER BY (o.state IN ('succeeded', 'failed', 'cancelled')) = at_rest DESC,
                 CASE WHEN at_rest THEN o.seq END ASC,
                 o.seq DESC
        LIMIT 1;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
    VALUES (event_type, NEW.tenant, NEW.kind, NEW.zone, NEW.id, cause.id, cause.request_id,
            to_jsonb(NEW));
    RETURN NULL;
END
$$;
