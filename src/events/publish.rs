//! The relay's events pass: publishes waiting event rows to the events stream, in id
//! order, and deletes those JetStream acknowledged — in one short transaction.
//!
//! One relay at a time publishes events (a transaction-scoped advisory lock; the others
//! skip the pass), and a pass publishes its batch in order on one connection, so each
//! resource's events are stored in the order their changes committed. A crash between
//! publish and delete leaves the rows for the next pass; their `Nats-Msg-Id` (the event
//! ID) makes JetStream drop the second copy within the stream's duplicate window, so a
//! watcher never sees an event twice.

use super::cloud_events;
use crate::store::events;
use async_nats::jetstream;
use async_nats::HeaderMap;
use std::time::Duration;

/// What one events pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventsPass {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published (or found malformed and dropped) and deleted.
    pub published: usize,
}

/// Where and how the events pass publishes.
pub struct EventPublisher<'a> {
    /// The events outbox's database.
    pub pool: &'a sqlx::PgPool,
    /// The broker.
    pub js: &'a jetstream::Context,
    /// `{prefix}.{tenant}.{kind}.{zone}`.
    pub prefix: &'a str,
    /// Rows per pass.
    pub batch_size: i64,
    /// Longest wait for a pass's acks.
    pub timeout: Duration,
    /// Counts what was published.
    pub metrics: &'a crate::metrics::Metrics,
}

impl EventPublisher<'_> {
    /// Claims, publishes and deletes one batch of events (nothing when another relay
    /// holds the publisher lock).
    pub async fn pass(&self) -> anyhow::Result<EventsPass> {
        // As the operations pass: claim nothing while the broker is away, rather than
        // hold the publisher lock and a transaction while publishes wait in a buffer.
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            anyhow::bail!("NATS is not connected; the events wait in the database");
        }
        let mut tx = crate::store::begin(self.pool).await?;
        let rows = events::claim(&mut tx, self.batch_size).await?;
        if rows.is_empty() {
            return Ok(EventsPass::default());
        }
        let mut done = Vec::with_capacity(rows.len());
        // Each row's events, in order; a malformed row is dropped (and deleted).
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            match cloud_events(row, self.prefix) {
                Ok(of_row) => {
                    let last = of_row.len() - 1;
                    let of_row = of_row.into_iter().enumerate();
                    events.extend(of_row.map(|(i, event)| (row, event, i == last)));
                }
                Err(e) => {
                    tracing::error!(event = %row.event_id, error = %e, "relay: malformed event dropped");
                    self.metrics.events_malformed.inc();
                    done.push(row.id);
                }
            }
        }
        let mut acks = Vec::with_capacity(events.len());
        for (row, (subject, event), last) in events {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
            let body = serde_json::to_vec(&event).expect("JSON serializes");
            // Sent in order; the acks are awaited together below.
            match self
                .js
                .publish_with_headers(subject, headers, body.into())
                .await
            {
                Ok(ack) => acks.push(Sent { row, ack, last }),
                Err(e) => {
                    tracing::warn!(error = %e, "relay: event publish failed");
                    break;
                }
            }
        }
        self.collect(acks, &mut done).await;
        events::delete(&mut tx, &done).await?;
        tx.commit().await?;
        Ok(EventsPass {
            claimed: rows.len(),
            published: done.len(),
        })
    }

    /// Awaits the acks in order, stopping at the first failure (the rest stay for the
    /// next pass, which re-publishes them: duplicates are dropped by their ID). A row is
    /// done once the last of its events is acknowledged.
    async fn collect(&self, acks: Vec<Sent<'_>>, done: &mut Vec<i64>) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        for Sent { row, ack, last } in acks {
            match tokio::time::timeout_at(deadline, std::future::IntoFuture::into_future(ack)).await
            {
                Ok(Ok(_)) => {
                    let lag = (chrono::Utc::now() - row.created_at)
                        .to_std()
                        .unwrap_or_default();
                    self.metrics.events_published.inc();
                    self.metrics.events_lag.observe(lag.as_secs_f64());
                    if last {
                        done.push(row.id);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(event = %row.event_id, error = %e, "relay: event not acknowledged");
                    break;
                }
                Err(_) => {
                    tracing::warn!("relay: event acks timed out; retrying them later");
                    break;
                }
            }
        }
    }
}

/// An event published, its ack awaited.
struct Sent<'a> {
    /// The row it comes from.
    row: &'a events::EventRow,
    /// JetStream's ack.
    ack: jetstream::context::PublishAckFuture,
    /// Whether it is the row's last event (the row is done once it is acknowledged).
    last: bool,
}
