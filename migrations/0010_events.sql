-- Events (issue 10): every committed change of an operation or a resource records an
-- event in the same transaction, by trigger, so that no code path — the API, a report,
-- the reconciler, the relay, an operator's hand-written SQL — can change state without
-- its event, and no event survives a rolled-back change. The relay publishes the rows
-- to the events stream in id order and deletes them (like the outbox).
-- Never edit this file once it has shipped: add a new migration instead.

-- The triggers are deferred to the commit: the row each event carries is still the row
-- as that change left it, and a resource's first event can name the operation inserted
-- after it in the same transaction.
--
-- Per resource, ids follow commit order: every transaction that changes an operation or
-- a resource holds that resource's row lock from before its first event until it commits
-- (the lifecycle's lock order; the relay locks the resources of the operations it marks
-- dispatched). One relay at a time publishes events, in id order, so each resource's
-- events reach the stream in commit order.
CREATE TABLE event_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The CloudEvent id; the Nats-Msg-Id of its message, so a re-publish is dropped.
    event_id     uuid NOT NULL DEFAULT gen_random_uuid(),
    type         text NOT NULL,
    tenant       text NOT NULL,
    kind         text NOT NULL,
    zone         text NOT NULL,
    resource_id  uuid NOT NULL,
    operation_id uuid,
    request_id   text,
    -- The changed row as it is after the change (to_jsonb of the row); the relay turns
    -- it into the API's representation.
    row          jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000);

-- An operation's state transition: `operation.created` when it is inserted,
-- `operation.<state>` when its state changes. Other column changes (attempt counters,
-- stream bookkeeping) are not events.
CREATE FUNCTION record_operation_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state IS NOT DISTINCT FROM OLD.state THEN
        RETURN NULL;
    END IF;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
    VALUES (CASE WHEN TG_OP = 'INSERT' THEN 'operation.created' ELSE 'operation.' || NEW.state END,
            NEW.tenant, NEW.kind, NEW.zone, NEW.resource_id, NEW.id, NEW.request_id, to_jsonb(NEW));
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER operations_events AFTER INSERT OR UPDATE ON operations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_operation_event();

-- A resource's change: created; deleted; its spec or labels changed (`updated`); its
-- status, phase or observed generation changed (`status_changed`). The operation whose
-- transaction made the change (the newest one changed in this transaction, if any) names
-- the event's operation and request.
CREATE FUNCTION record_resource_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_type text;
    cause record;
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
    SELECT o.id, o.request_id INTO cause FROM operations o
        WHERE o.resource_id = NEW.id AND o.updated_at = now()
        ORDER BY o.seq DESC LIMIT 1;
    INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id, request_id, row)
    VALUES (event_type, NEW.tenant, NEW.kind, NEW.zone, NEW.id, cause.id, cause.request_id,
            to_jsonb(NEW));
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER resources_events AFTER INSERT OR UPDATE ON resources
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_resource_event();
