//! Applying workers' reports, one at a time or in batches.

use super::finish::{self, Outcome};
use super::txn::Txn;
use super::{lock_operation, Engine, LifecycleError};
use crate::audit::AuditPart;
use crate::auth::Principal;
use crate::domain::report::{decide, Progress, Transition};
use crate::store::operations::{self, OperationRow};
use crate::store::resources;
use gateway_proto::{BatchedReport, Report, ReportAck};
use std::collections::HashMap;
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
    let after = apply_locked(&mut txn, principal, op, report).await?;
    txn.commit().await?;
    Ok(ack(&after))
}

/// Applies `reports` in order, in one transaction: each is accepted (`Ok`) or refused
/// (`Err` with the error the single-report path would answer) on its own, and a refused
/// one writes nothing. Only a database failure fails the whole batch, and then nothing
/// of it is written.
///
/// Locks are taken as every multi-row change takes them, so batches cannot deadlock with
/// the relay or each other: all the operations' resources first, in ID order, then the
/// operations (each only ever locked under its resource's lock).
///
/// `refuse` turns a refusal into the caller's error and the status it answers. Each
/// report is audited as the single-report request it stands for, with that status and
/// the request ID it carries.
pub async fn apply_batch<R>(
    engine: &Engine,
    principal: &Principal,
    audit: super::Audit<'_>,
    reports: &[BatchedReport],
    refuse: impl Fn(LifecycleError) -> (u16, R),
) -> Result<Vec<Result<ReportAck, R>>, LifecycleError> {
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    let mut ids: Vec<Uuid> = reports.iter().map(|r| r.operation_id).collect();
    ids.sort_unstable();
    ids.dedup();
    resources::lock_of_operations(&mut txn, &ids).await?;
    let mut ops: HashMap<Uuid, OperationRow> = operations::lock_many(&mut txn, &ids)
        .await?
        .into_iter()
        .map(|op| (op.id, op))
        .collect();
    let mut results = Vec::with_capacity(reports.len());
    for item in reports {
        let op = ops.get(&item.operation_id).cloned();
        let tenant = op.as_ref().map(|op| op.tenant.clone());
        let outcome = match op {
            None => Err(LifecycleError::NotFound),
            Some(op) => match apply_locked(&mut txn, principal, op, &item.report).await {
                Ok(after) => {
                    let acked = ack(&after);
                    ops.insert(after.id, after);
                    Ok(acked)
                }
                Err(LifecycleError::Database(e)) => return Err(e.into()),
                Err(refused) => Err(refused),
            },
        };
        let (status, result) = match outcome {
            Ok(acked) => (200, Ok(acked)),
            Err(e) => {
                let (status, refused) = refuse(e);
                (status, Err(refused))
            }
        };
        txn.audit_part(AuditPart {
            tenant: tenant.as_deref(),
            action: "POST /v1/operations/{id}/reports",
            target: format!("/v1/operations/{}/reports", item.operation_id),
            status,
            request_id: item.request_id.as_deref(),
        });
        results.push(result);
    }
    txn.commit().await?;
    Ok(results)
}

/// Applies `report` to `op`, locked with its resource in `txn`. A refusal writes
/// nothing: every check comes before the first write.
async fn apply_locked(
    txn: &mut Txn<'_>,
    principal: &Principal,
    op: OperationRow,
    report: &Report,
) -> Result<OperationRow, LifecycleError> {
    let engine = txn.engine();
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
    let id = op.id;
    let after = match decide(progress, report)? {
        Transition::Unchanged => op,
        Transition::Start { attempt } => {
            let started = operations::start(txn, id, attempt).await?;
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
            finish::finish(txn, &op, outcome).await?
        }
    };
    // A repeated report wakes long-polls too: cheap, and never wrong.
    txn.changed(id);
    Ok(after)
}

/// The acknowledgement of a report that left the operation as `op`.
fn ack(op: &OperationRow) -> ReportAck {
    ReportAck {
        operation_id: op.id,
        state: op.state,
        attempt: op.attempt,
        cancel_requested: op.cancel_requested,
    }
}
