//! Cancelling operations.
//!
//! An operation no worker has started (`queued` or `pending`) is cancelled at once: its
//! message, if already on its way, is refused by the gateway when a worker reports on
//! it. A `dispatched` or `running` one is marked `cancel_requested`; its worker sees that
//! in the answer to its next report and stops (`cancelled`), or finishes first
//! (`succeeded`/`failed`) — the terminal state says which happened. Cancelling a
//! cancelled operation answers the same again; cancelling a finished one is a `409`.

use super::finish::{self, Outcome};
use super::{lock_operation, Engine, LifecycleError};
use crate::auth::Principal;
use crate::domain::OperationState;
use crate::store::{operations, operations::OperationRow};
use gateway_proto::OperationError;
use uuid::Uuid;

/// Cancels operation `id`, or asks its worker to stop.
pub async fn cancel(
    engine: &Engine,
    principal: &Principal,
    id: Uuid,
    audit: super::Audit<'_>,
) -> Result<OperationRow, LifecycleError> {
    let locked = lock_operation(engine, id)
        .await?
        .filter(|l| principal.can_read(&l.op.tenant))
        .ok_or(LifecycleError::NotFound)?;
    let (mut txn, op) = (locked.txn, locked.op);
    txn.audit(audit);
    txn.audit_tenant(&op.tenant);
    if !principal.can_write(&op.tenant) {
        return Err(LifecycleError::Forbidden(
            "this key may not cancel operations",
        ));
    }
    let after = match op.state {
        // Cancelling twice answers the same: a client that lost the first answer retries.
        OperationState::Cancelled => return Ok(op),
        s if s.is_terminal() => return Err(LifecycleError::OperationFinished(s)),
        OperationState::Queued | OperationState::Pending => {
            let outcome = Outcome {
                state: OperationState::Cancelled,
                attempt: op.attempt,
                status: None,
                error: Some(OperationError::new(
                    "cancelled",
                    "cancelled before a worker started it",
                    false,
                )),
            };
            finish::finish(&mut txn, &op, outcome).await?
        }
        _ if op.cancel_requested => op,
        _ => operations::request_cancel(&mut txn, id).await?,
    };
    txn.changed(id);
    txn.commit().await?;
    Ok(after)
}
