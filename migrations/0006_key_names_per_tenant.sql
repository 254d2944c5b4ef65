-- API key names are unique per tenant, no longer across all tenants (issue 11): a
-- `409 name_taken` must not tell one tenant that another has a key of that name.
-- Platform keys (no tenant: admins and workers, such as `bootstrap-admin` and
-- `worker:{service}:{zone}`) stay unique among themselves. Tenant IDs are DNS labels,
-- never '', so '' stands for "no tenant"; the key writes name this index's expressions
-- in their ON CONFLICT clauses.
-- Never edit this file once it has shipped: add a new migration instead.

ALTER TABLE principals DROP CONSTRAINT principals_name_key;
CREATE UNIQUE INDEX principals_name_per_tenant ON principals ((COALESCE(tenant, '')), name);
