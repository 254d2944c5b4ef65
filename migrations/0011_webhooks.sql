-- Webhooks (issue 10): a tenant's HTTP endpoints that receive its events, signed as the
-- Standard Webhooks specification says, with a delivery log.
-- Never edit this file once it has shipped: add a new migration instead.

CREATE TABLE webhooks (
    id                          uuid PRIMARY KEY,
    tenant                      text NOT NULL REFERENCES tenants (id),
    url                         text NOT NULL,
    -- Event types it wants; empty: all.
    types                       text[] NOT NULL DEFAULT '{}',
    description                 text NOT NULL DEFAULT '',
    -- `whsec_…` (Standard Webhooks); shown once, at creation and rotation.
    secret                      text NOT NULL,
    -- The secret before the last rotation, still signing until it expires.
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    -- Failed attempts in a row; past WEBHOOK_DISABLE_AFTER the endpoint is disabled.
    failure_streak              integer NOT NULL DEFAULT 0,
    disabled_at                 timestamptz,
    disabled_reason             text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK ((disabled_at IS NULL) = (disabled_reason IS NULL))
);
CREATE INDEX webhooks_tenant ON webhooks (tenant, created_at, id);

-- One event for one endpoint: created by the dispatcher's fan-out (once per endpoint and
-- event, whatever the redeliveries), leased by one dispatcher at a time while it sends.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    -- The CloudEvent as sent (with its cursor).
    event            jsonb NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- While set and in the future, a dispatcher is sending it.
    locked_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, created_at DESC, id DESC);

-- Every attempt, for the delivery log.
CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    latency_ms   integer NOT NULL,
    -- The start of the response body (at most 1 KiB), or why there was none.
    response     text NOT NULL DEFAULT '',
    error        text
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
