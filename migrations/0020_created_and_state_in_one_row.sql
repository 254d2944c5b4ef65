-- An operation inserted in a state other than `queued` (one that can run at once is
-- inserted `pending` with its first message: migration 0016) records its two events in
-- one row instead of two (issue 12: an event row is an insert by trigger with the row as
-- `jsonb`, a claim and a delete; creates wrote three rows each, now two). The events
-- published stay exactly what they were: the relay publishes such a row as
-- `operation.created`, carrying the operation as it was created (`queued`, no message
-- yet: the row with those two fields overridden, as migration 0016's trigger wrote it),
-- then `operation.<state>` carrying the row as inserted, with the ID kept in
-- `state_event_id`.
--
-- Such a row keeps the operation in `state_row`, and `row` is NULL: a relay of an older
-- version, which reads `row` as never NULL, fails its whole events pass on it (and
-- retries) instead of publishing the row as one `operation.created` without the
-- `operation.<state>` that follows. So during a rolling upgrade the events wait for a
-- relay of this version; none is published wrong, none is lost.
-- Never edit this file once it has shipped: add a new migration instead.
ALTER TABLE event_outbox
    ADD COLUMN state_event_id uuid,
    ADD COLUMN state_row jsonb,
    ALTER COLUMN row DROP NOT NULL,
    ADD CONSTRAINT event_outbox_one_row CHECK (
        (row IS NULL) = (state_row IS NOT NULL)
        AND (state_row IS NULL) = (state_event_id IS NULL)
    );

CREATE OR REPLACE FUNCTION record_operation_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.state <> 'queued' THEN
        INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id,
                                  request_id, state_row, state_event_id)
        VALUES ('operation.created', NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id,
                NEW.request_id, to_jsonb(NEW), gen_random_uuid());
        RETURN NULL;
    END IF;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
    VALUES (CASE WHEN TG_OP = 'INSERT' THEN 'operation.created' ELSE 'operation.' || NEW.state END,
            NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id, NEW.request_id,
            to_jsonb(NEW));
    RETURN NULL;
END
$$;
