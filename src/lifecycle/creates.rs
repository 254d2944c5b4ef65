//! How a group commit ([`super::group`]) records several creates.
//!
//! **At once** ([`at_once`]): each create's checks that take no lock (tenant, zone,
//! catalog, references), then one statement that inserts the resources, operations,
//! outbox rows and audit rows of all of them, outside any transaction block: one round
//! trip for the batch, where a transaction costs six. The statement takes nothing if a
//! check it cannot make applies (a tenant with quota limits, a replayed
//! `Idempotency-Key`); then the batch is recorded in a transaction.
//!
//! **In a transaction** ([`together`]), in order: the advisory locks of the batch's `Idempotency-Key`s (sorted) and one
//! lookup of the operations they name; each create's checks that take no lock (tenant,
//! zone, catalog, references); the quota rows of the batch's tenants (locked in tenant
//! order) and the quota check of each create, in queue order, each seeing the usage of
//! the creates accepted before it; then one insert of the resources, one of the
//! operations (`pending`) with their outbox rows, and one of their audit rows; then
//! the commit. The rows, events and audit entries are
//! exactly those a create alone writes.

use super::dispatch::Target;
use super::quotas::Ledger;
use super::submit::{new_operation, replayed, ReadyCreate};
use super::txn::{Autocommit, Txn};
use super::{dispatch, Engine, LifecycleError};
use crate::domain::quota::Amounts;
use crate::domain::Action;
use crate::store;
use crate::store::creates::Creates;
use crate::store::operations::{self, NewOperation, OperationRow};
use crate::store::resources::{self, NewResource, ResourceRow};
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

/// Records `creates` in one statement, outside any transaction block. `Ok(None)` when
/// the statement took none of them (a tenant of the batch has quota limits, or a key
/// was replayed): [`together`] is to record them. `Err` when it failed: every create is
/// then recorded alone, or, if the database is unavailable, answered `503` (a statement
/// whose connection was lost past [`once`]'s retries may still have committed; a retry
/// with the same `Idempotency-Key` finds it).
pub(super) async fn at_once(
    engine: &Engine,
    creates: &[&ReadyCreate],
) -> sqlx::Result<Option<Vec<Outcome>>> {
    let mut out: Vec<Option<Outcome>> = creates.iter().map(|_| None).collect();
    keyed_once(creates, &mut out);
    let (mut txn, admitted) = admit_on_a_live_connection(engine, creates, &mut out).await?;
    // A batch its checks refused entirely wrote nothing: nothing to announce.
    if !admitted.is_empty() {
        if !insert_at_once(&mut txn, creates, &admitted, &mut out).await? {
            return Ok(None);
        }
        txn.committed().await;
    }
    Ok(Some(
        out.into_iter()
            .map(|o| o.expect("every create has an outcome"))
            .collect(),
    ))
}

/// The statement of [`at_once`] for the admitted creates; answers them. `false` when it
/// took none of them.
async fn insert_at_once(
    txn: &mut Autocommit<'_>,
    creates: &[&ReadyCreate],
    admitted: &[(usize, Amounts)],
    out: &mut [Option<Outcome>],
) -> sqlx::Result<bool> {
    let engine = txn.engine();
    let resources: Vec<NewResource> = admitted
        .iter()
        .map(|(i, footprint)| creates[*i].resource(engine.ids.make(), *footprint))
        .collect();
    let targets: Vec<Target> = resources.iter().map(Target::from).collect();
    let input = serde_json::json!({});
    let ops: Vec<NewOperation> = admitted
        .iter()
        .zip(&targets)
        .map(|((i, _), target)| {
            let origin = creates[*i].origin();
            new_operation(engine, origin, *target, Action::create(), &input, true)
        })
        .collect();
    let messages = dispatch::first_messages(engine, &ops, &targets)?;
    for (i, _) in admitted {
        txn.audit(creates[*i].audit());
    }
    let audit = txn.audit_rows();
    let batch = Creates {
        resources: &resources,
        operations: &ops,
        messages: &messages,
        audit: &audit,
    };
    let ids: Vec<Uuid> = ops.iter().map(|o| o.id).collect();
    let rows = once(engine, txn, &batch, &ids).await?;
    if rows.is_empty() {
        return Ok(false);
    }
    txn.dispatching();
    for ((i, _), id) in admitted.iter().zip(&ids) {
        // The statement inserted all of them or none.
        let op = rows.iter().find(|o| o.id == *id).cloned();
        txn.created(op.as_ref().expect("the statement inserted every operation"));
        out[*i] = op.map(|op| Outcome::Answer(Ok(op)));
    }
    Ok(true)
}

/// Runs the statement of `batch` (operations `ids`).
///
/// When the connection is lost under it (the database ended it, a network cut, a
/// pooled connection that had died), the statement may have committed, may still be
/// running on the database, or may never have started. It is run again on another
/// connection with the same IDs, which settles all three: a first run that committed,
/// or commits while the second waits on the unique indexes for it, makes the second
/// fail on them, and the operations are then found by ID; a first run that did not
/// commit leaves the second to insert; one that starts later fails on the rows the
/// second inserted. Only within [`store::ENDED_RETRY_WINDOW`]: past it, the error
/// stands (`503`).
async fn once(
    engine: &Engine,
    conn: &mut sqlx::PgConnection,
    batch: &Creates<'_, '_>,
    ids: &[Uuid],
) -> sqlx::Result<Vec<OperationRow>> {
    let mut result = store::creates::insert_unchecked(conn, batch).await;
    let started = std::time::Instant::now();
    while matches!(&result, Err(e) if store::is_ended_connection(e))
        && started.elapsed() < store::ENDED_RETRY_WINDOW
    {
        tracing::debug!("a group commit lost its connection; running it again on another");
        let mut conn = engine.pool.acquire().await?;
        result = store::creates::insert_unchecked(&mut conn, batch).await;
        if matches!(&result, Err(e) if store::is_unique_violation(e)) {
            let found = operations::get_many(&mut *conn, ids).await?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
    }
    result
}

/// [`admit_all`] on a pooled connection outside a transaction block, the one the
/// batch's statement is to use; again on another while the database had ended the one
/// taken (a pooled connection used within the last second is handed out unchecked), for
/// at most [`store::ENDED_RETRY_WINDOW`]. The checks only read, so making them again
/// changes nothing; a create they refused stays refused.
async fn admit_on_a_live_connection<'e>(
    engine: &'e Engine,
    creates: &[&ReadyCreate],
    out: &mut [Option<Outcome>],
) -> sqlx::Result<(Autocommit<'e>, Vec<(usize, Amounts)>)> {
    let started = std::time::Instant::now();
    loop {
        let mut txn = Autocommit::acquire(engine).await?;
        match admit_all(engine, &mut txn, creates, out).await {
            Err(e)
                if store::is_ended_connection(&e)
                    && started.elapsed() < store::ENDED_RETRY_WINDOW =>
            {
                tracing::debug!(error = %e, "a group commit's checks met an ended connection; again on another");
            }
            admitted => return admitted.map(|admitted| (txn, admitted)),
        }
    }
}

/// Each create's checks that take no lock, on `conn`, for those not answered yet:
/// answers the refused ones and returns the others with what each consumes.
async fn admit_all(
    engine: &Engine,
    conn: &mut sqlx::PgConnection,
    creates: &[&ReadyCreate],
    out: &mut [Option<Outcome>],
) -> sqlx::Result<Vec<(usize, Amounts)>> {
    let mut admitted = Vec::with_capacity(creates.len());
    for (i, c) in creates.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        match c.admit(engine, conn).await {
            Ok(footprint) => admitted.push((i, footprint)),
            Err(LifecycleError::Database(e)) => return Err(e),
            Err(refused) => out[i] = Some(Outcome::Answer(Err(refused))),
        }
    }
    Ok(admitted)
}

/// Marks each create whose `Idempotency-Key` an earlier create of the batch carries
/// already (same principal) to be recorded alone, after the batch: it will find the
/// first one's operation. Returns the indexes of the first creates of each key.
fn keyed_once(creates: &[&ReadyCreate], out: &mut [Option<Outcome>]) -> Vec<usize> {
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
    keyed
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
    let admitted = admit_all(engine, &mut tx, creates, &mut out).await?;
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
    let keyed = keyed_once(creates, out);
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
            resource.into(),
            Action::create(),
            &input,
            true,
        ));
        on.push(resource.into());
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
