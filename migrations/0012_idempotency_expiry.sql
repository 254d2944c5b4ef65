-- Flat growth (issue 12): idempotency keys expire after GATEWAY_IDEMPOTENCY_RETENTION_SECONDS
-- (24 h by default). The reconciler clears expired ones in batches, oldest first, through
-- this index of the operations that still hold a key; the operations themselves stay.
-- Never edit this file once it has shipped: add a new migration instead.

CREATE INDEX operations_idempotency_expiry ON operations (created_at)
    WHERE idempotency_key IS NOT NULL;
