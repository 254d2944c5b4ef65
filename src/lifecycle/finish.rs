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
    let mut ended = finish_many(txn, &[(op, outcome)]).await?;
    ended.pop().ok_or(sqlx::Error::RowNotFound)
}

/// Ends several operations, each as [`finish`] ends one, with one statement per table
/// (plus one per resource that has a queued operation to start); returns the ended
/// operations in the order given. Their resources are distinct (a resource has one
/// active operation at a time) and locked by the caller.
pub async fn finish_many(
    txn: &mut Txn<'_>,
    ends: &[(&OperationRow, Outcome<'_>)],
) -> sqlx::Result<Vec<OperationRow>> {
    let rows: Vec<operations::End> = ends
        .iter()
        .map(|(op, outcome)| operations::End {
            id: op.id,
            state: outcome.state,
            attempt: outcome.attempt,
            result: outcome.status,
            error: outcome.error.as_ref(),
        })
        .collect();
    let ended = operations::finish_many(txn, &rows).await?;
    // It never started: the resource is busy with another operation, untouched.
    let acted: Vec<_> = ends
        .iter()
        .inspect(|(op, outcome)| txn.finished(op, outcome.state))
        .filter(|(op, _)| op.state != OperationState::Queued)
        .collect();
    let empty = json!({});
    let merged: Vec<Value> = acted
        .iter()
        .map(|(_, outcome)| match outcome.state {
            OperationState::Failed => json!({ "last_error": outcome.error }),
            _ => json!({}),
        })
        .collect();
    let outcomes: Vec<resources::Outcome> = acted
        .iter()
        .zip(&merged)
        .map(|((op, outcome), merge)| {
            let (status, generation) = match outcome.state {
                OperationState::Succeeded => (
                    StatusChange::Replace(outcome.status.unwrap_or(&empty)),
                    op.target_generation,
                ),
                _ => (StatusChange::Merge(merge), 0),
            };
            resources::Outcome {
                id: op.resource_id,
                phase: Phase::on_end(&op.action, outcome.state)
                    .expect("terminal states set a phase"),
                status,
                generation,
            }
        })
        .collect();
    if !outcomes.is_empty() {
        let active = resources::record_outcomes(txn, &outcomes).await?;
        promote_next(txn, &outcomes, &active).await?;
    }
    Ok(ended)
}

/// Starts the oldest queued operation of each resource whose previous operation just
/// ended, leaving it in the outcome's phase. A deleted resource has nothing left to act
/// on: its queued operations are cancelled. `active` are the operations still active on
/// those resources, each resource's oldest first.
async fn promote_next(
    txn: &mut Txn<'_>,
    ended: &[resources::Outcome<'_>],
    active: &[OperationRow],
) -> sqlx::Result<()> {
    for outcome in ended {
        let queued: Vec<&OperationRow> = active
            .iter()
            .filter(|op| op.resource_id == outcome.id)
            .collect();
        if !queued.is_empty() {
            promote(txn, outcome.id, outcome.phase, queued).await?;
        }
    }
    Ok(())
}

/// Starts the first of `queued`, the queued operations of `resource_id` (or cancels them
/// all when the resource is `Deleted`).
async fn promote(
    txn: &mut Txn<'_>,
    resource_id: uuid::Uuid,
    phase: Phase,
    queued: Vec<&OperationRow>,
) -> sqlx::Result<()> {
    if phase == Phase::Deleted {
        let error = OperationError::new(
            "resource_deleted",
            "the resource was deleted before this operation could start",
            false,
        );
        for op in queued {
            let state = OperationState::Cancelled;
            operations::finish(txn, op.id, state, op.attempt, None, Some(&error)).await?;
            txn.finished(op, state);
        }
        return Ok(());
    }
    let Some(next) = queued.into_iter().next() else {
        return Ok(());
    };
    debug_assert_eq!(next.state, OperationState::Queued);
    let resource = resources::lock(txn, resource_id).await?;
    dispatch::enqueue(txn, next, &resource).await?;
    resources::set_phase(txn, resource_id, Phase::on_start(&next.action)).await?;
    txn.changed(next.id);
    txn.changed(resource_id);
    Ok(())
}
