-- A replicated table's change is logged as it was stored, after the fact. The BEFORE
-- trigger logged the row an `INSERT … ON CONFLICT` proposed, even when the conflict kept
-- the stored row (`DO NOTHING`, or `DO UPDATE … WHERE` false): the log then carried a
-- row this region never had, newer than the one it kept, and the other regions applied
-- it (an outside probe found a region's zones and bootstrap key differing from the
-- other's copy after every start). The BEFORE trigger still stamps the row (clock and
-- origin) and logs deletions; an AFTER trigger, which runs only for rows really
-- inserted or updated, logs those with the stamp they were stored with.
CREATE OR REPLACE FUNCTION replication_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    me text;
    t replicated_tables;
    stamp bigint;
BEGIN
    IF coalesce(current_setting('gateway.replicating', true), '') = 'on' THEN
        RETURN coalesce(NEW, OLD);
    END IF;
    SELECT region INTO me FROM replication_clock;
    IF me IS NULL THEN
        RETURN coalesce(NEW, OLD);
    END IF;
    SELECT * INTO t FROM replicated_tables WHERE tbl = TG_TABLE_NAME;
    IF TG_OP = 'DELETE' THEN
        stamp := replication_tick();
        INSERT INTO replication_log (tbl, key, row, hlc, origin)
            VALUES (t.tbl, replication_project(to_jsonb(OLD), t.key_cols), NULL, stamp, me);
        INSERT INTO replication_tombstones (tbl, key, hlc, origin)
            VALUES (t.tbl, replication_project(to_jsonb(OLD), t.key_cols), stamp, me)
            ON CONFLICT (tbl, key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE'
       AND replication_project(to_jsonb(NEW), t.cols) = replication_project(to_jsonb(OLD), t.cols) THEN
        RETURN NEW;
    END IF;
    NEW.hlc := replication_tick();
    NEW.origin := me;
    RETURN NEW;
END $$;

CREATE FUNCTION replication_log_stored() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t replicated_tables;
    new_row jsonb;
BEGIN
    IF coalesce(current_setting('gateway.replicating', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    IF (SELECT region FROM replication_clock) IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM replicated_tables WHERE tbl = TG_TABLE_NAME;
    new_row := replication_project(to_jsonb(NEW), t.cols);
    IF TG_OP = 'UPDATE' AND new_row = replication_project(to_jsonb(OLD), t.cols) THEN
        RETURN NULL;
    END IF;
    INSERT INTO replication_log (tbl, key, row, hlc, origin)
        VALUES (t.tbl, replication_project(to_jsonb(NEW), t.key_cols), new_row, NEW.hlc, NEW.origin);
    RETURN NULL;
END $$;

CREATE TRIGGER regions_replication_log AFTER INSERT OR UPDATE ON regions
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER zones_replication_log AFTER INSERT OR UPDATE ON zones
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER catalog_replication_log AFTER INSERT OR UPDATE ON catalog
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER resource_types_replication_log AFTER INSERT OR UPDATE ON resource_types
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER tenants_replication_log AFTER INSERT OR UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER principals_replication_log AFTER INSERT OR UPDATE ON principals
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER quotas_replication_log AFTER INSERT OR UPDATE ON quotas
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
CREATE TRIGGER webhooks_replication_log AFTER INSERT OR UPDATE ON webhooks
    FOR EACH ROW EXECUTE FUNCTION replication_log_stored();
