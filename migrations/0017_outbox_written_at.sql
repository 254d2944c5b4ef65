-- An outbox row's `created_at` is the moment it was written (`clock_timestamp()`), not
-- the start of the transaction that wrote it (`now()`): the relay's lag metric
-- (`gateway_relay_lag_seconds`) and the outbox's oldest age measure from it, and a
-- group-commit transaction may have begun well before its last create joined it.
-- Never edit this file once it has shipped: add a new migration instead.
ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT clock_timestamp();
