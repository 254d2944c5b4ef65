//! How the API shows operations and resources: the one representation that answers,
//! events and webhooks all carry.

use crate::domain::{Action, Kind, OperationError, OperationState, Phase};
use crate::store::operations::OperationRow;
use crate::store::resources::ResourceRow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// A resource: desired `spec`, observed `status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResourceOut {
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
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub labels: Value,
    /// Desired state.
    pub spec: Value,
    /// Observed state, as last reported by its worker.
    pub status: Value,
    /// What is happening to it.
    pub phase: Phase,
    /// Bumped on every spec change.
    pub generation: i64,
    /// The generation its worker last converged on; equal to `generation` when converged.
    pub observed_generation: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<ResourceRow> for ResourceOut {
    fn from(r: ResourceRow) -> Self {
        Self {
            id: r.id,
            tenant: r.tenant,
            kind: r.kind,
            zone: r.zone,
            name: r.name,
            labels: r.labels,
            spec: r.spec,
            status: r.status,
            phase: r.phase,
            generation: r.generation,
            observed_generation: r.observed_generation,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// An asynchronous operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OperationOut {
    /// Its ID; poll `GET /v1/operations/{id}`.
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
    pub input: Value,
    /// The resource generation it converges on.
    pub target_generation: i64,
    /// Observed status reported on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// After this the gateway fails it with `deadline_exceeded`.
    pub deadline: DateTime<Utc>,
}

impl From<OperationRow> for OperationOut {
    fn from(o: OperationRow) -> Self {
        Self {
            id: o.id,
            tenant: o.tenant,
            resource_id: o.resource_id,
            kind: o.kind,
            zone: o.zone,
            action: o.action,
            state: o.state,
            done: o.state.is_terminal(),
            attempt: o.attempt,
            input: o.input,
            target_generation: o.target_generation,
            result: o.result,
            error: o.error.and_then(|e| serde_json::from_value(e).ok()),
            cancel_requested: o.cancel_requested,
            request_id: o.request_id,
            created_at: o.created_at,
            updated_at: o.updated_at,
            started_at: o.started_at,
            finished_at: o.finished_at,
            deadline: o.deadline,
        }
    }
}
