//! Repairs that the reconciler and the dead-letter handler decide on: failing an
//! operation that cannot end by itself, dispatching again one whose message is gone,
//! and enqueueing the update that converges a resource on its spec.
//!
//! The callers decide *what* to repair from what they observed without locks; each
//! function here locks in the one order ([`lock_operation`]), checks under the lock
//! that the repair is still due, and makes the change in one [`Txn`].

use super::finish;
use super::submit::{start_operation, Origin};
use super::txn::{lock_operation, Txn};
use super::{dispatch, Engine};
use crate::domain::Action;
use crate::store::operations::{self, OperationRow, QuietOperation};
use crate::store::resources;
use gateway_proto::OperationError;
use serde_json::json;
use uuid::Uuid;

/// What became of a repair of one operation.
#[derive(Debug, Clone)]
pub enum Repair {
    /// The repair was made; the operation as it is now.
    Done(OperationRow),
    /// Under the lock the repair was no longer due (the operation moved on or ended);
    /// the operation as it is.
    Skipped(OperationRow),
    /// There is no such operation.
    Missing,
}

/// Fails operation `id` with the error `why` gives, if `due` still holds for it once
/// it is locked. Starts the next queued operation on its resource.
pub async fn fail_if(
    engine: &Engine,
    id: Uuid,
    due: impl FnOnce(&OperationRow) -> bool,
    why: impl FnOnce(&OperationRow) -> OperationError,
) -> sqlx::Result<Repair> {
    let Some(locked) = lock_operation(engine, id).await? else {
        return Ok(Repair::Missing);
    };
    let (mut txn, op) = (locked.txn, locked.op);
    if !due(&op) {
        return Ok(Repair::Skipped(op));
    }
    let error = why(&op);
    let failed = finish::fail(&mut txn, &op, error).await?;
    txn.commit().await?;
    Ok(Repair::Done(failed))
}

/// What became of a quiet operation whose message is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redispatch {
    /// A new message was written to the outbox.
    Sent,
    /// It had had `max_dispatches` messages already: it failed with `delivery_exhausted`.
    Exhausted,
    /// It changed since the sweeper looked (or is gone): nothing was done.
    Moved,
}

/// Dispatches `q` again under a new message ID if it did not change since the sweeper
/// looked; after `max_dispatches` messages in all, fails it with `delivery_exhausted`.
pub async fn redispatch(
    engine: &Engine,
    q: &QuietOperation,
    max_dispatches: i32,
) -> sqlx::Result<Redispatch> {
    let Some(locked) = lock_operation(engine, q.id).await? else {
        return Ok(Redispatch::Moved);
    };
    let (mut txn, op) = (locked.txn, locked.op);
    if op.state != q.state || op.updated_at != q.updated_at {
        return Ok(Redispatch::Moved);
    }
    let outcome = if op.dispatches >= max_dispatches {
        tracing::warn!(operation.id = %op.id, dispatches = op.dispatches,
            "the operation's message is gone again; giving up");
        let message = format!(
            "the operation's message was lost or given up on {} times without an outcome",
            op.dispatches
        );
        let error = OperationError::new("delivery_exhausted", message, true);
        finish::fail(&mut txn, &op, error).await?;
        Redispatch::Exhausted
    } else {
        tracing::warn!(operation.id = %op.id, state = %op.state,
            "the operation's message is gone and no outcome came; dispatching it again");
        operations::forget_delivery(&mut txn, op.id).await?;
        // Locked already (by `lock_operation`): this reads it.
        let resource = resources::lock(&mut txn, op.resource_id).await?;
        dispatch::enqueue(&mut txn, &op, &resource).await?;
        txn.changed(op.id);
        Redispatch::Sent
    };
    txn.commit().await?;
    Ok(outcome)
}

/// Enqueues a system-requested `update` (no `requested_by`, request ID
/// `reconciler-converge-…`) of resource `id` if, under its lock, it still needs one;
/// returns the new operation.
pub async fn converge(engine: &Engine, id: Uuid) -> sqlx::Result<Option<OperationRow>> {
    let mut txn = Txn::begin(engine).await?;
    let resource = resources::lock(&mut txn, id).await?;
    if !operations::needs_converge(&mut txn, id).await? {
        return Ok(None);
    }
    let request_id = format!("reconciler-converge-{}", Uuid::now_v7());
    let origin = Origin {
        requested_by: None,
        request_id: &request_id,
        traceparent: None,
        idempotency: None,
    };
    let op = start_operation(
        &mut txn,
        origin,
        &resource,
        Action::update(),
        &json!({}),
        true,
    )
    .await?;
    txn.changed(op.id);
    txn.commit().await?;
    tracing::info!(resource.id = %id, operation.id = %op.id, generation = resource.generation,
        observed_generation = resource.observed_generation,
        "the resource's spec is ahead of what was applied; converging");
    Ok(Some(op))
}
