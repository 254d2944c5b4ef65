-- A message JetStream acknowledged whose dispatch the relay could not record yet (its
-- resource was in use) keeps the stream sequence it got: a later pass records it
-- without publishing it again. A second publish would be dropped as a duplicate only
-- within the stream's duplicate window (15 minutes, `nats/streams.json`), and a
-- resource can be held for longer than that (an operator's open transaction).
-- Never edit this file once it has shipped: add a new migration instead.
ALTER TABLE outbox ADD COLUMN published_seq bigint;
