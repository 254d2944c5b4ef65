//! The transaction of a group commit ([`super::group`]): several creates recorded with
//! one statement per table.
//!
//! In order: the advisory locks of the batch's `Idempotency-Key`s (sorted) and one
//! lookup of the operations they name; each create's checks that take no lock (tenant,
//! zone, catalog, references); the quota rows of the batch's tenants (locked in tenant
//! order) and the quota check of each create, in queue order, each seeing the usage of
//! the creates accepted before it; then one insert of the resources, one of the
//! operations (`pending`) with their outbox rows, and one of their audit rows; then
//! the commit. The rows, events and audit entries are
//! exactly those a create alone writes.

use super::quotas::Ledger;
use super::submit::{new_operation, replayed, ReadyCreate};
use super::txn::Txn;
use super::{dispatch, Engine, LifecycleError};
use crate::domain::quota::Amounts;
use crate::domain::Action;
use crate::store::operations::{self, OperationRow};
use crate::store::resources::{self, ResourceRow};
use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

/// What becomes of one create of a batch. Short-lived, one per create of a batch, so
/// the answer is kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
pub(super) enum Outcome {
    /// Its answer.
    Answer(Result<OperationRow, LifecycleError>),
    /// To be recorded alone after the batch (its `Idempotency-Key` came twice in it).
    Alone,
}

/// Records `creates` in one transaction. `Err` when the transaction failed: then nothing
/// of it was written and every create is to be recorded alone.
pub(super) async fn together(
    engine: &Engine,
    creates: &[&ReadyCreate],
) -> sqlx::Result<Vec<Outcome>> {
    let mut out: Vec<Option<Outcome>> = creates.iter().map(|_| None).collect();
    let mut tx = Txn::begin(engine).await?;
    replays(&mut tx, creates, &mut out).await?;
    let mut admitted = Vec::with_capacity(creates.len());
    for (i, c) in creates.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        match c.admit(&mut tx).await {
            Ok(footprint) => admitted.push((i, footprint)),
            Err(LifecycleError::Database(e)) => return Err(e),
            Err(refused) => out[i] = Some(Outcome::Answer(Err(refused))),
        }
    }
    let accepted = within_quotas(&mut tx, creates, admitted, &mut out).await?;
    if !accepted.is_empty() {
        record(&mut tx, creates, &accepted, &mut out).await?;
    }
    tx.commit().await?;
    Ok(out
        .into_iter()
        .map(|o| o.expect("every create has an outcome"))
        .collect())
}

/// Locks the batch's idempotency keys and answers the creates whose key names an
/// operation already (that operation, or a refusal if the key came with another
/// request). A key that comes twice in the batch sends all but its first create to be
/// recorded alone, after the batch: they will find the first one's operation.
async fn replays(
    tx: &mut Txn<'_>,
    creates: &[&ReadyCreate],
    out: &mut [Option<Outcome>],
) -> sqlx::Result<()> {
    let mut seen = HashSet::new();
    let mut keyed = Vec::new();
    for (i, c) in creates.iter().enumerate() {
        let Some(idem) = c.idempotency() else {
            continue;
        };
        if seen.insert((c.principal, idem.key)) {
            keyed.push(i);
        } else {
            out[i] = Some(Outcome::Alone);
        }
    }
    if keyed.is_empty() {
        return Ok(());
    }
    let key = |i: usize| {
        (
            creates[i].principal,
            creates[i].idempotency().expect("keyed").key,
        )
    };
    let mut locks: Vec<i64> = keyed
        .iter()
        .map(|&i| super::submit::idempotency_lock(key(i).0, key(i).1))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    crate::store::advisory_xact_locks(tx, &locks).await?;
    let pairs: Vec<(Uuid, &str)> = keyed.iter().map(|&i| key(i)).collect();
    let found = operations::find_by_idempotency_keys(tx, &pairs).await?;
    for i in keyed {
        let (principal, k) = key(i);
        let op = found
            .iter()
            .find(|o| o.requested_by == Some(principal) && o.idempotency_key.as_deref() == Some(k));
        let idem = creates[i].idempotency().expect("keyed");
        match replayed(op.cloned(), idem) {
            Ok(None) => {}
            Ok(Some(op)) => out[i] = Some(Outcome::Answer(Ok(op))),
            Err(refused) => out[i] = Some(Outcome::Answer(Err(refused))),
        }
    }
    Ok(())
}

/// Checks the admitted creates against their tenants' quotas, in order; returns those
/// that fit, and answers the others.
async fn within_quotas(
    tx: &mut Txn<'_>,
    creates: &[&ReadyCreate],
    admitted: Vec<(usize, Amounts)>,
    out: &mut [Option<Outcome>],
) -> sqlx::Result<Vec<(usize, Amounts)>> {
    let mut tenants: Vec<&str> = admitted
        .iter()
        .map(|(i, _)| creates[*i].tenant.as_str())
        .collect();
    tenants.sort_unstable();
    tenants.dedup();
    let mut ledgers: BTreeMap<String, Ledger> = Ledger::lock(tx, &tenants).await?;
    if ledgers.is_empty() {
        return Ok(admitted);
    }
    let mut accepted = Vec::with_capacity(admitted.len());
    for (i, footprint) in admitted {
        let c = creates[i];
        let Some(ledger) = ledgers.get_mut(&c.tenant) else {
            accepted.push((i, footprint));
            continue;
        };
        match ledger.admit(tx, c.rt.kind(), &c.zone, &footprint).await {
            Ok(()) => accepted.push((i, footprint)),
            Err(LifecycleError::Database(e)) => return Err(e),
            Err(refused) => out[i] = Some(Outcome::Answer(Err(refused))),
        }
    }
    Ok(accepted)
}

/// Inserts the accepted creates' resources, operations, outbox rows and audit rows.
async fn record(
    tx: &mut Txn<'_>,
    creates: &[&ReadyCreate],
    accepted: &[(usize, Amounts)],
    out: &mut [Option<Outcome>],
) -> sqlx::Result<()> {
    let engine = tx.engine();
    let ids: Vec<Uuid> = accepted.iter().map(|_| engine.ids.make()).collect();
    let rows: Vec<_> = accepted
        .iter()
        .zip(&ids)
        .map(|((i, footprint), id)| creates[*i].resource(*id, *footprint))
        .collect();
    let inserted = resources::insert_many(tx, &rows).await?;
    let resource_of = |id: &Uuid| -> sqlx::Result<&ResourceRow> {
        inserted
            .iter()
            .find(|r| r.id == *id)
            .ok_or(sqlx::Error::RowNotFound)
    };
    let input = serde_json::json!({});
    let mut new_ops = Vec::with_capacity(accepted.len());
    let mut on = Vec::with_capacity(accepted.len());
    for ((i, _), id) in accepted.iter().zip(&ids) {
        let resource = resource_of(id)?;
        let origin = creates[*i].origin();
        new_ops.push(new_operation(
            engine,
            origin,
            resource,
            Action::create(),
            &input,
            true,
        ));
        on.push(resource);
    }
    let ops = dispatch::insert_dispatched(tx, &new_ops, &on).await?;
    for op in &ops {
        tx.created(op);
    }
    for ((i, _), id) in accepted.iter().zip(&ids) {
        let op = ops
            .iter()
            .find(|o| o.resource_id == *id)
            .ok_or(sqlx::Error::RowNotFound)?;
        out[*i] = Some(Outcome::Answer(Ok(op.clone())));
        tx.audit(creates[*i].audit());
    }
    Ok(())
}
