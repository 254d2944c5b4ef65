//! Dead letters: operations whose message JetStream gave up on.
//!
//! The server publishes an advisory when a message of the operations stream reaches the
//! consumer's `max_deliver` (`MAX_DELIVERIES`) and when a worker terminates one
//! (`MSG_TERMINATED`). Advisories are core-NATS messages: one sent while no gateway
//! listens would be lost. So `gateway migrate` creates a work-queue stream that keeps
//! them (`{OPS_STREAM}-ADVISORIES`, see `nats/streams.json`), and every `gateway serve`
//! pulls from its one durable consumer: each advisory is handled by one replica, and
//! again by another if that one dies before acknowledging it.
//!
//! For each advisory the handler finds the operation — from the message itself (its
//! `Dispatch` body and `Nats-Msg-Id` `{operation}.{n}`), or, when the message is already
//! gone (a terminated message leaves a work queue at once), from the stream sequence the
//! relay recorded — and, if that message is the operation's current dispatch and the
//! operation has not ended, fails it with `delivery_exhausted` (resource row, then
//! operation row, through [`repair::fail_if`], which also starts the next queued
//! operation). Then it deletes the message from the stream, so a dead message neither
//! lingers nor counts against the stream's limits, and acknowledges the advisory.
//! Every step is idempotent: a crash anywhere only means the advisory is handled again.
//!
//! What an advisory cannot catch — a message lost with a NATS server's disk, or an
//! advisory dropped because its stream was full — the reconciler's sweeper does
//! ([`crate::reconciler`]).

use crate::lifecycle::repair::{self, Repair};
use crate::lifecycle::Engine;
use crate::store::operations;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use gateway_proto::Dispatch;
use gateway_proto::OperationError;
use serde::Deserialize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// An advisory younger than this whose operation cannot be found yet is retried: the
/// relay records a message's stream sequence only when its whole batch is acknowledged,
/// and a worker may terminate the message before that.
const UNMATCHED_RETRY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(120);

/// Delay before an advisory is handled again after a failure.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// What the server says in a `MAX_DELIVERIES` or `MSG_TERMINATED` advisory (the fields
/// used here; both kinds have them).
#[derive(Debug, Clone, Deserialize)]
pub struct Advisory {
    /// `io.nats.jetstream.advisory.v1.max_deliver` or `….terminated`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The stream of the message.
    pub stream: String,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// Where the message is (or was) in the stream.
    pub stream_seq: u64,
    /// How many times it was delivered.
    #[serde(default)]
    pub deliveries: u64,
    /// When the server sent the advisory.
    pub timestamp: DateTime<Utc>,
}

impl Advisory {
    fn terminated(&self) -> bool {
        self.kind.ends_with(".terminated")
    }

    /// Why the operation failed, in the operation's error message.
    fn explain(&self) -> String {
        if self.terminated() {
            format!(
                "a worker of {} gave up on the operation's message after {} deliveries without reporting an outcome",
                self.consumer, self.deliveries
            )
        } else {
            format!(
                "JetStream delivered the operation's message {} times to {} without an outcome",
                self.deliveries, self.consumer
            )
        }
    }
}

/// What became of one advisory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The operation was failed with `delivery_exhausted`.
    Failed(Uuid),
    /// The operation had already ended or moved on to a newer dispatch; only the message
    /// was removed.
    AlreadySettled(Uuid),
    /// The advisory is about another stream, an unparsable message, or an operation no
    /// longer known: nothing to do.
    Ignored,
    /// The operation cannot be found yet: handle the advisory again later.
    Retry,
}

/// The dead-letter handler of one gateway process.
pub struct DeadLetters {
    /// Database, names, doorbell and change notifications.
    pub engine: Engine,
    /// JetStream, to read and delete dead messages and to pull advisories.
    pub js: jetstream::Context,
}

impl DeadLetters {
    /// Pulls and handles advisories until `shutdown`; outlives NATS outages and a
    /// missing advisory stream (logged, retried).
    pub async fn run(self, shutdown: CancellationToken) {
        let stream = crate::jetstream::advisory_stream_name(&self.engine.names);
        let durable = match crate::jetstream::Definitions::shipped() {
            Ok(d) => d
                .dead_letter_consumer_config(&self.engine.names)
                .durable_name
                .unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "dead letters: no definitions; not running");
                return;
            }
        };
        let mut failures = 0u32;
        loop {
            let consumer: Result<PullConsumer, _> = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.js.get_consumer_from_stream(&durable, &stream) => c,
            };
            match consumer {
                Ok(consumer) => {
                    failures = 0;
                    if self.pull(&consumer, &shutdown).await {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Log the 1st, 2nd, 4th, 8th … failure: visible, not noisy.
                    if failures.is_power_of_two() {
                        tracing::warn!(stream = %stream, consumer = %durable, error = %e,
                            "dead letters: cannot bind to the advisory consumer (has `gateway migrate` run?); retrying");
                    }
                }
            }
            let pause = Duration::from_millis(250 * u64::from(failures.clamp(1, 20)));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Pulls batches until an error (returns `false`) or `shutdown` (returns `true`).
    async fn pull(&self, consumer: &PullConsumer, shutdown: &CancellationToken) -> bool {
        loop {
            let batch = consumer
                .batch()
                .max_messages(32)
                .expires(Duration::from_secs(5))
                .messages();
            let mut batch = tokio::select! {
                _ = shutdown.cancelled() => return true,
                b = batch => match b {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "dead letters: pull failed");
                        return false;
                    }
                },
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return true,
                    _ = tokio::time::sleep_until(deadline) => None,
                    n = batch.next() => n,
                };
                let msg = match next {
                    None => break,
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "dead letters: pull failed");
                        return false;
                    }
                };
                let ack = match serde_json::from_slice::<Advisory>(&msg.payload) {
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "dead letters: not an advisory; dropping it");
                        AckKind::Ack
                    }
                    Ok(advisory) => match self.handle(&advisory).await {
                        Ok(Handled::Retry) => AckKind::Nak(Some(RETRY_DELAY)),
                        Ok(_) => AckKind::Ack,
                        Err(e) => {
                            tracing::warn!(stream_seq = advisory.stream_seq, error = %e,
                                "dead letters: handling failed; retrying");
                            AckKind::Nak(Some(RETRY_DELAY))
                        }
                    },
                };
                if let Err(e) = msg.ack_with(ack).await {
                    tracing::warn!(error = %e, "dead letters: could not settle an advisory; it comes again");
                }
            }
        }
    }

    /// Handles one advisory. Idempotent.
    pub async fn handle(&self, advisory: &Advisory) -> anyhow::Result<Handled> {
        if advisory.stream != self.engine.names.stream {
            return Ok(Handled::Ignored);
        }
        let ops = self.js.get_stream(&self.engine.names.stream).await?;
        let seq = advisory.stream_seq;
        // The message itself says which operation and which dispatch it carried.
        let target = match ops.get_raw_message(seq).await {
            Ok(message) => {
                let msg_id = message
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_owned());
                match serde_json::from_slice::<Dispatch>(&message.payload) {
                    Ok(dispatch) => {
                        let n = msg_id.as_deref().and_then(|id| {
                            id.strip_prefix(&format!("{}.", dispatch.operation_id))
                                .and_then(|n| n.parse::<i32>().ok())
                        });
                        Some((dispatch.operation_id, n))
                    }
                    Err(e) => {
                        tracing::error!(stream_seq = seq, error = %e,
                            "dead letters: the dead message is not an operation; deleting it");
                        None
                    }
                }
            }
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                // Gone already (a terminated message leaves a work queue at once): the
                // relay recorded which operation's current dispatch sat there.
                let found = operations::by_stream_seq(&self.engine.pool, seq as i64).await?;
                match found.into_iter().next() {
                    Some((id, _, n)) => Some((id, Some(n))),
                    None if Utc::now() - advisory.timestamp < UNMATCHED_RETRY_WINDOW => {
                        return Ok(Handled::Retry)
                    }
                    None => {
                        tracing::warn!(stream_seq = seq, consumer = %advisory.consumer,
                            "dead letters: no operation for a dead message; the reconciler's sweeper will look");
                        return Ok(Handled::Ignored);
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        let handled = match target {
            Some((id, n)) => self.fail(id, n, advisory).await?,
            None => Handled::Ignored,
        };
        match ops.delete_message(seq).await {
            Ok(_) => {}
            // Already gone: terminated, or deleted by an earlier try.
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::DeleteMessageErrorKind::JetStream(_)
                ) =>
            {
                tracing::debug!(stream_seq = seq, error = %e, "dead letters: the dead message is gone already")
            }
            Err(e) => {
                tracing::warn!(stream_seq = seq, error = %e, "dead letters: could not delete the dead message")
            }
        }
        Ok(handled)
    }

    /// Fails operation `id` with `delivery_exhausted` if dispatch `n` is its current one
    /// and it has not ended.
    async fn fail(&self, id: Uuid, n: Option<i32>, advisory: &Advisory) -> anyhow::Result<Handled> {
        let repair = repair::fail_if(
            &self.engine,
            id,
            |op| !op.state.is_terminal() && n.is_none_or(|n| n == op.dispatches),
            |_| OperationError::new("delivery_exhausted", advisory.explain(), true),
        )
        .await?;
        let op = match repair {
            Repair::Missing => return Ok(Handled::Ignored),
            Repair::Skipped(_) => return Ok(Handled::AlreadySettled(id)),
            Repair::Done(op) => op,
        };
        tracing::warn!(operation.id = %id, consumer = %advisory.consumer,
            deliveries = advisory.deliveries, "dead letter: failed the operation");
        let pool = crate::metrics::PoolLabels {
            service: self.engine.service_label(&op.kind).to_string(),
            zone: op.zone.clone(),
        };
        self.engine.metrics.dead_letters.get_or_create(&pool).inc();
        self.engine.metrics.repaired("dead_lettered", 1);
        Ok(Handled::Failed(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_advisory_kinds_parse() {
        let max: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x",
                "timestamp":"2026-11-26T04:22:23.993345155Z","stream":"OPS",
                "consumer":"vm-zone-a","stream_seq":3,"deliveries":5}"#,
        )
        .unwrap();
        assert!(!max.terminated());
        assert_eq!((max.stream_seq, max.deliveries), (3, 5));
        let term: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.terminated","id":"y",
                "timestamp":"2026-11-26T04:22:23.992993283Z","stream":"OPS",
                "consumer":"vm-zone-a","consumer_seq":1,"stream_seq":1,"deliveries":1}"#,
        )
        .unwrap();
        assert!(term.terminated());
    }
}
