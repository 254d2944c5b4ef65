-- A region whose NATS store is lost (a disk replaced, a volume deleted) makes its
-- outbound stream `REPLICATION-{region}` anew, and JetStream numbers its messages from 1
-- again; its peers' sourcing asks for the sequence after the last one it had (say 228),
-- so it skipped the first changes the region made after the loss, and everything the
-- lost stream held (the compacted copy of the region's rows a region added later reads)
-- was gone. The relay now records the highest sequence the stream acknowledged and when
-- the stream was made; when it finds a stream made since (another creation time), it
-- logs the region's own rows again (`replication_relog`), so the peers get what they
-- may have missed and a new region gets everything, and if the stream is behind the
-- recorded sequence it moves the stream's first sequence past it.
-- Never edit this file once it has shipped: add a new migration instead.

-- `published_seq`: the highest sequence `REPLICATION-{region}` acknowledged;
-- `outbound_created`: when that stream was made (nanoseconds since the epoch, as
-- JetStream reports it; NULL until a relay of this version first looked).
-- `inbound_created`: when the `REPLICATION-IN` that `applied_seq` counts in was made.
-- The applier read a stream made anew from the start only if `applied_seq` was past
-- its end; but sourcing fills a new stream quickly, and one already past that point
-- was read from `applied_seq + 1`, its first messages (changes the peers made while
-- this region was down) skipped for good.
ALTER TABLE replication_clock
    ADD COLUMN published_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN outbound_created bigint,
    ADD COLUMN inbound_created bigint;

-- Logs every row this region made (and its own tombstones) with the clock it was stored
-- with: applying one again elsewhere changes nothing, last writer wins by clock.
CREATE FUNCTION replication_relog() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    t replicated_tables;
    me text;
    n bigint := 0;
    c bigint;
BEGIN
    SELECT region INTO me FROM replication_clock;
    IF me IS NULL THEN
        RETURN 0;
    END IF;
    FOR t IN SELECT * FROM replicated_tables ORDER BY position LOOP
        EXECUTE format('INSERT INTO replication_log (tbl, key, row, hlc, origin)
                        SELECT %L, replication_project(to_jsonb(x), %L), replication_project(to_jsonb(x), %L), x.hlc, x.origin
                          FROM %I x WHERE x.origin = %L ORDER BY x.hlc', t.tbl, t.key_cols, t.cols, t.tbl, me);
        GET DIAGNOSTICS c = ROW_COUNT;
        n := n + c;
    END LOOP;
    INSERT INTO replication_log (tbl, key, row, hlc, origin)
        SELECT tbl, key, NULL, hlc, origin FROM replication_tombstones WHERE origin = me ORDER BY hlc;
    GET DIAGNOSTICS c = ROW_COUNT;
    RETURN n + c;
END $$;
