//! Publishes this region's changes, in clock order, to its replication stream.
//!
//! One relay publishes at a time (a transaction-scoped advisory lock): the log's order is
//! the clock's, and the peers rely on it (a heartbeat that says "applied up to X" must
//! not overtake the changes made before it). A change whose publish is acknowledged is
//! deleted from the log in the same transaction that claimed it; a crash in between
//! publishes it again, which the stream deduplicates by `Nats-Msg-Id` (and applying it
//! twice would change nothing anyway).
//!
//! The stream can be lost with the NATS store under it (a disk replaced): made anew, it
//! numbers its messages from 1 again, and the peers' sourcing, which asks for the
//! sequence after the last one it had, would skip the region's next changes. Before it
//! publishes (at start, and after a pass that failed), the publisher compares the
//! stream with what the database recorded of it ([`Publisher::check_stream`]): a stream
//! made since has the region's own rows logged again, and its first sequence moved past
//! the highest one ever acknowledged.

use crate::config::RegionSettings;
use crate::domain::region::Change;
use crate::store::replication::{self, LogRow};
use anyhow::Context as _;
use async_nats::jetstream;
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Changes published per pass.
const BATCH: i64 = 256;
/// How long to wait for the acknowledgements of one pass.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How far past the highest recorded sequence a stream made anew starts. Publishes the
/// database did not record are those of passes that failed after their
/// acknowledgements, at most [`BATCH`] each and sent again under the same message IDs
/// (deduplicated for two minutes): a gap this wide is more than any run of such
/// failures leaves, and costs nothing (sequences are 64 bits).
const SEQUENCE_GAP: u64 = 1 << 20;

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
    /// This region (its streams are made again from it if they are lost).
    pub region: RegionSettings,
    /// The streams' replicas.
    pub replicas: Option<usize>,
}

impl Publisher {
    /// Publishes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_beat: Option<Instant> = None;
        let mut stream_checked = false;
        loop {
            if !stream_checked {
                match self.check_stream().await {
                    Ok(done) => stream_checked = done,
                    Err(e) => {
                        tracing::warn!(error = %e, "replication: outbound stream not checked; retrying")
                    }
                }
                if !stream_checked {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            }
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
                    stream_checked = false;
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
        let acks = tokio::time::timeout(ACK_TIMEOUT, futures::future::try_join_all(acks))
            .await
            .map_err(|_| anyhow::anyhow!("replication: acknowledgements timed out"))??;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        replication::delete(&mut tx, &seqs).await?;
        if let Some(highest) = acks.iter().map(|a| a.sequence).max() {
            replication::record_published(&mut tx, highest).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Makes the region's streams if they are missing and mends an outbound stream made
    /// since the database last saw it (see the module's comment). Returns `false` when
    /// another relay is publishing (it checks for itself; this one looks again later).
    pub async fn check_stream(&self) -> anyhow::Result<bool> {
        super::ensure_streams(&self.js, &self.region, self.replicas).await?;
        let mut tx = crate::store::begin(&self.pool).await?;
        // Under the publisher's lock: no other relay publishes between the look and the
        // commit, so none of its messages can fall below a moved first sequence.
        let Some((published, recorded)) = replication::outbound_mark(&mut tx).await? else {
            return Ok(false);
        };
        let mut stream = self
            .js
            .get_stream(super::outbound_stream(&self.region.name))
            .await?;
        let info = stream.info().await?.clone();
        let created = info.created.unix_timestamp_nanos() as i64;
        if recorded == Some(created) {
            return Ok(true);
        }
        // A stream made since (or, first time, not recorded yet) with fewer sequences
        // than were acknowledged: lost with its store.
        let behind = info.state.last_sequence < published;
        if behind {
            let first = published + SEQUENCE_GAP;
            tracing::warn!(
                stream = %info.config.name,
                last_acknowledged = published,
                first_sequence = first,
                "replication: the outbound stream was made anew (its NATS store lost?); \
                 moving its first sequence past the old one and sending this region's rows again"
            );
            stream.purge().sequence(first).await.with_context(|| {
                format!(
                    "moving {} to sequence {first} (its NATS user needs \
                     $JS.API.STREAM.PURGE.{0}, as `gateway nats-config` grants)",
                    info.config.name
                )
            })?;
        }
        if behind || recorded.is_some() {
            // The rows the old stream held are logged again whether or not it was behind:
            // a stream made anew holds none of them. (After a crash between the purge and
            // the commit, the purged stream is no longer behind, but still new.)
            let n = replication::relog(&mut tx).await?;
            tracing::info!(
                rows = n,
                "replication: this region's rows logged again for the new outbound stream"
            );
        }
        replication::set_outbound_created(&mut tx, created).await?;
        tx.commit().await?;
        Ok(true)
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
