//! Ending an operation: its terminal state, its effect on the resource, and the
//! promotion of the next queued operation on that resource — one transaction.

use super::dispatch;
use super::txn::Txn;
use crate::domain::{OperationState, Phase};
use crate::store::operations::{self, OperationRow};
use crate::store::resources::{self, StatusChange};
use gateway_proto::OperationError;
use serde_json::{json, Value};

/// How an operation ends.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// A terminal state.
    pub state: OperationState,
    /// The attempt that ended it.
    pub attempt: i32,
    /// Observed status, on success.
    pub status: Option<&'a Value>,
    /// Why it did not succeed, on failure or cancellation.
    pub error: Option<OperationError>,
}

impl Outcome<'_> {
    /// `op` failed with `error`, in its current attempt.
    pub fn failed(op: &OperationRow, error: OperationError) -> Self {
        Self {
            state: OperationState::Failed,
            attempt: op.attempt,
            status: None,
            error: Some(error),
        }
    }
}

/// Fails `op` (locked through [`super::lock_operation`]) with `error`, and starts the
/// next queued operation on its resource.
pub async fn fail(
    txn: &mut Txn<'_>,
    op: &OperationRow,
    error: OperationError,
) -> sqlx::Result<OperationRow> {
    finish(txn, op, Outcome::failed(op, error)).await
}

/// Ends `op` (whose resource row the caller has locked) and starts the next queued
/// operation on the same resource, if any; returns the ended operation. What changed is
/// recorded in `txn` and announced when it commits.
pub async fn finish(
    txn: &mut Txn<'_>,
    op: &OperationRow,
    outcome: Outcome<'_>,
) -> sqlx::Result<OperationRow> {
    let ended = operations::finish(
        txn,
        op.id,
        outcome.state,
        outcome.attempt,
        outcome.status,
        outcome.error.as_ref(),
    )
    .await?;
    txn.finished(op, outcome.state);
    if op.state == OperationState::Queued {
        // It never started: the resource is busy with another operation, untouched.
        return Ok(ended);
    }
    let phase = Phase::on_end(&op.action, outcome.state).expect("terminal states set a phase");
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
    resources::record_outcome(txn, op.resource_id, phase, status, generation).await?;
    promote_next(txn, op.resource_id, phase).await?;
    Ok(ended)
}

/// Starts the oldest queued operation of a resource whose previous operation just
/// ended, leaving it in `phase`. A deleted resource has nothing left to act on: its
/// queued operations are cancelled.
async fn promote_next(
    txn: &mut Txn<'_>,
    resource_id: uuid::Uuid,
    phase: Phase,
) -> sqlx::Result<()> {
    let queued = operations::active_for_resource(txn, resource_id).await?;
    if phase == Phase::Deleted {
        let error = OperationError::new(
            "resource_deleted",
            "the resource was deleted before this operation could start",
            false,
        );
        for op in queued {
            let state = OperationState::Cancelled;
            operations::finish(txn, op.id, state, op.attempt, None, Some(&error)).await?;
            txn.finished(&op, state);
        }
        return Ok(());
    }
    let Some(next) = queued.into_iter().next() else {
        return Ok(());
    };
    debug_assert_eq!(next.state, OperationState::Queued);
    let resource = resources::lock(txn, resource_id).await?;
    dispatch::enqueue(txn, &next, &resource).await?;
    resources::set_phase(txn, resource_id, Phase::on_start(&next.action)).await?;
    txn.changed(next.id);
    Ok(())
}
