//! Applying workers' reports.

use super::finish::{self, Outcome};
use super::{lock_operation, Engine, LifecycleError};
use crate::auth::Principal;
use crate::domain::report::{decide, Progress, Transition};
use crate::store::operations;
use gateway_proto::{Report, ReportAck};
use uuid::Uuid;

/// Applies a worker's report on operation `id`, in one transaction with whatever it
/// causes (resource status, promotion of the next queued operation and its outbox row).
pub async fn apply(
    engine: &Engine,
    principal: &Principal,
    id: Uuid,
    audit: super::Audit<'_>,
    report: &Report,
) -> Result<ReportAck, LifecycleError> {
    let locked = lock_operation(engine, id)
        .await?
        .ok_or(LifecycleError::NotFound)?;
    let (mut txn, op) = (locked.txn, locked.op);
    txn.audit(audit);
    txn.audit_tenant(&op.tenant);
    if !principal.can_report(&engine.service_label(&op.kind), &op.zone) {
        return Err(LifecycleError::Forbidden(
            "this key may report only on operations of its own service and zone",
        ));
    }
    let progress = Progress {
        state: op.state,
        attempt: op.attempt,
        cancel_requested: op.cancel_requested,
    };
    let after = match decide(progress, report)? {
        Transition::Unchanged => op,
        Transition::Start { attempt } => {
            let started = operations::start(&mut txn, id, attempt).await?;
            if op.started_at.is_none() {
                txn.started(&op);
            }
            started
        }
        Transition::Finish { state, attempt } => {
            let outcome = Outcome {
                state,
                attempt,
                status: report.status.as_ref(),
                error: report.error.clone(),
            };
            finish::finish(&mut txn, &op, outcome).await?
        }
    };
    // A repeated report wakes long-polls too: cheap, and never wrong.
    txn.changed(id);
    txn.commit().await?;
    Ok(ReportAck {
        operation_id: after.id,
        state: after.state,
        attempt: after.attempt,
        cancel_requested: after.cancel_requested,
    })
}
