//! A lifecycle transaction: the database transaction of one state change, and the
//! effects that are due once — and only once — it commits.
//!
//! Every state change opens a [`Txn`], records in it what it changed (operations
//! created, started or ended, operations whose row changed), and
//! ends with [`Txn::commit`], which commits and then runs the one after-commit step:
//! metrics, the relay's doorbell, and the change notification that wakes long-polls on
//! every replica. A change that returns early rolls back with nothing announced.
//!
//! Operations are locked one way only, [`lock_operation`]: the resource row first, then
//! the operation row.
//!
//! A change made for a request also writes the request's audit row in its transaction
//! ([`Txn::audit`]): the row commits with the change, or goes back to the request for
//! the guard to write with the real answer.

use super::Engine;
use crate::audit::{AuditSlot, PendingAudit};
use crate::changes::Bell;
use crate::domain::quota::Dimension;
use crate::domain::{Action, OperationState, Service};
use crate::store::operations::{self, OperationRow};
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Transaction};
use std::ops::{Deref, DerefMut};
use uuid::Uuid;

/// A metric event, counted after commit.
#[derive(Debug)]
enum Counted {
    Created {
        action: Action,
        service: Service,
        zone: String,
    },
    Started {
        action: Action,
        service: Service,
        since: DateTime<Utc>,
    },
    Finished {
        action: Action,
        service: Service,
        zone: String,
        state: OperationState,
        since: DateTime<Utc>,
    },
    QuotaFilled {
        dimension: Dimension,
        ratio: f64,
    },
}

/// What a transaction changed, announced after it commits.
#[derive(Debug, Default)]
struct Effects {
    changed: Vec<Uuid>,
    /// Operations that reached a final state (each also in `changed`).
    ended: Vec<Uuid>,
    counted: Vec<Counted>,
    /// Outbox rows were written.
    dispatching: bool,
}

/// The database transaction of one state change and the effects due after it commits.
/// Dereferences to the connection, for the `store` functions.
///
/// `C` is what holds the connection: a transaction (the default), or a pooled
/// connection outside any transaction block ([`Autocommit`]).
pub struct Txn<'e, C = Transaction<'static, Postgres>> {
    engine: &'e Engine,
    tx: C,
    effects: Effects,
    audits: Vec<PendingAudit>,
}

/// A change that one statement makes, outside any transaction block: the statement is
/// its own transaction, and costs one round trip instead of a `BEGIN`, the statement
/// and a `COMMIT`. Only a change that is exactly one statement may use it; that
/// statement writes the audit rows too ([`Autocommit::audit_rows`]), and
/// [`Autocommit::committed`] runs the after-commit step once it succeeded.
pub type Autocommit<'e> = Txn<'e, PoolConnection<Postgres>>;

/// The audit entry of the request a change is made for, and the status its answer
/// gets if the change commits.
pub type Audit<'a> = Option<(&'a AuditSlot, u16)>;

impl<'e> Txn<'e> {
    /// Opens a transaction on the engine's pool.
    pub async fn begin(engine: &'e Engine) -> sqlx::Result<Self> {
        Ok(Self::on(engine, crate::store::begin(&engine.pool).await?))
    }

    /// Writes the audit row, commits, then announces what changed. Nothing is
    /// announced (and the audit entry goes back to its request) if the commit fails.
    pub async fn commit(self) -> sqlx::Result<()> {
        let Self {
            engine,
            tx,
            effects,
            audits,
        } = self;
        commit_with(tx, audits).await?;
        engine.after_commit(effects).await;
        Ok(())
    }
}

impl<'e> Autocommit<'e> {
    /// Takes a connection of the engine's pool, outside any transaction block.
    pub async fn acquire(engine: &'e Engine) -> sqlx::Result<Self> {
        Ok(Self::on(engine, engine.pool.acquire().await?))
    }

    /// The audit rows the change's one statement is to write.
    pub fn audit_rows(&self) -> Vec<crate::store::audit::AuditRow> {
        crate::audit::rows(self.audits.iter().flat_map(PendingAudit::rows))
    }

    /// The change's statement succeeded (it committed): its audit rows count as
    /// written; announces what changed. Dropped without this, nothing is announced and
    /// the audit entries go back to their requests.
    pub async fn committed(self) {
        for a in self.audits {
            a.committed();
        }
        self.engine.after_commit(self.effects).await;
    }
}

impl<'e, C> Txn<'e, C> {
    fn on(engine: &'e Engine, tx: C) -> Self {
        Self {
            engine,
            tx,
            effects: Effects::default(),
            audits: Vec::new(),
        }
    }

    /// Records the request's audit entry in this transaction, with the status a
    /// committed change answers. A transaction that records the changes of several
    /// requests (a group commit) records each one's entry.
    pub fn audit(&mut self, audit: Audit<'_>) {
        if let Some((slot, status)) = audit {
            self.audits.extend(PendingAudit::take(slot, status));
        }
    }

    /// The tenant the audited request acted on, when its path did not say.
    pub fn audit_tenant(&mut self, tenant: &str) {
        if let Some(a) = self.audits.last_mut() {
            a.tenant(tenant);
        }
    }

    /// Audits one part of the request (a report of a batch) as a row of its own.
    pub fn audit_part(&mut self, part: crate::audit::AuditPart<'_>) {
        if let Some(a) = self.audits.last_mut() {
            a.part(part);
        }
    }

    /// The engine the transaction runs on.
    pub fn engine(&self) -> &'e Engine {
        self.engine
    }

    /// Dispatch messages were written to the outbox: the relay's operations loops are
    /// rung after commit (its events loop is rung after every commit).
    pub fn dispatching(&mut self) {
        self.effects.dispatching = true;
    }

    /// The row of operation or resource `id` changed: after commit, every replica drops
    /// its cached reads of it and wakes the long-polls on it.
    pub fn changed(&mut self, id: Uuid) {
        if !self.effects.changed.contains(&id) {
            self.effects.changed.push(id);
        }
    }

    /// `op` was created. Unless it creates its resource, the resource changed with it
    /// (its spec, or its phase); a new resource has no cached reads to drop.
    pub fn created(&mut self, op: &OperationRow) {
        self.effects.counted.push(Counted::Created {
            action: op.action.clone(),
            service: self.engine.service_label(&op.kind),
            zone: op.zone.clone(),
        });
        if !op.action.is_create() {
            self.changed(op.resource_id);
        }
    }

    /// A worker started `op` for the first time.
    pub fn started(&mut self, op: &OperationRow) {
        self.effects.counted.push(Counted::Started {
            action: op.action.clone(),
            service: self.engine.service_label(&op.kind),
            since: op.created_at,
        });
        self.changed(op.id);
        self.changed(op.resource_id);
    }

    /// `op` ended in `state`.
    pub fn finished(&mut self, op: &OperationRow, state: OperationState) {
        self.effects.counted.push(Counted::Finished {
            action: op.action.clone(),
            service: self.engine.service_label(&op.kind),
            zone: op.zone.clone(),
            state,
            since: op.created_at,
        });
        self.effects.ended.push(op.id);
        self.changed(op.id);
        self.changed(op.resource_id);
    }

    /// A quota limit in `dimension` is `ratio` full once this write commits.
    pub fn quota_filled(&mut self, dimension: Dimension, ratio: f64) {
        self.effects
            .counted
            .push(Counted::QuotaFilled { dimension, ratio });
    }
}

impl<C: Deref<Target = PgConnection>> Deref for Txn<'_, C> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl<C: DerefMut<Target = PgConnection>> DerefMut for Txn<'_, C> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl Engine {
    /// The one after-commit step: metrics, the relay's doorbell, change notifications.
    async fn after_commit(&self, effects: Effects) {
        let age = |since: DateTime<Utc>| (Utc::now() - since).to_std().unwrap_or_default();
        for c in effects.counted {
            match c {
                Counted::Created {
                    action,
                    service,
                    zone,
                } => self.metrics.operation_created(&action, &service, &zone),
                Counted::Started {
                    action,
                    service,
                    since,
                } => self
                    .metrics
                    .operation_started(&action, &service, age(since)),
                Counted::Finished {
                    action,
                    service,
                    zone,
                    state,
                    since,
                } => self
                    .metrics
                    .operation_finished(&action, &service, &zone, state, age(since)),
                Counted::QuotaFilled { dimension, ratio } => {
                    self.metrics.quota_filled(dimension, ratio)
                }
            }
        }
        // Every state change records events (by trigger): the relay's events loop is
        // rung after every commit; its operations loops only when there is something
        // to dispatch (a report, most commits, writes no outbox row).
        let bells: &[Bell] = if effects.dispatching {
            &[Bell::Dispatches, Bell::Events]
        } else {
            &[Bell::Events]
        };
        self.wake.signal(bells).await;
        if !effects.changed.is_empty() {
            self.changes.publish(&effects.changed, &effects.ended).await;
        }
    }
}

/// An operation locked for a change, with its resource.
pub struct LockedOperation<'e> {
    /// The transaction holding both locks (the resource's, taken first, and the
    /// operation's).
    pub txn: Txn<'e>,
    /// The operation, as it is under the lock.
    pub op: OperationRow,
}

/// Opens a transaction and locks operation `id` the one way every change does: its
/// resource row first, then the operation row. Keeping one order is what keeps
/// submissions, reports, cancellations and repairs free of deadlocks. `None` when there
/// is no such operation.
pub async fn lock_operation(
    engine: &Engine,
    id: Uuid,
) -> sqlx::Result<Option<LockedOperation<'_>>> {
    let mut txn = Txn::begin(engine).await?;
    // One statement locks the resource (an operation's never changes), then the
    // operation; the caller reads the resource if it needs it (most do not: a report, a
    // cancellation).
    let Some(op) = operations::lock_with_resource(&mut txn, id).await? else {
        return Ok(None);
    };
    Ok(Some(LockedOperation { txn, op }))
}

/// Commits a transaction of a write that needs no after-commit step, with the request's
/// audit row: the row commits with the change, or goes back to the request.
pub(super) async fn commit_audited(
    tx: Transaction<'static, Postgres>,
    audit: Audit<'_>,
) -> sqlx::Result<()> {
    let pending = audit.and_then(|(slot, status)| PendingAudit::take(slot, status));
    commit_with(tx, pending.into_iter().collect()).await
}

/// Writes the audit rows in `tx` (in one statement), then commits; the entries count as
/// written only once the commit succeeded (else each goes back to its request).
async fn commit_with(
    mut tx: Transaction<'static, Postgres>,
    audits: Vec<PendingAudit>,
) -> sqlx::Result<()> {
    let rows: Vec<_> = audits.iter().flat_map(PendingAudit::rows).collect();
    if !rows.is_empty() {
        crate::audit::append_batch(&mut tx, rows).await?;
    }
    tx.commit().await?;
    for a in audits {
        a.committed();
    }
    Ok(())
}
