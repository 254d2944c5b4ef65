//! Cancelling operations.
//!
//! An operation no worker has started (`queued` or `pending`) is cancelled at once: its
//! message, if already on its way, is refused by the gateway when a worker reports on
//! it. A `dispatched` or `running` one is marked `cancel_requested`; its worker sees that
//! in the answer to its next report and stops (`cancelled`), or finishes first
//! (`succeeded`/`failed`) — the terminal state says which happened. Cancelling a
//! cancelled operation answers the same again; cancelling a finished one is a `409`.

use super::finish::{self, Outcome};
use super::{Engine, LifecycleError};
use crate::auth::Principal;
use crate::domain::OperationState;
use crate::store::{operations, operations::OperationRow, resources};
use serde_json::json;
use uuid::Uuid;

/// Cancels operation `id`, or asks its worker to stop.
pub async fn cancel(
    engine: &Engine,
    principal: &Principal,
    id: Uuid,
) -> Result<OperationRow, LifecycleError> {
    let mut tx = engine.pool.begin().await?;
    let resource_id = operations::get(&mut *tx, id)
        .await?
        .filter(|op| principal.can_read(&op.tenant))
        .ok_or(LifecycleError::NotFound)?
        .resource_id;
    resources::lock(&mut tx, resource_id).await?;
    let op = operations::lock(&mut tx, id)
        .await?
        .ok_or(LifecycleError::NotFound)?;
    if !principal.can_write(&op.tenant) {
        return Err(LifecycleError::Forbidden(
            "this key may not cancel operations",
        ));
    }
    let (after, promoted) = match op.state {
        // Cancelling twice answers the same: a client that lost the first answer retries.
        OperationState::Cancelled => return Ok(op),
        s if s.is_terminal() => return Err(LifecycleError::OperationFinished(s)),
        OperationState::Queued | OperationState::Pending => {
            let outcome = Outcome {
                state: OperationState::Cancelled,
                attempt: op.attempt,
                status: None,
                error: Some(json!({
                    "code": "cancelled",
                    "message": "cancelled before a worker started it",
                    "retryable": false,
                })),
            };
            finish::finish(&mut tx, &engine.names, &op, outcome).await?
        }
        _ if op.cancel_requested => (op, None),
        _ => (operations::request_cancel(&mut tx, id).await?, None),
    };
    tx.commit().await?;
    if after.state.is_terminal() {
        let age = (chrono::Utc::now() - after.created_at)
            .to_std()
            .unwrap_or_default();
        engine
            .metrics
            .operation_finished(after.action, after.kind, &after.zone, after.state, age);
    }
    if promoted.is_some() {
        engine.wake.signal().await;
    }
    engine
        .changes
        .publish(
            &[Some(id), promoted]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        )
        .await;
    Ok(after)
}
