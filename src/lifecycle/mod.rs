//! The lifecycle of resources and operations: every state change, each in one
//! transaction with the outbox row it causes.
//!
//! Lock order, everywhere: the resource row first, then its operation rows (and, for a
//! write checked against a quota, the tenant's quota row after the resource row).
//! Keeping one order is what keeps submissions, reports and the reconciler free of
//! deadlocks.
//!
//! **Architecture invariant:** a state change and its outbox row commit together or
//! not at all (docs/ARCHITECTURE.md, invariant 1). Nothing here publishes to NATS directly; the
//! relay does, after commit.

pub mod cancel;
mod creates;
pub mod dispatch;
pub mod finish;
pub mod group;
pub mod keys;
pub mod quotas;
pub mod repair;
pub mod report;
pub mod resource_types;
pub mod submit;
pub mod tenants;
pub mod txn;
pub mod webhooks;

pub use txn::{lock_operation, Audit, LockedOperation, Txn};

use crate::changes::Changes;
use crate::changes::Wake;
use crate::config::NatsNames;
use crate::domain::report::Rejection;
use crate::domain::ValidationError;
use sqlx::PgPool;
use std::time::Duration;

/// What the lifecycle functions need: the database, naming, limits and the relay's
/// doorbell.
#[derive(Clone)]
pub struct Engine {
    /// The source of truth.
    pub pool: PgPool,
    /// JetStream names (subjects of dispatched operations).
    pub names: NatsNames,
    /// Deadline given to every new operation.
    pub operation_timeout: Duration,
    /// How long an `Idempotency-Key` is remembered (then it may be used again).
    pub idempotency_retention: Duration,
    /// Rung after every lifecycle commit (each writes events, most an outbox row).
    pub wake: Wake,
    /// Told after every commit that changed an operation.
    pub changes: Changes,
    /// Counts operations created and finished.
    pub metrics: crate::metrics::Metrics,
    /// The catalog and zones that specs are checked against.
    pub catalog: crate::cache::CatalogCache,
    /// The registered resource types.
    pub types: crate::registry::Registry,
    /// Makes resource and operation IDs (tagged with the region, if any).
    pub ids: crate::domain::region::IdMaker,
    /// Where creates wait to share a transaction.
    pub group: std::sync::Arc<group::GroupCommit>,
}

impl Engine {
    /// The service of `kind`, for metrics' labels (`unregistered` for a kind the
    /// registry no longer has).
    pub fn service_label(&self, kind: &crate::domain::Kind) -> crate::domain::Service {
        self.types
            .snapshot()
            .service_of(kind)
            .cloned()
            .unwrap_or_else(|| crate::domain::Service::named("unregistered"))
    }

    /// The deadline of an operation created now.
    pub fn deadline(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
            + chrono::Duration::from_std(self.operation_timeout)
                .unwrap_or(chrono::Duration::hours(1))
    }
}

/// Why a lifecycle call did not happen. Nothing was written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The request breaks a domain rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The tenant does not exist (or the caller may not see it).
    #[error("tenant not found")]
    TenantNotFound,
    /// The resource or operation does not exist (or the caller may not see it).
    #[error("not found")]
    NotFound,
    /// A live resource of that kind already has that name.
    #[error("a {kind} named {name:?} already exists")]
    NameTaken {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// The live resource that has the name, when it was found (a client whose
        /// create without an `Idempotency-Key` was cut off, and made the resource after
        /// all, can tell its own by it).
        existing: Option<uuid::Uuid>,
    },
    /// The kind has no action of that name.
    #[error("a {kind} has no action {action}")]
    UnknownAction {
        /// The kind.
        kind: String,
        /// The action asked for.
        action: String,
    },
    /// The tenant already exists.
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The same `Idempotency-Key` came with a different request.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// `If-Match` named another version.
    #[error("the resource is at version {current}, not the one in If-Match")]
    PreconditionFailed {
        /// The current version (the ETag without quotes).
        current: i64,
    },
    /// The resource is being deleted; nothing else may be queued on it.
    #[error("the resource is being deleted")]
    ResourceDeleting,
    /// The operation already ended.
    #[error("the operation already ended as {0}")]
    OperationFinished(crate::domain::OperationState),
    /// The write would take the tenant past one of its quota's limits.
    #[error(transparent)]
    QuotaExceeded(#[from] crate::domain::quota::Exceeded),
    /// A worker's report was refused.
    #[error(transparent)]
    Report(#[from] Rejection),
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}
