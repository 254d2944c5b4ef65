-- The gateway's source of truth. See DESIGN.md (data model) and README.md (architecture).
-- Never edit this file once it has shipped: add a new migration instead.

CREATE TABLE zones (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO zones (name, description) VALUES
    ('zone-a', 'Default zone A'),
    ('zone-b', 'Default zone B');

-- Static, read-often data that specs are validated against.
CREATE TABLE catalog (
    category   text NOT NULL CHECK (category IN ('flavor', 'image', 'machine_class', 'k8s_version', 'storage_class')),
    name       text NOT NULL,
    attributes jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (category, name)
);

INSERT INTO catalog (category, name, attributes) VALUES
    ('flavor', 'm1.small',  '{"vcpus": 1, "memory_mb": 2048}'),
    ('flavor', 'm1.medium', '{"vcpus": 2, "memory_mb": 4096}'),
    ('flavor', 'm1.large',  '{"vcpus": 4, "memory_mb": 8192}'),
    ('flavor', 'm1.xlarge', '{"vcpus": 8, "memory_mb": 16384}'),
    ('image', 'debian-12',    '{"os": "linux", "family": "debian"}'),
    ('image', 'ubuntu-24.04', '{"os": "linux", "family": "ubuntu"}'),
    ('image', 'rocky-9',      '{"os": "linux", "family": "rhel"}'),
    ('image', 'flatcar',      '{"os": "linux", "family": "flatcar"}'),
    ('machine_class', 'bm.standard', '{"cpus": 32, "memory_gb": 256}'),
    ('machine_class', 'bm.highmem',  '{"cpus": 32, "memory_gb": 1024}'),
    ('machine_class', 'bm.gpu',      '{"cpus": 64, "memory_gb": 512, "gpus": 8}'),
    ('machine_class', 'bm.storage',  '{"cpus": 16, "memory_gb": 128, "disks": 24}'),
    ('k8s_version', '1.29', '{"end_of_life": "2025-02-28"}'),
    ('k8s_version', '1.30', '{"end_of_life": "2025-06-28"}'),
    ('k8s_version', '1.31', '{"end_of_life": "2025-10-28"}'),
    ('k8s_version', '1.32', '{"end_of_life": "2026-02-28"}'),
    ('storage_class', 'ssd',  '{"min_gb": 1,  "max_gb": 16384}'),
    ('storage_class', 'nvme', '{"min_gb": 1,  "max_gb": 8192}'),
    ('storage_class', 'hdd',  '{"min_gb": 10, "max_gb": 65536}');

CREATE TABLE tenants (
    id           text PRIMARY KEY CHECK (id ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    display_name text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- API keys. Only a SHA-256 of the key is stored; keys are 256-bit random, so a fast
-- hash is enough (no password stretching needed) and lookups are by hash.
CREATE TABLE principals (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    key_hash   bytea NOT NULL UNIQUE,
    role       text NOT NULL CHECK (role IN ('admin', 'owner', 'member', 'reader', 'worker')),
    tenant     text REFERENCES tenants (id),
    service    text CHECK (service IN ('vm', 'bm', 'k8s', 'storage')),
    zone       text REFERENCES zones (name),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    CHECK ((role = 'worker') = (service IS NOT NULL AND zone IS NOT NULL)),
    CHECK ((role IN ('owner', 'member', 'reader')) = (tenant IS NOT NULL))
);

CREATE TABLE resources (
    id                  uuid PRIMARY KEY,
    tenant              text NOT NULL REFERENCES tenants (id),
    kind                text NOT NULL CHECK (kind IN ('vm', 'bm', 'cluster', 'volume')),
    zone                text NOT NULL REFERENCES zones (name),
    name                text NOT NULL,
    spec                jsonb NOT NULL,
    status              jsonb NOT NULL DEFAULT '{}',
    phase               text NOT NULL CHECK (phase IN ('provisioning', 'ready', 'updating', 'deleting', 'failed', 'deleted')),
    generation          bigint NOT NULL DEFAULT 1,
    observed_generation bigint NOT NULL DEFAULT 0,
    version             bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz,
    CHECK ((phase = 'deleted') = (deleted_at IS NOT NULL))
);

-- A live name is unique per tenant and kind; deleted resources free their name.
CREATE UNIQUE INDEX resources_live_name ON resources (tenant, kind, name) WHERE deleted_at IS NULL;
-- Lists: newest first by (created_at, id) within a tenant and kind.
CREATE INDEX resources_list ON resources (tenant, kind, created_at DESC, id DESC) WHERE deleted_at IS NULL;

CREATE TABLE operations (
    id                  uuid PRIMARY KEY,
    -- Submission order; operations on one resource run in this order.
    seq                 bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    tenant              text NOT NULL REFERENCES tenants (id),
    resource_id         uuid NOT NULL REFERENCES resources (id),
    kind                text NOT NULL,
    zone                text NOT NULL,
    action              text NOT NULL,
    state               text NOT NULL CHECK (state IN ('queued', 'pending', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt             integer NOT NULL DEFAULT 0,
    -- How many times an outbox row was written for it (re-dispatches get new message IDs).
    dispatches          integer NOT NULL DEFAULT 0,
    input               jsonb NOT NULL DEFAULT '{}',
    target_generation   bigint NOT NULL,
    result              jsonb,
    error               jsonb,
    cancel_requested    boolean NOT NULL DEFAULT false,
    idempotency_key     text,
    request_fingerprint text,
    requested_by        uuid REFERENCES principals (id),
    request_id          text NOT NULL,
    traceparent         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    deadline            timestamptz NOT NULL,
    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);

-- The active (non-terminal) operations of a resource, in order: drives queueing.
CREATE INDEX operations_active_by_resource ON operations (resource_id, seq)
    WHERE state IN ('queued', 'pending', 'dispatched', 'running');
-- The reconciler's scans: deadlines and stuck dispatches.
CREATE INDEX operations_active_deadline ON operations (deadline)
    WHERE state IN ('queued', 'pending', 'dispatched', 'running');
CREATE INDEX operations_tenant_list ON operations (tenant, seq DESC);
CREATE INDEX operations_resource ON operations (resource_id, seq DESC);
CREATE UNIQUE INDEX operations_idempotency ON operations (requested_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Messages waiting for the relay. Rows live for milliseconds; vacuum them eagerly so
-- the table stays small however many millions of rows pass through it.
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_id uuid,
    subject      text NOT NULL,
    -- Fixed at insert; becomes Nats-Msg-Id, so a re-publish after a crash is deduplicated.
    msg_id       text NOT NULL UNIQUE,
    headers      jsonb NOT NULL DEFAULT '{}',
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 1000);

-- The reconciler asks whether an operation still has a message waiting.
CREATE INDEX outbox_operation ON outbox (operation_id);
