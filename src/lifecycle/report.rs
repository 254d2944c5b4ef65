//! Applying workers' reports, one at a time or in batches.

use super::finish::{self, Outcome};
use super::txn::Txn;
use super::{lock_operation, Engine, LifecycleError};
use crate::audit::AuditPart;
use crate::auth::Principal;
use crate::domain::report::{decide, Progress, Transition};
use crate::domain::OperationState;
use crate::store::operations::{self, OperationRow};
use crate::store::resources;
use gateway_proto::{BatchedReport, Report, ReportAck};
use std::collections::{BTreeMap, HashMap};
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
/// report is audited as the single-report request it stands for (`each`), with that
/// status and the request ID it carries.
pub async fn apply_batch<R>(
    engine: &Engine,
    principal: &Principal,
    audit: super::Audit<'_>,
    reports: &[BatchedReport],
    each: AuditedAs,
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
    let mut held = Held::default();
    let mut results = Vec::with_capacity(reports.len());
    for item in reports {
        let op = ops.get(&item.operation_id).cloned();
        let tenant = op.as_ref().map(|op| op.tenant.clone());
        let outcome = match op {
            None => Err(LifecycleError::NotFound),
            Some(op) => match apply_in_batch(&mut txn, principal, &mut held, op, item).await {
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
            action: each.action,
            target: (each.target)(item.operation_id),
            status,
            request_id: item.request_id.as_deref(),
        });
        results.push(result);
    }
    held.record(&mut txn).await?;
    txn.commit().await?;
    Ok(results)
}

/// How each report of a batch is audited: as the request on its own operation that it
/// stands for (the API names that request; this layer knows no routes).
#[derive(Debug, Clone, Copy)]
pub struct AuditedAs {
    /// Method and route template, e.g. `POST /v1/operations/{id}/reports`.
    pub action: &'static str,
    /// The concrete path of that request for operation `id`.
    pub target: fn(Uuid) -> String,
}

/// The starts and ends of a batch's operations not yet written. They are written
/// together, one statement per table ([`Held::record`]), at the end of the batch or
/// before anything else is written for one of their operations.
///
/// Holding them cannot reorder writes that matter: each resource has one active
/// operation at a time (the others are `queued`, and a report cannot start or end a
/// queued operation), so what is held for one operation touches no other's rows.
#[derive(Default)]
struct Held<'r> {
    /// Operations still `pending` when reported on: marked `dispatched` first.
    undispatched: Vec<Uuid>,
    starts: BTreeMap<Uuid, i32>,
    ends: Vec<(OperationRow, Outcome<'r>)>,
}

impl Held<'_> {
    /// Whether something is held for operation `id`.
    fn holds(&self, id: Uuid) -> bool {
        self.undispatched.contains(&id)
            || self.starts.contains_key(&id)
            || self.ends.iter().any(|(op, _)| op.id == id)
    }

    /// Writes what is held (dispatches, then starts, then ends), and forgets it.
    async fn record(&mut self, txn: &mut Txn<'_>) -> sqlx::Result<()> {
        if !self.undispatched.is_empty() {
            operations::mark_dispatched(txn, &std::mem::take(&mut self.undispatched)).await?;
        }
        if !self.starts.is_empty() {
            let starts: Vec<(Uuid, i32)> = std::mem::take(&mut self.starts).into_iter().collect();
            operations::start_many(txn, &starts).await?;
        }
        if !self.ends.is_empty() {
            let ends = std::mem::take(&mut self.ends);
            let ends: Vec<(&OperationRow, Outcome)> = ends
                .iter()
                .map(|(op, outcome)| (op, outcome.clone()))
                .collect();
            finish::finish_many(txn, &ends).await?;
        }
        Ok(())
    }
}

/// Applies one report of a batch to `op` (locked with its resource), as
/// [`apply_locked`] does, except that a start or an end is held in `held` and `op` is
/// answered as it will be once they are written.
async fn apply_in_batch<'r>(
    txn: &mut Txn<'_>,
    principal: &Principal,
    held: &mut Held<'r>,
    mut op: OperationRow,
    item: &'r BatchedReport,
) -> Result<OperationRow, LifecycleError> {
    let transition = plan(txn, principal, &op, &item.report)?;
    if matches!(transition, Transition::Unchanged) {
        txn.changed(op.id);
        return Ok(op);
    }
    if held.holds(op.id) {
        held.record(txn).await?;
    }
    if op.state == OperationState::Pending {
        held.undispatched.push(op.id);
    }
    let now = chrono::Utc::now();
    op.updated_at = now;
    match transition {
        Transition::Start { attempt } => {
            if op.started_at.is_none() {
                txn.started(&op);
            }
            held.starts.insert(op.id, attempt);
            op.state = OperationState::Running;
            op.attempt = attempt;
            op.started_at.get_or_insert(now);
        }
        Transition::Finish { state, attempt } => {
            let outcome = Outcome {
                state,
                attempt,
                status: item.report.status.as_ref(),
                error: item.report.error.clone(),
            };
            held.ends.push((op.clone(), outcome));
            op.state = state;
            op.attempt = attempt;
            op.result = item.report.status.clone();
            op.error = item
                .report
                .error
                .as_ref()
                .and_then(|e| serde_json::to_value(e).ok());
            op.finished_at = Some(now);
        }
        Transition::Unchanged => {}
    }
    txn.changed(op.id);
    Ok(op)
}

/// Applies `report` to `op`, locked with its resource in `txn`. A refusal writes
/// nothing: every check comes before the first write.
async fn apply_locked(
    txn: &mut Txn<'_>,
    principal: &Principal,
    op: OperationRow,
    report: &Report,
) -> Result<OperationRow, LifecycleError> {
    let transition = plan(txn, principal, &op, report)?;
    write(txn, op, transition, report).await
}

/// What `report` does to `op`, or why it is refused: every check, no write.
fn plan(
    txn: &Txn<'_>,
    principal: &Principal,
    op: &OperationRow,
    report: &Report,
) -> Result<Transition, LifecycleError> {
    let engine = txn.engine();
    if !principal.can_report(&engine.service_label(&op.kind), &op.zone) {
        // One that may not even read it learns nothing of it, as a read would answer.
        if !principal.can_read(&op.tenant) {
            return Err(LifecycleError::NotFound);
        }
        return Err(LifecycleError::Forbidden(
            "this key may report only on operations of its own service and zone",
        ));
    }
    let progress = Progress {
        state: op.state,
        attempt: op.attempt,
        cancel_requested: op.cancel_requested,
    };
    Ok(decide(progress, report)?)
}

/// Writes `transition` of `op` (what [`plan`] decided for `report`).
async fn write(
    txn: &mut Txn<'_>,
    op: OperationRow,
    transition: Transition,
    report: &Report,
) -> Result<OperationRow, LifecycleError> {
    let id = op.id;
    if op.state == OperationState::Pending && !matches!(transition, Transition::Unchanged) {
        operations::mark_dispatched(txn, &[id]).await?;
    }
    let after = match transition {
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
