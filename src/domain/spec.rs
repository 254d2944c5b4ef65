//! Specs: the desired state of each kind, validated on construction.
//!
//! Parsing checks shape and ranges; names that must exist in the catalog come back as
//! [`CatalogRef`]s for the caller to check against the database, so this module stays
//! pure.

use super::{Kind, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// The most nodes one cluster may ask for.
pub const MAX_NODE_COUNT: u32 = 100;
/// The largest volume, in GB, before any storage class's own limit.
pub const MAX_VOLUME_GB: u32 = 65_536;

/// A group of catalog entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// VM and cluster-node sizes.
    Flavor,
    /// Operating-system images.
    Image,
    /// Bare-metal machine classes.
    MachineClass,
    /// Supported Kubernetes versions.
    K8sVersion,
    /// Storage classes, with `min_gb`/`max_gb` attributes.
    StorageClass,
}

impl Category {
    /// Every category.
    pub const ALL: [Category; 5] = [
        Category::Flavor,
        Category::Image,
        Category::MachineClass,
        Category::K8sVersion,
        Category::StorageClass,
    ];

    /// The value as stored in the database and used in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Flavor => "flavor",
            Category::Image => "image",
            Category::MachineClass => "machine_class",
            Category::K8sVersion => "k8s_version",
            Category::StorageClass => "storage_class",
        }
    }

    /// Parses [`Category::as_str`] back.
    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A name in a spec that must exist in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRef {
    /// Dotted path of the field, for the error message.
    pub field: &'static str,
    /// Which catalog it must be in.
    pub category: Category,
    /// The name given.
    pub name: String,
}

/// Power state of a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmPower {
    /// Powered on.
    #[default]
    Running,
    /// Powered off.
    Stopped,
}

/// Power state of a bare-metal server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BmPower {
    /// Powered on.
    #[default]
    On,
    /// Powered off.
    Off,
}

/// Desired state of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// A catalog flavor, e.g. `m1.small`.
    pub flavor: String,
    /// A catalog image, e.g. `debian-12`.
    pub image: String,
    /// Desired power state (default `running`).
    #[serde(default)]
    pub power_state: VmPower,
}

/// Desired state of a bare-metal server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BmSpec {
    /// A catalog machine class, e.g. `bm.standard`.
    pub machine_class: String,
    /// A catalog image.
    pub image: String,
    /// Desired power state (default `on`).
    #[serde(default)]
    pub power_state: BmPower,
}

/// Desired state of a Kubernetes cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// A catalog Kubernetes version, e.g. `1.31`.
    pub version: String,
    /// Worker nodes, 1 to 100.
    pub node_count: u32,
    /// A catalog flavor for the nodes.
    pub node_flavor: String,
}

/// Desired state of a storage volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Size in GB, within the storage class's bounds.
    pub size_gb: u32,
    /// A catalog storage class, e.g. `ssd`.
    pub class: String,
    /// A VM of the same tenant and zone to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<Uuid>,
}

/// A spec that passed every check this module can make alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The spec with defaults filled in, as stored.
    pub value: Value,
    /// Names to check against the catalog.
    pub refs: Vec<CatalogRef>,
    /// For volumes: the size to check against the storage class's bounds.
    pub size_gb: Option<u32>,
    /// For volumes: the VM to attach to, which must be live, same tenant and zone.
    pub attach_to: Option<Uuid>,
}

fn parse<T: serde::de::DeserializeOwned + Serialize>(
    value: &Value,
) -> Result<(T, Value), ValidationError> {
    let typed: T = serde_json::from_value(value.clone())
        .map_err(|e| ValidationError::new("invalid_spec", "spec", e.to_string()))?;
    let normalized = serde_json::to_value(&typed).expect("specs serialize");
    Ok((typed, normalized))
}

fn reference(field: &'static str, category: Category, name: &str) -> CatalogRef {
    CatalogRef {
        field,
        category,
        name: name.to_owned(),
    }
}

/// Parses and checks the spec of a resource of `kind`.
pub fn validate(kind: Kind, value: &Value) -> Result<ValidSpec, ValidationError> {
    let (refs, size_gb, attach_to, value) = match kind {
        Kind::Vm => {
            let (s, v) = parse::<VmSpec>(value)?;
            let refs = vec![
                reference("spec.flavor", Category::Flavor, &s.flavor),
                reference("spec.image", Category::Image, &s.image),
            ];
            (refs, None, None, v)
        }
        Kind::Bm => {
            let (s, v) = parse::<BmSpec>(value)?;
            let refs = vec![
                reference(
                    "spec.machine_class",
                    Category::MachineClass,
                    &s.machine_class,
                ),
                reference("spec.image", Category::Image, &s.image),
            ];
            (refs, None, None, v)
        }
        Kind::Cluster => {
            let (s, v) = parse::<ClusterSpec>(value)?;
            if s.node_count == 0 || s.node_count > MAX_NODE_COUNT {
                return Err(ValidationError::new(
                    "invalid_spec",
                    "spec.node_count",
                    format!(
                        "must be between 1 and {MAX_NODE_COUNT}, got {}",
                        s.node_count
                    ),
                ));
            }
            let refs = vec![
                reference("spec.version", Category::K8sVersion, &s.version),
                reference("spec.node_flavor", Category::Flavor, &s.node_flavor),
            ];
            (refs, None, None, v)
        }
        Kind::Volume => {
            let (s, v) = parse::<VolumeSpec>(value)?;
            if s.size_gb == 0 || s.size_gb > MAX_VOLUME_GB {
                return Err(ValidationError::new(
                    "invalid_spec",
                    "spec.size_gb",
                    format!("must be between 1 and {MAX_VOLUME_GB}, got {}", s.size_gb),
                ));
            }
            let refs = vec![reference("spec.class", Category::StorageClass, &s.class)];
            (refs, Some(s.size_gb), s.attached_to, v)
        }
    };
    Ok(ValidSpec {
        value,
        refs,
        size_gb,
        attach_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_defaults_and_lists_catalog_names() {
        let s = validate(
            Kind::Vm,
            &json!({"flavor": "m1.small", "image": "debian-12"}),
        )
        .unwrap();
        assert_eq!(s.value["power_state"], "running");
        assert_eq!(s.refs.len(), 2);
        assert_eq!(s.refs[0].category, Category::Flavor);
    }

    #[test]
    fn every_kind_accepts_its_documented_example() {
        let examples = [
            (
                Kind::Vm,
                json!({"flavor": "m1.small", "image": "debian-12"}),
            ),
            (
                Kind::Bm,
                json!({"machine_class": "bm.standard", "image": "debian-12"}),
            ),
            (
                Kind::Cluster,
                json!({"version": "1.31", "node_count": 3, "node_flavor": "m1.large"}),
            ),
            (Kind::Volume, json!({"size_gb": 20, "class": "ssd"})),
        ];
        for (kind, spec) in examples {
            assert!(validate(kind, &spec).is_ok(), "{kind}");
        }
    }

    #[test]
    fn rejects_unknown_fields_wrong_types_and_ranges() {
        let cases = [
            (
                Kind::Vm,
                json!({"flavor": "m1.small", "image": "debian-12", "gpu": true}),
                "spec",
            ),
            (Kind::Vm, json!({"flavor": 3, "image": "debian-12"}), "spec"),
            (Kind::Vm, json!("m1.small"), "spec"),
            (
                Kind::Cluster,
                json!({"version": "1.31", "node_count": 0, "node_flavor": "m1.large"}),
                "spec.node_count",
            ),
            (
                Kind::Cluster,
                json!({"version": "1.31", "node_count": -1, "node_flavor": "m1.large"}),
                "spec",
            ),
            (
                Kind::Volume,
                json!({"size_gb": 0, "class": "ssd"}),
                "spec.size_gb",
            ),
            (
                Kind::Volume,
                json!({"size_gb": 70000, "class": "ssd"}),
                "spec.size_gb",
            ),
        ];
        for (kind, spec, field) in cases {
            let err = validate(kind, &spec).unwrap_err();
            assert_eq!(err.code, "invalid_spec", "{spec}");
            assert_eq!(err.field, field, "{spec}");
        }
    }

    #[test]
    fn categories_round_trip() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
        }
    }
}
