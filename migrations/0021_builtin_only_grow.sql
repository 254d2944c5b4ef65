-- A volume's size and a cluster's Kubernetes version may only grow through `PATCH` too,
-- as their `resize` and `upgrade` actions already required: the rule was on the actions
-- only, so a `PATCH` of the spec could shrink a volume (losing its data) or move a
-- cluster to an older version. `x-only-grows` on the spec field holds for every change.
-- Only where the field is as seeded (a kind an operator has since changed keeps its
-- definition); the version moves, so every gateway compiles the kind again.
UPDATE resource_types
SET definition = jsonb_set(definition, '{spec_schema,properties,size_gb,x-only-grows}', 'true'),
    version = version + 1,
    updated_at = now()
WHERE kind = 'volume'
  AND definition #> '{spec_schema,properties,size_gb}' IS NOT NULL
  AND definition #> '{spec_schema,properties,size_gb,x-only-grows}' IS NULL;

UPDATE resource_types
SET definition = jsonb_set(definition, '{spec_schema,properties,version,x-only-grows}', '"version"'),
    version = version + 1,
    updated_at = now()
WHERE kind = 'cluster'
  AND definition #> '{spec_schema,properties,version}' IS NOT NULL
  AND definition #> '{spec_schema,properties,version,x-only-grows}' IS NULL;
