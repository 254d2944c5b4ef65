-- Resource types as data (`domain::resource_type`): the registry that decides which
-- kinds exist, their URL segment, the service that acts on them, the JSON Schema of
-- their spec and their actions. The four built-in kinds are seeded here and served by
-- the same code path as any kind registered later through `/v1/resource-types`.
CREATE TABLE resource_types (
    kind       text PRIMARY KEY CHECK (kind ~ '^[a-z][a-z0-9_]{0,31}$'),
    plural     text NOT NULL UNIQUE CHECK (plural ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    service    text NOT NULL CHECK (service ~ '^[a-z][a-z0-9_]{0,31}$'),
    -- `domain::resource_type::TypeDef` without kind, plural and service.
    definition jsonb NOT NULL,
    version    bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every gateway, relay and dispatcher listens: a change is served at once everywhere.
CREATE FUNCTION resource_types_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('resource_types', coalesce(NEW.kind, OLD.kind));
    RETURN NULL;
END $$;
CREATE TRIGGER resource_types_notify AFTER INSERT OR UPDATE OR DELETE ON resource_types
    FOR EACH ROW EXECUTE FUNCTION resource_types_notify();

-- Kinds and services are no longer a fixed list: any well-formed name the registry has.
ALTER TABLE resources DROP CONSTRAINT resources_kind_check;
ALTER TABLE resources ADD CONSTRAINT resources_kind_check CHECK (kind ~ '^[a-z][a-z0-9_]{0,31}$');
ALTER TABLE principals DROP CONSTRAINT principals_service_check;
ALTER TABLE principals ADD CONSTRAINT principals_service_check CHECK (service ~ '^[a-z][a-z0-9_]{0,31}$');

INSERT INTO resource_types (kind, plural, service, definition) VALUES
('vm', 'vms', 'vm', $json${
  "description": "A virtual machine.",
  "spec_schema": {
    "type": "object", "additionalProperties": false, "required": ["flavor", "image"],
    "properties": {
      "flavor": {"type": "string", "description": "A catalog flavor, e.g. `m1.small`.",
                 "x-catalog": "flavor", "x-quota": {"catalog_attributes": ["vcpus", "memory_mb"]}},
      "image": {"type": "string", "description": "A catalog image, e.g. `debian-12`.", "x-catalog": "image"},
      "power_state": {"type": "string", "enum": ["running", "stopped"], "default": "running",
                      "description": "Desired power state."}
    }
  },
  "status_schema": {
    "type": "object",
    "properties": {
      "power_state": {"type": "string"}, "flavor": {"type": "string"}, "image": {"type": "string"},
      "ip": {"type": "string"}, "host": {"type": "string"}, "generation": {"type": "integer"}
    }
  },
  "actions": {
    "start": {"description": "Power the VM on.", "patch": {"power_state": "running"}},
    "stop": {"description": "Power the VM off.", "patch": {"power_state": "stopped"}},
    "reboot": {"description": "Restart the VM.",
               "requires": [{"field": "/power_state", "is_not": "stopped",
                             "message": "a stopped VM cannot be rebooted; start it"}]},
    "resize": {"description": "Change the VM's flavor.",
               "input_schema": {"type": "object", "additionalProperties": false, "required": ["flavor"],
                                "properties": {"flavor": {"type": "string"}}},
               "patch": {"flavor": {"$input": "/flavor"}}}
  }
}$json$),
('bm', 'bare-metal', 'bm', $json${
  "description": "A bare-metal server.",
  "spec_schema": {
    "type": "object", "additionalProperties": false, "required": ["machine_class", "image"],
    "properties": {
      "machine_class": {"type": "string", "description": "A catalog machine class, e.g. `bm.standard`.",
                        "x-catalog": "machine_class"},
      "image": {"type": "string", "description": "A catalog image.", "x-catalog": "image"},
      "power_state": {"type": "string", "enum": ["on", "off"], "default": "on",
                      "description": "Desired power state."}
    }
  },
  "status_schema": {
    "type": "object",
    "properties": {
      "power_state": {"type": "string"}, "machine_class": {"type": "string"},
      "image": {"type": "string"}, "bmc_address": {"type": "string"}, "generation": {"type": "integer"}
    }
  },
  "actions": {
    "power_on": {"description": "Power the server on.", "patch": {"power_state": "on"}},
    "power_off": {"description": "Power the server off.", "patch": {"power_state": "off"}},
    "reprovision": {"description": "Reinstall the server, with another image if given.",
                    "input_schema": {"type": "object", "additionalProperties": false,
                                     "properties": {"image": {"type": "string"}}},
                    "patch": {"image": {"$input": "/image"}}}
  }
}$json$),
('cluster', 'clusters', 'k8s', $json${
  "description": "A Kubernetes cluster.",
  "spec_schema": {
    "type": "object", "additionalProperties": false, "required": ["version", "node_count", "node_flavor"],
    "properties": {
      "version": {"type": "string", "description": "A catalog Kubernetes version, e.g. `1.31`.",
                  "x-catalog": "k8s_version"},
      "node_count": {"type": "integer", "minimum": 1, "maximum": 100,
                     "description": "Worker nodes, 1 to 100.", "x-quota": {"dimension": "nodes"}},
      "node_flavor": {"type": "string", "description": "A catalog flavor for the nodes.",
                      "x-catalog": "flavor",
                      "x-quota": {"catalog_attributes": ["vcpus", "memory_mb"], "times": "/node_count"}}
    }
  },
  "status_schema": {
    "type": "object",
    "properties": {
      "version": {"type": "string"}, "node_count": {"type": "integer"}, "nodes_ready": {"type": "integer"},
      "api_endpoint": {"type": "string"}, "generation": {"type": "integer"}
    }
  },
  "actions": {
    "scale": {"description": "Change the cluster's node count.",
              "input_schema": {"type": "object", "additionalProperties": false, "required": ["node_count"],
                               "properties": {"node_count": {"type": "integer", "minimum": 0}}},
              "patch": {"node_count": {"$input": "/node_count"}}},
    "upgrade": {"description": "Move the cluster to a newer Kubernetes version.",
                "input_schema": {"type": "object", "additionalProperties": false, "required": ["version"],
                                 "properties": {"version": {"type": "string"}}},
                "patch": {"version": {"$input": "/version"}},
                "requires": [{"field": "/version", "grows": "version",
                              "message": "an upgrade must move to a newer version"}]}
  }
}$json$),
('volume', 'volumes', 'storage', $json${
  "description": "A storage volume.",
  "spec_schema": {
    "type": "object", "additionalProperties": false, "required": ["size_gb", "class"],
    "properties": {
      "size_gb": {"type": "integer", "minimum": 1, "maximum": 65536,
                  "description": "Size in GB, within the storage class's bounds.",
                  "x-quota": {"dimension": "storage_gb"},
                  "x-catalog-range": {"entry": "/class", "min": "min_gb", "max": "max_gb"}},
      "class": {"type": "string", "description": "A catalog storage class, e.g. `ssd`.",
                "x-catalog": "storage_class"},
      "attached_to": {"type": "string", "format": "uuid",
                      "description": "A VM of the same tenant and zone to attach to.",
                      "x-reference": {"kind": "vm", "code": "invalid_attachment"}}
    }
  },
  "status_schema": {
    "type": "object",
    "properties": {
      "size_gb": {"type": "integer"}, "class": {"type": "string"},
      "attached_to": {"type": ["string", "null"]}, "attached_host": {"type": ["string", "null"]},
      "device": {"type": ["string", "null"]}, "generation": {"type": "integer"}
    }
  },
  "actions": {
    "resize": {"description": "Grow the volume.",
               "input_schema": {"type": "object", "additionalProperties": false, "required": ["size_gb"],
                                "properties": {"size_gb": {"type": "integer", "minimum": 0}}},
               "patch": {"size_gb": {"$input": "/size_gb"}},
               "requires": [{"field": "/size_gb", "grows": "number",
                             "message": "volumes only grow: the new size must be larger"}]},
    "attach": {"description": "Attach the volume to a VM.",
               "input_schema": {"type": "object", "additionalProperties": false, "required": ["vm_id"],
                                "properties": {"vm_id": {"type": "string", "format": "uuid"}}},
               "patch": {"attached_to": {"$input": "/vm_id"}},
               "requires": [{"field": "/attached_to", "present": false,
                             "message": "the volume is attached; detach it first"}]},
    "detach": {"description": "Detach the volume from its VM.",
               "patch": {"attached_to": null},
               "requires": [{"field": "/attached_to", "present": true,
                             "message": "the volume is not attached"}]}
  }
}$json$);
