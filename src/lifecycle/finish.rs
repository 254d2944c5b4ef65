//! Ending an operation: its terminal state, its effect on the resource, and the
//! promotion of the next queued operation on that resource — one transaction.

use super::dispatch;
use crate::config::NatsNames;
use crate::domain::{OperationState, Phase};
use crate::store::operations::{self, OperationRow};
use crate::store::resources::{self, StatusChange};
use serde_json::{json, Value};
use sqlx::PgConnection;

/// How an operation ends.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// A terminal state.
    pub state: OperationState,
    /// The attempt that ended it.
    pub attempt: i32,
    /// Observed status, on success.
    pub status: Option<&'a Value>,
    /// Error object (`{code, message, retryable}`), on failure or cancellation.
    pub error: Option<Value>,
}

/// Ends `op` (whose resource row the caller has locked) and starts the next queued
/// operation on the same resource, if any. Returns the ended operation and the one
/// promoted, whose outbox row was written (the caller rings the relay after commit).
pub async fn finish(
    conn: &mut PgConnection,
    names: &NatsNames,
    op: &OperationRow,
    outcome: Outcome<'_>,
) -> sqlx::Result<(OperationRow, Option<uuid::Uuid>)> {
    let ended = operations::finish(
        conn,
        op.id,
        outcome.state,
        outcome.attempt,
        outcome.status,
        outcome.error.as_ref(),
    )
    .await?;
    if op.state == OperationState::Queued {
        // It never started: the resource is busy with another operation, untouched.
        return Ok((ended, None));
    }
    let phase = Phase::on_end(op.action, outcome.state).expect("terminal states set a phase");
    let empty = json!({});
    let (status, generation) = match outcome.state {
        OperationState::Succeeded => (
            StatusChange::Replace(outcome.status.unwrap_or(&empty)),
            op.target_generation,
        ),
        OperationState::Failed => (
            StatusChange::Merge(&json!({ "last_error": outcome.error })),
            0,
        ),
        _ => (StatusChange::Merge(&empty), 0),
    };
    resources::record_outcome(conn, op.resource_id, phase, status, generation).await?;
    let promoted = promote_next(conn, names, op.resource_id, phase).await?;
    Ok((ended, promoted))
}

/// Starts the oldest queued operation of a resource whose previous operation just
/// ended, leaving it in `phase`. A deleted resource has nothing left to act on: its
/// queued operations are cancelled.
async fn promote_next(
    conn: &mut PgConnection,
    names: &NatsNames,
    resource_id: uuid::Uuid,
    phase: Phase,
) -> sqlx::Result<Option<uuid::Uuid>> {
    let queued = operations::active_for_resource(conn, resource_id).await?;
    if phase == Phase::Deleted {
        for op in queued {
            let error = json!({
                "code": "resource_deleted",
                "message": "the resource was deleted before this operation could start",
                "retryable": false,
            });
            operations::finish(
                conn,
                op.id,
                OperationState::Cancelled,
                op.attempt,
                None,
                Some(&error),
            )
            .await?;
        }
        return Ok(None);
    }
    let Some(next) = queued.into_iter().next() else {
        return Ok(None);
    };
    debug_assert_eq!(next.state, OperationState::Queued);
    let resource = resources::lock(conn, resource_id).await?;
    dispatch::enqueue(conn, names, &next, &resource).await?;
    resources::set_phase(conn, resource_id, Phase::on_start(next.action)).await?;
    Ok(Some(next.id))
}
