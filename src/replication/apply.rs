//! Applies the peers' changes as they arrive on `REPLICATION-IN`.
//!
//! One relay applies at a time (a session advisory lock held while it runs), in stream
//! order, one batch per transaction: the peers' heartbeats must be applied after the
//! changes sent before them, or a tombstone could be dropped while an older change is
//! still to come. The database keeps how far it got (`replication_clock.applied_seq`,
//! written in the batch's transaction), and each session reads the stream from there
//! with an ephemeral consumer of its own: an applier that crashes mid-batch leaves
//! nothing acknowledged but unapplied, nothing waits out an ack timeout, and the next
//! one (in this process or another relay) goes on in order from the last commit.
//! Applying is idempotent anyway. Malformed messages are logged and skipped.

use crate::domain::region::{Change, HEARTBEAT};
use crate::metrics::{Metrics, PeerResultLabels};
use crate::store::replication::{self, Applied};
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use futures::{FutureExt, StreamExt};
use sqlx::{Acquire, PgConnection, PgPool};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Messages applied per transaction at most.
const BATCH: usize = 256;

/// The applying side of replication.
pub struct Applier {
    /// The region's database.
    pub pool: PgPool,
    /// The region's JetStream.
    pub js: jetstream::Context,
    /// Counters.
    pub metrics: Metrics,
}

impl Applier {
    /// Applies until `shutdown`; waits while another relay holds the applier's lock.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let pause = match self.session(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "replication: applier stopped; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Takes the lock, then applies batches until `shutdown` (`Ok`) or a failure.
    async fn session(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // A connection of its own, closed when the session ends however it ends: the
        // lock is the connection's, and one handed back to the pool kept it, so no
        // session could take it again until the process restarted.
        let mut conn = self.pool.acquire().await?.detach();
        while !replication::try_lock_applier(&mut conn).await? {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let mut stream = self.js.get_stream(super::INBOUND_STREAM).await?;
        let info = stream.info().await?;
        let (last, created) = (
            info.state.last_sequence,
            info.created.unix_timestamp_nanos() as i64,
        );
        let (mut applied, recorded) = replication::applied_seq(&mut conn).await?;
        // A stream made anew (its NATS store lost) is read from its start again
        // (applying is idempotent): `applied` counts in the old one, and sourcing may
        // already have filled the new one past it. Before the creation time was
        // recorded, only a position past the end told.
        let made_anew = recorded.map_or(applied > last, |r| r != created);
        if made_anew {
            tracing::info!(
                applied,
                "replication: REPLICATION-IN was made anew; reading it from the start"
            );
            applied = 0;
        }
        let consumer = stream
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: applied + 1,
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await?;
        // A continuous pull: messages arrive as the stream gets them; each batch is what
        // has arrived (up to `BATCH`) when the first of it is there.
        let mut incoming = consumer.messages().await?;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = incoming.next() => next,
            };
            let first = first.ok_or_else(|| anyhow::anyhow!("replication: the stream ended"))?;
            let mut messages = vec![first.map_err(|e| anyhow::anyhow!("replication: {e}"))?];
            while messages.len() < BATCH {
                match incoming.next().now_or_never() {
                    Some(Some(m)) => {
                        messages.push(m.map_err(|e| anyhow::anyhow!("replication: {e}"))?)
                    }
                    _ => break,
                }
            }
            self.apply_batch(&mut conn, &messages, created).await?;
        }
    }

    /// Applies `messages` (of the stream made at `created`) in one transaction, then
    /// retries parked changes if any landed.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        messages: &[jetstream::Message],
        created: i64,
    ) -> anyhow::Result<()> {
        let mut tx = conn.begin().await?;
        let mut counts: Vec<(String, Applied)> = Vec::with_capacity(messages.len());
        let mut newest: BTreeMap<String, i64> = BTreeMap::new();
        let mut rows_applied = false;
        for m in messages {
            let change: Change = match serde_json::from_slice(&m.payload) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(subject = %m.subject, error = %e, "replication: malformed change dropped");
                    continue;
                }
            };
            let applied = replication::apply(&mut tx, &change).await?;
            rows_applied |= applied == Applied::Applied && change.table != HEARTBEAT;
            let seen = newest.entry(change.origin.clone()).or_default();
            *seen = (*seen).max(change.hlc);
            counts.push((change.origin, applied));
        }
        for (peer, hlc) in &newest {
            replication::record_applied(&mut tx, peer, *hlc).await?;
        }
        // Parked changes wait for a row: only a batch that brought rows can free them.
        if rows_applied {
            replication::retry_parked(&mut tx).await?;
        }
        if let Some(seq) = messages
            .last()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream_sequence)
        {
            replication::set_applied_seq(&mut tx, seq, created).await?;
        }
        tx.commit().await?;
        for (peer, applied) in counts {
            self.metrics
                .replication_changes
                .get_or_create(&PeerResultLabels {
                    peer,
                    result: applied.as_str().into(),
                })
                .inc();
        }
        Ok(())
    }
}
