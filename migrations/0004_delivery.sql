-- Delivery guarantees (issue 4): where each operation's current message sits in the
-- operations stream, and the scans of the reconciler's sweeper and converger.
-- Never edit this file once it has shipped: add a new migration instead.

-- The JetStream stream sequence of the operation's latest dispatch message, recorded by
-- the relay from JetStream's publish ack. The sweeper asks JetStream whether that
-- message still exists; the dead-letter handler finds the operation of an advisory
-- whose message is already gone (a terminated message leaves a work queue at once).
ALTER TABLE operations ADD COLUMN stream_seq bigint;
CREATE INDEX operations_stream_seq ON operations (stream_seq) WHERE stream_seq IS NOT NULL;

-- The sweeper's scan: active operations that have been quiet, oldest change first.
CREATE INDEX operations_active_updated ON operations (updated_at)
    WHERE state IN ('dispatched', 'running');

-- The converger's scan: live resources whose desired state is ahead of the observed one.
-- Only resources with an update in flight (or a lost one) are in it: it stays small.
CREATE INDEX resources_unconverged ON resources (updated_at)
    WHERE generation > observed_generation AND deleted_at IS NULL;
