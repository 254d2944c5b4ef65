//! The reconciler: repairs what no single request or report could. One is active across
//! all gateway replicas, elected with a PostgreSQL session advisory lock; if its process
//! dies, the lock goes with the connection and another replica takes over on its next
//! try. Each pass:
//!
//! 1. **Deadlines.** Fails active operations past their deadline (`deadline_exceeded`):
//!    the backstop that makes every operation end.
//! 2. **Sweep.** Looks at operations `dispatched` or `running` that have been quiet for
//!    `RECONCILE_REDISPATCH_AFTER_SECONDS` and asks JetStream whether their current
//!    message still exists (at the stream sequence the relay recorded). If it does,
//!    JetStream still owns the operation — waiting for a worker, in a worker's hands
//!    (kept alive by `Progress`, however long it takes), or just dead-lettered — and the
//!    sweeper leaves it. If it does not, no worker can finish the operation: its message
//!    was lost (a NATS server lost its disk, the stream was purged) or terminated without
//!    a report while the dead-letter advisory was missed. The sweeper then dispatches it
//!    again under a new message ID, up to [`MAX_DISPATCHES`] messages in all, and after
//!    that fails it with `delivery_exhausted`. Nothing is re-sent while a message is
//!    alive, so a long outage of a worker pool does not pile up duplicates.
//! 3. **Converge.** Finds live resources whose `generation` is ahead of
//!    `observed_generation` with no active operation and no finished attempt at that
//!    generation (a cancelled update left the new spec unapplied) and enqueues a
//!    system-requested `update` (no `requested_by`). A failed attempt is not retried by
//!    itself: the resource shows `failed` until someone changes or deletes it.
//!
//! The reconciler decides what to repair; [`crate::lifecycle::repair`] makes each
//! repair, locking the resource row, then the operation row, and checking the condition
//! again under the lock.

use crate::domain::OperationState;
use crate::lifecycle::repair::{self, Redispatch, Repair};
use crate::lifecycle::Engine;
use crate::store::{self, operations, operations::QuietOperation};
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use gateway_proto::OperationError;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Advisory-lock key of the single active reconciler ("gwrecon" in ASCII).
const LOCK_KEY: i64 = 0x0067_7772_6563_6f6e;
/// Operations handled per kind of repair and pass.
const BATCH: i64 = 100;
/// Messages an operation gets in all (its first dispatch and the sweeper's) before the
/// sweeper gives up on it with `delivery_exhausted`.
pub const MAX_DISPATCHES: i32 = 3;

/// What one pass repaired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repairs {
    /// Operations failed with `deadline_exceeded`.
    pub expired: usize,
    /// Operations dispatched again because their message was gone.
    pub redispatched: usize,
    /// Operations failed with `delivery_exhausted` after [`MAX_DISPATCHES`] lost messages.
    pub exhausted: usize,
    /// Converging `update` operations enqueued.
    pub converged: usize,
}

/// The reconciler's settings.
pub struct Reconciler {
    /// Database and names.
    pub engine: Engine,
    /// Pause between passes.
    pub interval: Duration,
    /// A dispatched or running operation quiet for this long, whose message JetStream
    /// no longer holds, is dispatched again.
    pub redispatch_after: Duration,
    /// JetStream, to ask whether a quiet operation's message still exists. Without it
    /// (or while NATS is unreachable) only operations whose message was never recorded
    /// are swept.
    pub js: Option<jetstream::Context>,
}

/// Whether an operation's current message is still in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Present,
    Gone,
    Unknown,
}

impl Reconciler {
    /// Runs until `shutdown`: tries to become the active reconciler, then repairs every
    /// `interval` while it holds the lock.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut leader: Option<PoolConnection<Postgres>> = None;
        let mut cursor = None;
        loop {
            if leader.is_none() {
                leader = self.try_lead().await;
            }
            if leader.is_some() {
                match self.pass_from(&mut cursor).await {
                    Ok(r) if r != Repairs::default() => tracing::info!(
                        expired = r.expired,
                        redispatched = r.redispatched,
                        exhausted = r.exhausted,
                        converged = r.converged,
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

    /// One pass of every repair; the sweep starts from the oldest quiet operation.
    pub async fn pass(&self) -> anyhow::Result<Repairs> {
        self.pass_from(&mut None).await
    }

    /// One pass of every repair; the sweep goes on from `cursor` and leaves it where it
    /// stopped (back at the start once it reached the end), so that operations whose
    /// message JetStream still holds cannot keep the sweeper from the others.
    async fn pass_from(
        &self,
        cursor: &mut Option<(DateTime<Utc>, Uuid)>,
    ) -> anyhow::Result<Repairs> {
        let mut repairs = Repairs::default();
        for id in operations::overdue_ids(&self.engine.pool, BATCH).await? {
            repairs.expired += usize::from(self.expire(id).await?);
        }
        self.sweep(&mut repairs, cursor).await?;
        for id in operations::unconverged_resource_ids(&self.engine.pool, BATCH).await? {
            repairs.converged += usize::from(self.converge(id).await?);
        }
        let retention = chrono::Duration::from_std(self.engine.idempotency_retention)
            .unwrap_or(chrono::Duration::days(1));
        let forgotten =
            operations::expire_idempotency_keys(&self.engine.pool, Utc::now() - retention, 1000)
                .await?;
        let metrics = &self.engine.metrics;
        metrics.repaired("expired", repairs.expired);
        metrics.repaired("redispatched", repairs.redispatched);
        metrics.repaired("dead_lettered", repairs.exhausted);
        metrics.repaired("converged", repairs.converged);
        metrics.repaired("idempotency_expired", forgotten as usize);
        Ok(repairs)
    }

    /// Dispatches again (or gives up on) quiet operations whose message is gone.
    async fn sweep(
        &self,
        repairs: &mut Repairs,
        cursor: &mut Option<(DateTime<Utc>, Uuid)>,
    ) -> anyhow::Result<()> {
        let quiet_secs = self.redispatch_after.as_secs_f64();
        let quiet = operations::quiet_active(&self.engine.pool, quiet_secs, *cursor, BATCH).await?;
        *cursor = match quiet.last() {
            Some(last) if quiet.len() as i64 == BATCH => Some((last.updated_at, last.id)),
            _ => None,
        };
        if quiet.is_empty() {
            return Ok(());
        }
        let stream = match &self.js {
            Some(js)
                if js.client().connection_state() == async_nats::connection::State::Connected =>
            {
                js.get_stream(&self.engine.names.stream).await.ok()
            }
            _ => None,
        };
        for q in quiet {
            let presence = match (q.stream_seq, &stream) {
                (Some(seq), Some(stream)) => presence(stream, seq, &q).await,
                (Some(_), None) => Presence::Unknown,
                // Dispatched before sequences were recorded: the message may have been
                // lost, and a second copy costs only a refused report.
                (None, _) if q.state == OperationState::Dispatched => Presence::Gone,
                (None, _) => Presence::Unknown,
            };
            if presence != Presence::Gone {
                continue;
            }
            match repair::redispatch(&self.engine, &q, MAX_DISPATCHES).await? {
                Redispatch::Sent => repairs.redispatched += 1,
                Redispatch::Exhausted => repairs.exhausted += 1,
                Redispatch::Moved => {}
            }
        }
        Ok(())
    }

    /// Fails operation `id` with `deadline_exceeded` if it is still active past its
    /// deadline.
    async fn expire(&self, id: Uuid) -> anyhow::Result<bool> {
        let repair = repair::fail_if(
            &self.engine,
            id,
            |op| !op.state.is_terminal() && op.deadline <= Utc::now(),
            |op| {
                let message = format!(
                    "the operation did not finish by its deadline {}",
                    op.deadline.to_rfc3339()
                );
                OperationError::new("deadline_exceeded", message, true)
            },
        )
        .await?;
        Ok(matches!(repair, Repair::Done(_)))
    }

    /// Enqueues a converging `update` of resource `id` if it still needs one.
    async fn converge(&self, id: Uuid) -> anyhow::Result<bool> {
        Ok(repair::converge(&self.engine, id).await?.is_some())
    }
}

/// Whether the message of `q`'s current dispatch is still at `seq` in `stream`.
async fn presence(stream: &jetstream::stream::Stream, seq: i64, q: &QuietOperation) -> Presence {
    let Ok(seq) = u64::try_from(seq) else {
        return Presence::Unknown;
    };
    match stream.get_raw_message(seq).await {
        Ok(message) => {
            let expected = format!("{}.{}", q.id, q.dispatches);
            match message.headers.get("Nats-Msg-Id") {
                Some(id) if id.as_str() == expected => Presence::Present,
                // Another message sits there: the stream was re-created.
                _ => Presence::Gone,
            }
        }
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Presence::Gone
        }
        Err(e) => {
            tracing::debug!(operation.id = %q.id, error = %e, "cannot tell whether the message exists");
            Presence::Unknown
        }
    }
}
