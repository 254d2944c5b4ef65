-- Tenant quotas (issue 11 §5): each tenant's limits, and what each resource consumes.
-- Never edit this file once it has shipped: add a new migration instead.

-- What a resource consumes, written by the gateway with its desired spec whenever the
-- spec changes (`domain::quota::footprint`: vCPUs and memory from the flavor's catalog
-- attributes, times `node_count` for clusters; nodes; volume size). A tenant's usage is
-- their sum over its live resources (`count` is one per row), so a resource stops
-- counting when its delete succeeds.
ALTER TABLE resources
    ADD COLUMN vcpus      bigint NOT NULL DEFAULT 0 CHECK (vcpus >= 0),
    ADD COLUMN memory_mb  bigint NOT NULL DEFAULT 0 CHECK (memory_mb >= 0),
    ADD COLUMN nodes      bigint NOT NULL DEFAULT 0 CHECK (nodes >= 0),
    ADD COLUMN storage_gb bigint NOT NULL DEFAULT 0 CHECK (storage_gb >= 0);

-- Resources created before this migration: the same rule, once, in SQL.
WITH f AS (
    SELECT r.id,
           CASE r.kind WHEN 'cluster' THEN (r.spec->>'node_count')::bigint ELSE 1 END AS units,
           COALESCE((c.attributes->>'vcpus')::bigint, 0) AS vcpus,
           COALESCE((c.attributes->>'memory_mb')::bigint, 0) AS memory_mb
    FROM resources r
    LEFT JOIN catalog c
           ON c.category = 'flavor'
          AND c.name = CASE r.kind WHEN 'vm' THEN r.spec->>'flavor'
                                   WHEN 'cluster' THEN r.spec->>'node_flavor' END
    WHERE r.deleted_at IS NULL
)
UPDATE resources r SET
    vcpus      = f.units * f.vcpus,
    memory_mb  = f.units * f.memory_mb,
    nodes      = CASE WHEN r.kind = 'cluster' THEN f.units ELSE 0 END,
    storage_gb = CASE WHEN r.kind = 'volume' THEN (r.spec->>'size_gb')::bigint ELSE 0 END
FROM f
WHERE f.id = r.id;

-- A tenant's limits: a JSON array of {dimension, kind, zone, limit} (`domain::quota::Limit`,
-- validated by the gateway). Only tenants with limits have a row; the row is also the
-- lock that serializes the quota checks of one tenant's writes.
CREATE TABLE quotas (
    tenant     text PRIMARY KEY REFERENCES tenants (id),
    limits     jsonb NOT NULL CHECK (jsonb_typeof(limits) = 'array'),
    updated_at timestamptz NOT NULL DEFAULT now()
);
