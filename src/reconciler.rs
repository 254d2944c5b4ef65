//! The reconciler: fails operations past their deadline and re-dispatches operations
//! whose message was lost. One is active across all gateway replicas, elected with a
//! PostgreSQL session advisory lock; if its process dies, the lock goes with the
//! connection and another replica takes over on its next try.

use crate::domain::OperationState;
use crate::lifecycle::finish::{self, Outcome};
use crate::lifecycle::{dispatch, Engine};
use crate::store::{self, operations, resources};
use serde_json::json;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Advisory-lock key of the single active reconciler ("gwrecon" in ASCII).
const LOCK_KEY: i64 = 0x0067_7772_6563_6f6e;
/// Operations handled per kind of repair and pass.
const BATCH: i64 = 100;

/// What one pass repaired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repairs {
    /// Operations failed with `deadline_exceeded`.
    pub expired: usize,
    /// Operations dispatched again.
    pub redispatched: usize,
}

/// The reconciler's settings.
pub struct Reconciler {
    /// Database and names.
    pub engine: Engine,
    /// Pause between passes.
    pub interval: Duration,
    /// A dispatched operation silent for this long is dispatched again.
    pub redispatch_after: Duration,
}

impl Reconciler {
    /// Runs until `shutdown`: tries to become the active reconciler, then repairs every
    /// `interval` while it holds the lock.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut leader: Option<PoolConnection<Postgres>> = None;
        loop {
            if leader.is_none() {
                leader = self.try_lead().await;
            }
            if leader.is_some() {
                match self.pass().await {
                    Ok(r) if r != Repairs::default() => tracing::info!(
                        expired = r.expired,
                        redispatched = r.redispatched,
                        "reconciler repaired operations"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciler pass failed; giving up the lead");
                        leader = None;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn try_lead(&self) -> Option<PoolConnection<Postgres>> {
        let mut conn = self.engine.pool.acquire().await.ok()?;
        let got = store::try_advisory_lock(&mut conn, LOCK_KEY).await.ok()?;
        if got {
            tracing::info!("this process is the active reconciler");
            // Never return a connection that holds the lock to the pool.
            Some(conn)
        } else {
            None
        }
    }

    /// One pass of every repair.
    pub async fn pass(&self) -> anyhow::Result<Repairs> {
        let mut repairs = Repairs::default();
        for id in operations::overdue_ids(&self.engine.pool, BATCH).await? {
            repairs.expired += usize::from(self.expire(id).await?);
        }
        let stale = self.redispatch_after.as_secs_f64();
        for id in operations::stale_dispatched_ids(&self.engine.pool, stale, BATCH).await? {
            repairs.redispatched += usize::from(self.redispatch(id).await?);
        }
        Ok(repairs)
    }

    async fn expire(&self, id: Uuid) -> anyhow::Result<bool> {
        let mut tx = self.engine.pool.begin().await?;
        let Some(op) = operations::get(&mut *tx, id).await? else {
            return Ok(false);
        };
        resources::lock(&mut tx, op.resource_id).await?;
        let op = operations::lock(&mut tx, id)
            .await?
            .expect("operations are never deleted");
        if op.state.is_terminal() || op.deadline > chrono::Utc::now() {
            return Ok(false);
        }
        let error = json!({
            "code": "deadline_exceeded",
            "message": format!("the operation did not finish by its deadline {}", op.deadline.to_rfc3339()),
            "retryable": true,
        });
        let outcome = Outcome {
            state: OperationState::Failed,
            attempt: op.attempt,
            status: None,
            error: Some(error),
        };
        let (_, promoted) = finish::finish(&mut tx, &self.engine.names, &op, outcome).await?;
        tx.commit().await?;
        if promoted.is_some() {
            self.engine.wake.signal().await;
        }
        let changed: Vec<Uuid> = [Some(id), promoted].into_iter().flatten().collect();
        self.engine.changes.publish(&changed).await;
        Ok(true)
    }

    async fn redispatch(&self, id: Uuid) -> anyhow::Result<bool> {
        let mut tx = self.engine.pool.begin().await?;
        let Some(op) = operations::get(&mut *tx, id).await? else {
            return Ok(false);
        };
        let resource = resources::lock(&mut tx, op.resource_id).await?;
        let op = operations::lock(&mut tx, id)
            .await?
            .expect("operations are never deleted");
        if op.state != OperationState::Dispatched {
            return Ok(false);
        }
        tracing::warn!(operation.id = %op.id, "no report since dispatch; dispatching again");
        dispatch::enqueue(&mut tx, &self.engine.names, &op, &resource).await?;
        tx.commit().await?;
        self.engine.wake.signal().await;
        self.engine.changes.publish(&[id]).await;
        Ok(true)
    }
}
