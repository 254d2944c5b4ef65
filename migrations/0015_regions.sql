-- Regions (issue 13): every region is a whole installation with its own database; the
-- data that must be the same everywhere (zones and regions, the catalog, tenants, API
-- keys, quotas, webhooks, resource types) is replicated between them through NATS
-- JetStream (`replication`). Resources, operations and events stay in their zone's region.
--
-- How a change travels: a trigger on each replicated table stamps the row with a hybrid
-- logical clock (`hlc`) and the region that made the change (`origin`) and appends it to
-- `replication_log` in the writer's own transaction (so nothing committed is missed);
-- the relay publishes the log to the region's stream; the other regions source that
-- stream and apply each change with `replication_apply`, last writer wins by
-- (hlc, origin). Sticky columns (a key's `revoked_at`) merge to the earliest value
-- instead, so a revocation is never undone by a concurrent older change. Deletions leave
-- tombstones until every peer region has acknowledged them.
--
-- Nothing happens until a region is configured (`replication_clock.region`, set by
-- `migrate` from GATEWAY_REGION): a single-region installation records nothing.
-- Never edit this file once it has shipped: add a new migration instead.

-- The regions and their gateways' public URLs (each region writes its own row).
CREATE TABLE regions (
    name       text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9-]{0,31}$'),
    url        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The region that owns a zone; NULL: the zone of a single-region installation.
ALTER TABLE zones ADD COLUMN region text;

-- This installation's region and its hybrid logical clock: physical milliseconds << 16
-- plus a 16-bit counter, so it orders like time and never goes backwards.
-- `applied_seq`: how far the stream of the peers' changes has been applied.
CREATE TABLE replication_clock (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    region      text CHECK (region ~ '^[a-z][a-z0-9-]{0,31}$'),
    hlc         bigint NOT NULL DEFAULT 0,
    applied_seq bigint NOT NULL DEFAULT 0
);
INSERT INTO replication_clock DEFAULT VALUES;

-- The next clock value: later than every value this region has made or seen (`seen`)
-- and not behind the wall clock.
CREATE FUNCTION replication_tick(seen bigint DEFAULT 0) RETURNS bigint LANGUAGE sql AS $$
    UPDATE replication_clock
       SET hlc = greatest(hlc + 1, seen + 1,
                          (extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16)
    RETURNING hlc
$$;

-- Changes made here, waiting to be published (in order of `seq`).
CREATE TABLE replication_log (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl        text NOT NULL,
    key        jsonb NOT NULL,
    -- The replicated columns; NULL: the row was deleted.
    row        jsonb,
    hlc        bigint NOT NULL,
    origin     text NOT NULL
);

-- Deleted rows, so an older change arriving later does not bring them back.
CREATE TABLE replication_tombstones (
    tbl        text NOT NULL,
    key        jsonb NOT NULL,
    hlc        bigint NOT NULL,
    origin     text NOT NULL,
    PRIMARY KEY (tbl, key)
);

-- The newest clock value this region has applied from each peer (its heartbeats
-- included, so the lag is measurable while nothing changes).
CREATE TABLE replication_peers (
    region       text PRIMARY KEY,
    applied_hlc  bigint NOT NULL DEFAULT 0,
    applied_at   timestamptz
);

-- What each peer says (in its heartbeats) it has applied from each origin. A tombstone
-- made by `origin` at `hlc` is removed once every other peer has applied `origin` up to
-- it: no older change can arrive after that.
CREATE TABLE replication_acks (
    peer    text NOT NULL,
    origin  text NOT NULL,
    hlc     bigint NOT NULL,
    PRIMARY KEY (peer, origin)
);

-- Changes from other regions that could not be applied yet (a row whose parent has not
-- arrived, a name another row holds): retried after every applied batch.
CREATE TABLE replication_parked (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tbl        text NOT NULL,
    key        jsonb NOT NULL,
    row        jsonb,
    hlc        bigint NOT NULL,
    origin     text NOT NULL,
    error      text NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);

-- The replicated tables: their key columns, replicated columns and sticky columns.
CREATE TABLE replicated_tables (
    tbl        text PRIMARY KEY,
    key_cols   text[] NOT NULL,
    cols       text[] NOT NULL,
    sticky     text[] NOT NULL DEFAULT '{}',
    -- Sticky columns merge only between versions with the same value here (a key's
    -- revocation sticks to that key's secret; a rotated key is a new secret).
    sticky_guard text,
    -- Applied in this order on a first load (parents before children).
    position   int NOT NULL
);
INSERT INTO replicated_tables (tbl, key_cols, cols, sticky, sticky_guard, position) VALUES
    ('regions', '{name}', '{name,url,created_at}', '{}', NULL, 1),
    ('zones', '{name}', '{name,description,region,created_at}', '{}', NULL, 2),
    ('catalog', '{category,name}', '{category,name,attributes}', '{}', NULL, 3),
    ('resource_types', '{kind}', '{kind,plural,service,definition,version,created_at,updated_at}', '{}', NULL, 4),
    ('tenants', '{id}', '{id,display_name,created_at}', '{}', NULL, 5),
    ('principals', '{id}', '{id,name,key_hash,role,tenant,service,zone,created_at,expires_at,revoked_at}', '{revoked_at}', 'key_hash', 6),
    ('quotas', '{tenant}', '{tenant,limits,updated_at}', '{}', NULL, 7),
    ('webhooks', '{id}', '{id,tenant,url,types,description,secret,previous_secret,previous_secret_expires_at,disabled_at,disabled_reason,created_at,updated_at}', '{}', NULL, 8);

ALTER TABLE regions ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE zones ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE catalog ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE resource_types ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE tenants ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE principals ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE quotas ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';
ALTER TABLE webhooks ADD COLUMN hlc bigint NOT NULL DEFAULT 0, ADD COLUMN origin text NOT NULL DEFAULT '';

-- The replicated columns of a row, as JSON.
CREATE FUNCTION replication_project(r jsonb, cols text[]) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(k, v), '{}') FROM jsonb_each(r) AS e(k, v) WHERE k = ANY (cols)
$$;

-- Stamps a local change and logs it. A change that touches no replicated column (a
-- webhook's failure streak) is neither stamped nor logged; changes being applied from
-- another region (`gateway.replicating`) are not logged again.
CREATE FUNCTION replication_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    me text;
    t replicated_tables;
    stamp bigint;
    new_row jsonb;
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
    new_row := replication_project(to_jsonb(NEW), t.cols);
    IF TG_OP = 'UPDATE' AND new_row = replication_project(to_jsonb(OLD), t.cols) THEN
        RETURN NEW;
    END IF;
    stamp := replication_tick();
    NEW.hlc := stamp;
    NEW.origin := me;
    INSERT INTO replication_log (tbl, key, row, hlc, origin)
        VALUES (t.tbl, replication_project(to_jsonb(NEW), t.key_cols), new_row, stamp, me);
    RETURN NEW;
END $$;

CREATE TRIGGER regions_replication BEFORE INSERT OR UPDATE OR DELETE ON regions
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER zones_replication BEFORE INSERT OR UPDATE OR DELETE ON zones
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER catalog_replication BEFORE INSERT OR UPDATE OR DELETE ON catalog
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER resource_types_replication BEFORE INSERT OR UPDATE OR DELETE ON resource_types
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER tenants_replication BEFORE INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER principals_replication BEFORE INSERT OR UPDATE OR DELETE ON principals
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER quotas_replication BEFORE INSERT OR UPDATE OR DELETE ON quotas
    FOR EACH ROW EXECUTE FUNCTION replication_capture();
CREATE TRIGGER webhooks_replication BEFORE INSERT OR UPDATE OR DELETE ON webhooks
    FOR EACH ROW EXECUTE FUNCTION replication_capture();

-- Applies one change from another region; returns what it did: 'applied', 'stale' (an
-- equal or newer version, or a tombstone, is already here; sticky columns still merge)
-- or 'deleted'. Last writer wins by (hlc, origin), the same rule in every region whatever
-- the order of arrival.
CREATE FUNCTION replication_apply(p_tbl text, p_key jsonb, p_row jsonb, p_hlc bigint, p_origin text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t replicated_tables;
    match text;
    cur_hlc bigint;
    cur_origin text;
    found_row boolean;
    grave replication_tombstones;
    col text;
    sets text;
BEGIN
    PERFORM set_config('gateway.replicating', 'on', true);
    PERFORM replication_tick(p_hlc);
    SELECT * INTO STRICT t FROM replicated_tables WHERE tbl = p_tbl;
    SELECT string_agg(format('%I.%I = ($1->>%L)::%s', p_tbl, k, k, format_type(a.atttypid, a.atttypmod)), ' AND ')
      INTO match
      FROM unnest(t.key_cols) AS k
      JOIN pg_attribute a ON a.attrelid = p_tbl::regclass AND a.attname = k;
    EXECUTE format('SELECT true, hlc, origin FROM %I WHERE %s FOR NO KEY UPDATE', p_tbl, match)
        INTO found_row, cur_hlc, cur_origin USING p_key;
    SELECT * INTO grave FROM replication_tombstones WHERE tbl = p_tbl AND key = p_key;
    IF grave.tbl IS NOT NULL AND (grave.hlc, grave.origin) >= (p_hlc, p_origin) THEN
        RETURN 'stale';
    END IF;
    IF p_row IS NULL THEN
        INSERT INTO replication_tombstones (tbl, key, hlc, origin) VALUES (p_tbl, p_key, p_hlc, p_origin)
            ON CONFLICT (tbl, key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin;
        IF found_row AND (cur_hlc, cur_origin) < (p_hlc, p_origin) THEN
            EXECUTE format('DELETE FROM %I WHERE %s', p_tbl, match) USING p_key;
            RETURN 'deleted';
        END IF;
        RETURN 'stale';
    END IF;
    IF found_row AND (cur_hlc, cur_origin) >= (p_hlc, p_origin) THEN
        -- An older version: only its sticky columns count.
        FOREACH col IN ARRAY t.sticky LOOP
            EXECUTE format('UPDATE %I SET %I = least(%I.%I, r.%I) FROM jsonb_populate_record(NULL::%I, $2) AS r WHERE %s AND %s',
                           p_tbl, col, p_tbl, col, col, p_tbl, match,
                           CASE WHEN t.sticky_guard IS NULL THEN 'true'
                                ELSE format('%I.%I = r.%I', p_tbl, t.sticky_guard, t.sticky_guard) END)
                USING p_key, p_row;
        END LOOP;
        RETURN 'stale';
    END IF;
    IF found_row THEN
        SELECT string_agg(CASE WHEN c = ANY (t.sticky) AND t.sticky_guard IS NULL
                               THEN format('%I = least(%I.%I, r.%I)', c, p_tbl, c, c)
                               WHEN c = ANY (t.sticky)
                               THEN format('%I = CASE WHEN %I.%I = r.%I THEN least(%I.%I, r.%I) ELSE r.%I END',
                                           c, p_tbl, t.sticky_guard, t.sticky_guard, p_tbl, c, c, c)
                               ELSE format('%I = r.%I', c, c) END, ', ')
          INTO sets FROM unnest(t.cols) AS c WHERE NOT c = ANY (t.key_cols);
        EXECUTE format('UPDATE %I SET %s, hlc = $3, origin = $4 FROM jsonb_populate_record(NULL::%I, $2) AS r WHERE %s',
                       p_tbl, sets, p_tbl, match) USING p_key, p_row, p_hlc, p_origin;
    ELSE
        EXECUTE format('INSERT INTO %I (%s, hlc, origin) SELECT %s, $2, $3 FROM jsonb_populate_record(NULL::%I, $1)',
                       p_tbl,
                       (SELECT string_agg(format('%I', c), ', ') FROM unnest(t.cols) AS c),
                       (SELECT string_agg(format('%I', c), ', ') FROM unnest(t.cols) AS c),
                       p_tbl) USING p_row, p_hlc, p_origin;
    END IF;
    RETURN 'applied';
END $$;

-- Logs every row of every replicated table as this region's, once: when a region is
-- first configured, so that what it had before (the seeded catalog, tenants made while
-- it ran alone) reaches the others. The rows are stamped with the oldest clock value
-- (1): every real change, in any region, is newer, so the copies of the seeded rows
-- that every region makes never undo a change (a zone's claim by its region); between
-- two such copies the region name decides. Returns how many rows it logged.
CREATE FUNCTION replication_snapshot() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    t replicated_tables;
    me text;
    n bigint := 0;
    c bigint;
BEGIN
    SELECT region INTO STRICT me FROM replication_clock;
    PERFORM set_config('gateway.replicating', 'on', true);
    FOR t IN SELECT * FROM replicated_tables ORDER BY position LOOP
        EXECUTE format('UPDATE %I SET hlc = 1, origin = %L', t.tbl, me);
        EXECUTE format('INSERT INTO replication_log (tbl, key, row, hlc, origin)
                        SELECT %L, replication_project(to_jsonb(x), %L), replication_project(to_jsonb(x), %L), x.hlc, x.origin
                          FROM %I x', t.tbl, t.key_cols, t.cols, t.tbl);
        GET DIAGNOSTICS c = ROW_COUNT;
        n := n + c;
    END LOOP;
    PERFORM set_config('gateway.replicating', 'off', true);
    RETURN n;
END $$;
