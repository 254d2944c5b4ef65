//! Wire types: what the API sends and receives (`…In` / `…Out`).

pub use crate::views::{OperationOut, ResourceOut};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Body of `POST /v1/tenants/{tenant}/{kind}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResourceIn {
    /// Unique per tenant and kind among live resources; a DNS label.
    #[schema(example = "web-1")]
    pub name: String,
    /// A zone from `GET /v1/zones`.
    #[schema(example = "zone-a")]
    pub zone: String,
    /// The kind's spec, as its registered type's `spec_schema` says (`VmSpec`,
    /// `BmSpec`, `ClusterSpec`, `VolumeSpec`, … in the served document).
    #[schema(example = json!({"flavor": "m1.small", "image": "debian-12"}))]
    pub spec: Value,
    /// Key/value metadata (at most 32; keys and values of up to 63 characters).
    #[serde(default)]
    #[schema(example = json!({"env": "prod"}))]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One page of a list; pass `next_cursor` as `cursor` for the next page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items, newest first.
    pub items: Vec<T>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
