//! Applying workers' reports.

use super::finish::{self, Outcome};
use super::{Engine, LifecycleError};
use crate::auth::Principal;
use crate::domain::report::{decide, Progress, Transition};
use crate::store::{operations, resources};
use gateway_proto::{Report, ReportAck};
use uuid::Uuid;

/// Applies a worker's report on operation `id`, in one transaction with whatever it
/// causes (resource status, promotion of the next queued operation and its outbox row).
pub async fn apply(
    engine: &Engine,
    principal: &Principal,
    id: Uuid,
    report: &Report,
) -> Result<ReportAck, LifecycleError> {
    let mut tx = engine.pool.begin().await?;
    // Lock order: resource, then operation. The first read only finds the resource.
    let resource_id = operations::get(&mut *tx, id)
        .await?
        .ok_or(LifecycleError::NotFound)?
        .resource_id;
    resources::lock(&mut tx, resource_id).await?;
    let op = operations::lock(&mut tx, id)
        .await?
        .ok_or(LifecycleError::NotFound)?;
    if !principal.can_report(op.kind.service(), &op.zone) {
        return Err(LifecycleError::Forbidden(
            "this key may report only on operations of its own service and zone",
        ));
    }
    let progress = Progress {
        state: op.state,
        attempt: op.attempt,
        cancel_requested: op.cancel_requested,
    };
    let op_created = op.created_at;
    let first_start = op.started_at.is_none();
    let transition = decide(progress, report)?;
    let (after, promoted) = match transition {
        Transition::Unchanged => (op, None),
        Transition::Start { attempt } => (operations::start(&mut tx, id, attempt).await?, None),
        Transition::Finish { state, attempt } => {
            let outcome = Outcome {
                state,
                attempt,
                status: report.status.as_ref(),
                error: report
                    .error
                    .as_ref()
                    .map(|e| serde_json::to_value(e).expect("errors serialize")),
            };
            finish::finish(&mut tx, &engine.names, &op, outcome).await?
        }
    };
    tx.commit().await?;
    let age = (chrono::Utc::now() - op_created)
        .to_std()
        .unwrap_or_default();
    match transition {
        Transition::Start { .. } if first_start => {
            engine
                .metrics
                .operation_started(after.action, after.kind, age)
        }
        Transition::Finish { state, .. } => {
            engine
                .metrics
                .operation_finished(after.action, after.kind, &after.zone, state, age)
        }
        _ => {}
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
    Ok(ReportAck {
        operation_id: after.id,
        state: after.state,
        attempt: after.attempt,
        cancel_requested: after.cancel_requested,
    })
}
