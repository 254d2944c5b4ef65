//! What the API sends and receives, as the client sees it. Field names and shapes match
//! the gateway's wire types (`src/api/wire.rs` and the route modules); unknown fields are
//! ignored so that a newer gateway does not break an older client.

use chrono::{DateTime, Utc};
use gateway_proto::{Action, Kind, OperationError, OperationState, Phase, Service};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// One page of a list; pass `next_cursor` as `cursor` for the next page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Page<T> {
    /// The items, newest first.
    pub items: Vec<T>,
    /// Absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Stable machine-readable code.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured details (for example the offending `field`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// The request's ID.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// An asynchronous operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Operation {
    /// Its ID.
    pub id: Uuid,
    /// Owner of the resource.
    pub tenant: String,
    /// The resource acted on.
    pub resource_id: Uuid,
    /// Its kind.
    pub kind: Kind,
    /// Its zone.
    pub zone: String,
    /// What it does.
    pub action: Action,
    /// Where it is.
    pub state: OperationState,
    /// Whether `state` is final.
    pub done: bool,
    /// The latest attempt a worker started.
    pub attempt: i32,
    /// Action arguments.
    #[serde(default)]
    pub input: Value,
    /// The resource generation it converges on.
    pub target_generation: i64,
    /// Observed status reported on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationError>,
    /// A client asked to cancel it.
    pub cancel_requested: bool,
    /// The request that submitted it.
    pub request_id: String,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a worker first started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// After this the gateway fails it with `deadline_exceeded`.
    pub deadline: DateTime<Utc>,
}

/// A resource: desired `spec`, observed `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Resource {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: String,
    /// Kind.
    pub kind: Kind,
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Key/value metadata.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Desired state.
    pub spec: Value,
    /// Observed state.
    pub status: Value,
    /// What is happening to it.
    pub phase: Phase,
    /// Bumped on every spec change.
    pub generation: i64,
    /// The generation its worker last converged on.
    pub observed_generation: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The `ETag` of a single read (for `If-Match`); absent in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Body of a resource create.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct NewResource {
    /// Unique per tenant and kind among live resources; a DNS label.
    pub name: String,
    /// A zone from `GET /v1/zones`.
    pub zone: String,
    /// The kind's spec.
    pub spec: Value,
    /// Key/value metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Body of a resource patch: a JSON merge patch of the spec, and/or label changes
/// (`None` removes a label).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct ResourcePatch {
    /// Merge patch of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Value>,
    /// Labels to set (`Some`) or remove (`None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, Option<String>>>,
}

/// Filters and paging of a resource list.
#[derive(Debug, Clone, Default)]
pub struct ResourceQuery {
    /// Only this zone.
    pub zone: Option<String>,
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only resources created at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// A label selector: `k=v,k2=v2`.
    pub label: Option<String>,
    /// Page size (1–500).
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl ResourceQuery {
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        push(&mut q, "zone", self.zone.clone());
        push(&mut q, "phase", self.phase.map(|p| p.as_str().to_owned()));
        push(&mut q, "label", self.label.clone());
        window(q, self.since, self.limit, &self.cursor)
    }
}

/// Filters and paging of a tenant's operation list.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    /// Only this state.
    pub state: Option<OperationState>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only this resource's operations.
    pub resource_id: Option<Uuid>,
    /// Only operations submitted (created) at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Page size (1–500).
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl OperationQuery {
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        push(&mut q, "state", self.state.map(|s| s.to_string()));
        push(&mut q, "kind", self.kind.as_ref().map(|k| k.to_string()));
        push(&mut q, "zone", self.zone.clone());
        push(
            &mut q,
            "resource_id",
            self.resource_id.map(|r| r.to_string()),
        );
        window(q, self.since, self.limit, &self.cursor)
    }
}

/// Filters and paging of the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this key.
    pub principal_id: Option<Uuid>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only entries at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Page size (1–500).
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl AuditQuery {
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        push(&mut q, "tenant", self.tenant.clone());
        push(
            &mut q,
            "principal_id",
            self.principal_id.map(|p| p.to_string()),
        );
        push(&mut q, "outcome", self.outcome.clone());
        window(q, self.since, self.limit, &self.cursor)
    }
}

/// Adds what every list takes: `since`, `limit`, `cursor`.
fn window(
    mut q: Vec<(&'static str, String)>,
    since: Option<DateTime<Utc>>,
    limit: Option<u32>,
    cursor: &Option<String>,
) -> Vec<(&'static str, String)> {
    push(&mut q, "since", since.map(|s| s.to_rfc3339()));
    push(&mut q, "limit", limit.map(|l| l.to_string()));
    push(&mut q, "cursor", cursor.clone());
    q
}

fn push(q: &mut Vec<(&'static str, String)>, name: &'static str, value: Option<String>) {
    if let Some(v) = value {
        q.push((name, v));
    }
}

/// A tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Tenant {
    /// Its ID, a DNS label.
    pub id: String,
    /// A name for people.
    #[serde(default)]
    pub display_name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// The body of `POST /v1/tenants`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct NewTenant {
    /// The tenant's ID (its URL segment).
    pub id: String,
    /// A name for people.
    #[serde(default)]
    pub display_name: String,
}

/// What a key may do (the gateway's `domain::role::Role`, which carries the policy and
/// so stays in the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, on every tenant.
    Admin,
    /// Everything on one tenant, including its keys.
    Owner,
    /// Read and write resources of one tenant.
    Member,
    /// Read resources of one tenant.
    Reader,
    /// A worker pool's credentials.
    Worker,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(Value::String(s.to_owned()))
            .map_err(|_| format!("unknown role {s:?}: admin, owner, member, reader or worker"))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self).expect("serializes");
        f.write_str(text.as_str().unwrap_or_default())
    }
}

/// Body of a key create.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct NewKeyRequest {
    /// `owner`, `member`, `reader`, or (admins only) `worker`.
    pub role: Role,
    /// A worker key's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// A worker key's zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// A name, unique per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// An API key, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct KeyInfo {
    /// Its ID.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its tenant (none for platform keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// A worker key's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// A worker key's zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new key: the secret, shown only once, and its description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct NewKey {
    /// The secret to send as `Authorization: Bearer …`.
    pub key: String,
    /// What it is.
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// One quota limit to set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct QuotaLimit {
    /// `count`, `vcpus`, `memory_mb`, `nodes` or `storage_gb`.
    pub dimension: String,
    /// The kind it is about; every kind when `None`.
    #[serde(default)]
    pub kind: Option<Kind>,
    /// The zone it is about; every zone when `None`.
    #[serde(default)]
    pub zone: Option<String>,
    /// The most that may be used.
    pub limit: i64,
}

/// A limit with how much of it is used.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct QuotaLimitUsed {
    /// The limit.
    #[serde(flatten)]
    pub limit: QuotaLimit,
    /// How much the resources it covers use.
    pub used: i64,
}

/// What a tenant's resources of one kind in one zone consume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Usage {
    /// Kind.
    pub kind: Kind,
    /// Zone.
    pub zone: String,
    /// Resources.
    pub count: i64,
    /// Virtual CPUs.
    pub vcpus: i64,
    /// Memory, MiB.
    pub memory_mb: i64,
    /// Cluster nodes.
    pub nodes: i64,
    /// Volume capacity, GB.
    pub storage_gb: i64,
}

/// The body of `PUT /v1/tenants/{tenant}/quotas`: the limits that replace the tenant's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct QuotaLimits {
    /// Every limit the tenant is to have.
    pub limits: Vec<QuotaLimit>,
}

/// A tenant's limits and usage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Quotas {
    /// The tenant.
    pub tenant: String,
    /// Its limits.
    pub limits: Vec<QuotaLimitUsed>,
    /// Its usage per kind and zone.
    pub usage: Vec<Usage>,
}

/// A zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Zone {
    /// Its name.
    pub name: String,
    /// A description.
    #[serde(default)]
    pub description: String,
    /// The region that owns it, when the installation has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Its region's gateway, when that is another region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A registered resource type (`/v1/resource-types`), as the gateway shows it. Its
/// schemas stay JSON: a client needs no release to work with a new kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct ResourceType {
    /// The kind (`loadbalancer`).
    pub kind: Kind,
    /// Its collection's URL segment (`load-balancers`).
    pub plural: String,
    /// The service whose workers act on it.
    pub service: Service,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the spec.
    pub spec_schema: Value,
    /// JSON Schema of the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_schema: Option<Value>,
    /// The actions, by name.
    #[serde(default)]
    pub actions: serde_json::Map<String, Value>,
    /// Its version (only in answers).
    #[serde(default, skip_serializing)]
    pub version: i64,
}

/// One entry of a catalog category.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct CatalogEntry {
    /// Its name, as specs name it.
    pub name: String,
    /// Its attributes (for example a flavor's `vcpus`).
    #[serde(default)]
    pub attributes: Value,
}

/// One audit log entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Its sequence number.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (hidden for other tenants' keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<Uuid>,
    /// The key's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_name: Option<String>,
    /// The tenant concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What was asked.
    pub action: String,
    /// On what.
    pub target: String,
    /// `allowed`, `denied`, …
    pub outcome: String,
    /// The HTTP status answered.
    pub status: i16,
    /// The request's ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Whether the principal is hidden from this viewer.
    #[serde(default)]
    pub principal_hidden: bool,
    /// The entry's hash in the chain, once sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// Filters and resume point of `GET /v1/tenants/{tenant}/events` (a page).
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only events of this resource.
    pub resource: Option<Uuid>,
    /// Only events of this operation.
    pub operation: Option<Uuid>,
    /// Only these types (`operation.succeeded`, …).
    pub types: Vec<String>,
    /// After this cursor (none: from the oldest event kept).
    pub after: Option<String>,
    /// Page size (1–500).
    pub limit: Option<u32>,
}

impl EventQuery {
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        push(&mut q, "kind", self.kind.as_ref().map(|k| k.to_string()));
        push(&mut q, "zone", self.zone.clone());
        push(&mut q, "resource", self.resource.map(|r| r.to_string()));
        push(&mut q, "operation", self.operation.map(|o| o.to_string()));
        push(
            &mut q,
            "type",
            (!self.types.is_empty()).then(|| self.types.join(",")),
        );
        push(&mut q, "after", self.after.clone());
        push(&mut q, "limit", self.limit.map(|l| l.to_string()));
        q
    }
}

/// A page of events, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct EventPage {
    /// The events (CloudEvents, with their `cursor`).
    pub items: Vec<gateway_proto::events::CloudEvent>,
    /// Pass it as `after` for the next page; it stays put while there is nothing new.
    pub next_cursor: String,
}

/// A webhook endpoint to register.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct NewWebhook {
    /// Where deliveries go (`https`, a public address).
    pub url: String,
    /// Event types to receive; empty: all.
    #[serde(default)]
    pub types: Vec<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// What to change of a webhook endpoint; absent fields stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct WebhookPatch {
    /// A new URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// New event types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// A new description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Re-enable (`true`) or pause (`false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// A webhook endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Webhook {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: String,
    /// Where deliveries go.
    pub url: String,
    /// Event types (empty: all).
    pub types: Vec<String>,
    /// Free text.
    pub description: String,
    /// Whether deliveries are sent.
    pub enabled: bool,
    /// Why it is disabled.
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// When it was disabled.
    #[serde(default)]
    pub disabled_at: Option<DateTime<Utc>>,
    /// Failed attempts in a row.
    pub failure_streak: i32,
    /// Until when the previous secret still signs.
    #[serde(default)]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A webhook endpoint with its signing secret (at registration and rotation only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct WebhookWithSecret {
    /// The endpoint.
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_…`.
    pub secret: String,
}

/// One attempt of a webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct DeliveryAttempt {
    /// When.
    pub at: DateTime<Utc>,
    /// The endpoint's status, if it answered.
    #[serde(default)]
    pub status_code: Option<i32>,
    /// Time to the answer or failure.
    pub latency_ms: i32,
    /// The start of the answer.
    pub response: String,
    /// Why there was no answer.
    #[serde(default)]
    pub error: Option<String>,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(test, derive(utoipa::ToSchema))]
pub struct Delivery {
    /// Its ID.
    pub id: Uuid,
    /// The event's ID.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub state: String,
    /// When the next attempt is due.
    #[serde(default)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Attempts, oldest first.
    pub attempts: Vec<DeliveryAttempt>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}
