-- An operation inserted in a state other than `queued` (one that can run at once is
-- inserted `pending` with its first message: migration 0016) records its two events in
-- one row instead of two (issue 12: an event row is an insert by trigger with the row as
-- `jsonb`, a claim and a delete; creates wrote three rows each, now two). The events
-- published stay exactly what they were: the relay publishes such a row as
-- `operation.created`, carrying the operation as it was created (`queued`, no message
-- yet: the row with those two fields overridden, as migration 0016's trigger wrote it),
-- then `operation.<state>` carrying the row as inserted, with the ID kept in
-- `state_event_id`.
-- Never edit this file once it has shipped: add a new migration instead.
ALTER TABLE event_outbox ADD COLUMN state_event_id uuid;

CREATE OR REPLACE FUNCTION record_operation_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NULL;
    END IF;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id,
                              row, state_event_id)
    VALUES (CASE WHEN TG_OP = 'INSERT' THEN 'operation.created' ELSE 'operation.' || NEW.state END,
            NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id, NEW.request_id,
            to_jsonb(NEW),
            CASE WHEN TG_OP = 'INSERT' AND NEW.state <> 'queued' THEN gen_random_uuid() END);
    RETURN NULL;
END
$$;
