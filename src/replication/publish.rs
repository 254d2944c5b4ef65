//! Publishes this region's changes, in clock order, to its replication stream.
//!
//! One relay publishes at a time (a transaction-scoped advisory lock): the log's order is
//! the clock's, and the peers rely on it (a heartbeat that says "applied up to X" must
//! not overtake the changes made before it). A change whose publish is acknowledged is
//! deleted from the log in the same transaction that claimed it; a crash in between
//! publishes it again, which the stream deduplicates by `Nats-Msg-Id` (and applying it
//! twice would change nothing anyway).

use crate::domain::region::Change;
use crate::store::replication::{self, LogRow};
use async_nats::jetstream;
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Changes published per pass.
const BATCH: i64 = 256;
/// How long to wait for the acknowledgements of one pass.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The publishing side of replication.
pub struct Publisher {
    /// The region's database.
    pub pool: PgPool,
    /// The region's JetStream.
    pub js: jetstream::Context,
    /// How often to log a heartbeat.
    pub heartbeat: Duration,
    /// How often to look for changes.
    pub poll: Duration,
    /// Gauges.
    pub metrics: crate::metrics::Metrics,
}

impl Publisher {
    /// Publishes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_beat: Option<Instant> = None;
        loop {
            if last_beat.is_none_or(|t| t.elapsed() >= self.heartbeat) {
                match replication::heartbeat(&self.pool).await {
                    Ok(()) => last_beat = Some(Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "replication: heartbeat not logged"),
                }
            }
            let pause = match self.pass().await {
                Ok(n) if n as i64 == BATCH => Duration::ZERO,
                Ok(_) => self.poll,
                Err(e) => {
                    tracing::warn!(error = %e, "replication: publish pass failed; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Publishes one batch; returns how many changes it published.
    pub async fn pass(&self) -> anyhow::Result<usize> {
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            anyhow::bail!("NATS is not connected; the log keeps the changes");
        }
        let mut tx = crate::store::begin(&self.pool).await?;
        let Some(rows) = replication::claim(&mut tx, BATCH).await? else {
            return Ok(0);
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let mut acks = Vec::with_capacity(rows.len());
        for row in &rows {
            // In order, on one connection: the stream stores them in log order.
            acks.push(std::future::IntoFuture::into_future(self.send(row).await?));
        }
        tokio::time::timeout(ACK_TIMEOUT, futures::future::try_join_all(acks))
            .await
            .map_err(|_| anyhow::anyhow!("replication: acknowledgements timed out"))??;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        replication::delete(&mut tx, &seqs).await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn send(&self, row: &LogRow) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let msg_id = format!("{}-{}", row.origin, row.seq);
        let change = Change::from(row.clone());
        let subject = super::subject(&change.origin, &change.table, &change.row_token());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let body = serde_json::to_vec(&change)?;
        Ok(self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await?)
    }
}
