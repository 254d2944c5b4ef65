-- Leasing webhook deliveries endpoint by endpoint: the dispatcher walks the endpoints
-- that have pending deliveries (a skip scan of this index) and takes each one's oldest
-- due deliveries, so one endpoint's backlog can no longer fill the window a pass looks
-- at and hold up every other endpoint's deliveries.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, next_attempt_at)
    WHERE state = 'pending';
-- Deliveries being sent (or whose lease lapsed), counted per endpoint and tenant at each
-- pass: few rows, whatever the backlog.
CREATE INDEX webhook_deliveries_leased ON webhook_deliveries (webhook_id)
    WHERE state = 'pending' AND locked_until IS NOT NULL;
