//! The catalog's categories, and the catalog names a spec gives.
//!
//! What a spec must look like is data: each kind's JSON Schema in the registry
//! ([`super::resource_type`]). The catalog itself (flavors, images, …) is seeded by the
//! migrations; `x-catalog` in a spec schema names one of these categories.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
    /// Dotted path of the field, for the error message (`spec.flavor`).
    pub field: String,
    /// Which catalog it must be in.
    pub category: Category,
    /// The name given.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_round_trip() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
        }
        assert_eq!(Category::parse("tape"), None);
    }
}
