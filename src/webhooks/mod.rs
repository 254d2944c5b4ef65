//! The webhook dispatcher: fans each event out into deliveries, and sends them.
//!
//! Two loops, in every dispatcher process (`gateway webhooks`, and `up`):
//!
//! - **fan-out**: pulls the events stream through the durable consumer `webhooks`,
//!   shared by all dispatchers, and creates each event's deliveries (one per endpoint
//!   of its tenant that wants its type, a disabled one's waiting until it is enabled
//!   again; at most once per endpoint and event)
//!   in one transaction per batch; only then acknowledges the batch, so an event is
//!   fanned out at least once and delivered per endpoint once per fan-out.
//! - **delivery**: leases due deliveries of enabled endpoints (at most
//!   `WEBHOOK_PER_ENDPOINT` of an endpoint and `WEBHOOK_PER_TENANT` of a tenant in flight
//!   across dispatchers), sends each signed as Standard Webhooks says, and
//!   records the attempt, scheduling the next by `WEBHOOK_RETRY_SCHEDULE` with jitter.
//!   A lease outlives the request's timeout; if a dispatcher dies mid-send, the lease
//!   expires and another sends again (at least once: receivers dedupe by `webhook-id`).
//!
//! And a third, **retention**: deliveries over (delivered, or failed with the schedule
//! spent) or waiting for a disabled endpoint, untouched for `WEBHOOK_RETENTION_SECONDS`
//! (since they ended, or since their last attempt), are deleted with their attempts, so
//! the delivery log does not grow without end (every dispatcher runs it; the deletes
//! are idempotent).

pub mod target;

use crate::config::{NatsNames, WebhookSettings};
use crate::domain::{sealing, webhook};
use crate::lifecycle::webhooks::{self as lifecycle, Outcome};
use crate::lifecycle::Engine;
use crate::store::webhooks::{Attempt, Leased};
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use gateway_proto::events::CloudEvent;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Events fanned out per transaction.
const FAN_OUT_BATCH: usize = 256;
/// How long a pull for events waits when there are none.
const PULL_WAIT: Duration = Duration::from_secs(1);
/// How often due deliveries are looked for without a wake-up (retries come due).
const POLL: Duration = Duration::from_millis(250);
/// Deliveries deleted per statement by the retention loop.
const EXPIRE_BATCH: i64 = 1000;
/// The longest pause between two passes of the retention loop (a tenth of the
/// retention when that is shorter).
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// A webhook dispatcher.
#[derive(Clone)]
pub struct Dispatcher {
    engine: Engine,
    js: jetstream::Context,
    names: NatsNames,
    settings: Arc<WebhookSettings>,
    client: reqwest::Client,
    wake: Arc<Notify>,
}

impl Dispatcher {
    /// A dispatcher reading events through `js`.
    pub fn new(
        engine: Engine,
        js: jetstream::Context,
        names: NatsNames,
        settings: WebhookSettings,
    ) -> Self {
        let client = target::client(settings.policy, settings.timeout);
        Self {
            engine,
            js,
            names,
            settings: Arc::new(settings),
            client,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Runs the three loops until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::join!(
            self.fan_out(shutdown.clone()),
            self.forget(shutdown.clone()),
            self.deliver(shutdown)
        );
    }

    /// The retention loop: a pass at start and then every [`EXPIRE_EVERY`] (or a tenth
    /// of the retention), each deleting in batches until nothing old is left.
    async fn forget(&self, shutdown: CancellationToken) {
        let retention = self.settings.retention;
        let every = EXPIRE_EVERY
            .min(retention / 10)
            .max(Duration::from_millis(100));
        loop {
            let before = chrono::Duration::from_std(retention)
                .ok()
                .and_then(|r| chrono::Utc::now().checked_sub_signed(r));
            if let Some(before) = before {
                self.forget_before(before, &shutdown).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Deletes what is untouched since `before`, a batch at a time, until a batch comes
    /// short (or fails, or `shutdown`).
    async fn forget_before(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        shutdown: &CancellationToken,
    ) {
        loop {
            match lifecycle::expire(&self.engine, before, EXPIRE_BATCH).await {
                Ok(n) => {
                    self.engine.metrics.webhook_expired.inc_by(n);
                    if n < EXPIRE_BATCH as u64 || shutdown.is_cancelled() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhooks: old deliveries not deleted; retrying");
                    return;
                }
            }
        }
    }

    async fn consumer(&self) -> anyhow::Result<PullConsumer> {
        let stream = self
            .js
            .get_stream_no_info(self.names.events_stream())
            .await?;
        stream
            .get_consumer(crate::jetstream::WEBHOOK_CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("the webhook consumer: {e}"))
    }

    /// The fan-out loop: batch after batch; after a failure (NATS or PostgreSQL away) it
    /// binds the consumer again after a pause that grows with failures in a row.
    async fn fan_out(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        let mut consumer = None;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.fan_out_once(&mut consumer) => r,
            };
            let Err(e) = result else {
                failures = 0;
                continue;
            };
            failures += 1;
            consumer = None;
            tracing::warn!(error = %e, "webhooks: fan-out failed; retrying");
            let pause = Duration::from_millis(200 * u64::from(failures.min(25)));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One batch, through the consumer (bound first if need be).
    async fn fan_out_once(&self, consumer: &mut Option<PullConsumer>) -> anyhow::Result<()> {
        if consumer.is_none() {
            *consumer = Some(self.consumer().await?);
        }
        self.fan_out_batch(consumer.as_ref().expect("bound above"))
            .await
    }

    /// Fans out one batch of events and acknowledges it once the deliveries committed.
    async fn fan_out_batch(&self, consumer: &PullConsumer) -> anyhow::Result<()> {
        let mut batch = consumer
            .batch()
            .max_messages(FAN_OUT_BATCH)
            .expires(PULL_WAIT)
            .messages()
            .await?;
        let mut messages = Vec::new();
        while let Some(m) = batch.next().await {
            messages.push(m.map_err(|e| anyhow::anyhow!(e))?);
        }
        if messages.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(messages.len());
        for m in &messages {
            match serde_json::from_slice::<CloudEvent>(&m.payload) {
                Ok(mut e) => {
                    e.cursor = m.info().ok().map(|i| i.stream_sequence.to_string());
                    let body = serde_json::to_value(&e).expect("an event serializes");
                    events.push((e, body));
                }
                Err(e) => tracing::warn!(error = %e, "webhooks: a message that is not an event"),
            }
        }
        let fan: Vec<lifecycle::FanOut<'_>> = events
            .iter()
            .map(|(e, body)| (e.tenant.as_str(), e.id, e.event_type, body, e.time))
            .collect();
        let created = lifecycle::fan_out(&self.engine, &fan).await?;
        for m in &messages {
            m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
        }
        self.engine.metrics.webhook_events.inc_by(created);
        if created > 0 {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The delivery loop.
    async fn deliver(&self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits() as i64;
            let leased = if free == 0 {
                Vec::new()
            } else {
                self.lease(free).await
            };
            let busy = !leased.is_empty();
            for d in leased {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let this = self.clone();
                tasks.spawn(async move {
                    this.attempt(d).await;
                    drop(permit);
                });
            }
            if busy && slots.available_permits() > 0 {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        // In-flight sends finish (or time out) before the process stops.
        while tasks.join_next().await.is_some() {}
    }

    async fn lease(&self, n: i64) -> Vec<Leased> {
        let lease = self.settings.timeout * 2 + Duration::from_secs(5);
        let mut conn = match self.engine.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhooks: cannot lease deliveries");
                return Vec::new();
            }
        };
        let caps = crate::store::webhooks::LeaseCaps {
            per_endpoint: self.settings.per_endpoint,
            per_tenant: self.settings.per_tenant,
        };
        crate::store::webhooks::lease(&mut conn, n.min(100), caps, lease)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "webhooks: cannot lease deliveries");
                Vec::new()
            })
    }

    /// The delivery's signing secrets, opened. `None` (logged) when one does not open:
    /// the operator's key is missing or wrong, which is not the endpoint's failure, so
    /// nothing is recorded and the delivery is tried again once its lease expires.
    fn secrets(&self, d: &Leased) -> Option<Vec<String>> {
        let keys = self.settings.secret_keys.as_ref();
        std::iter::once(&d.secret)
            .chain(d.previous_secret.as_ref())
            .map(|s| sealing::open(keys, d.webhook_id, s))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|e| {
                tracing::error!(webhook = %d.webhook_id, error = %e, "webhooks: cannot sign");
            })
            .ok()
    }

    /// Sends one delivery and records what came of it.
    async fn attempt(&self, d: Leased) {
        let body = serde_json::to_vec(&d.event).expect("JSON serializes");
        let msg_id = d.event_id.to_string();
        let ts = chrono::Utc::now().timestamp();
        let Some(secrets) = self.secrets(&d) else {
            return;
        };
        let signatures: Vec<String> = secrets
            .iter()
            .filter_map(|s| webhook::sign(s, &msg_id, ts, &body))
            .collect();
        let headers = vec![
            ("webhook-id", msg_id),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signatures.join(" ")),
            ("content-type", "application/json".to_owned()),
        ];
        let sent = target::send(&self.client, &d.url, headers, body, self.settings.policy).await;
        let attempt = Attempt {
            status_code: sent.status.map(i32::from),
            latency_ms: i32::try_from(sent.latency.as_millis()).unwrap_or(i32::MAX),
            response: sent.response.clone(),
            error: sent.error.clone(),
        };
        let s = &self.settings;
        match lifecycle::record(
            &self.engine,
            &d,
            &attempt,
            sent.ok(),
            &s.schedule,
            s.disable_after,
        )
        .await
        {
            Ok((outcome, disabled)) => {
                let name = match outcome {
                    Outcome::Delivered => "delivered",
                    Outcome::Retrying(_) => "retrying",
                    Outcome::Failed => "failed",
                };
                self.engine.metrics.webhook_attempt(name, sent.latency);
                if disabled {
                    self.engine.metrics.webhook_disabled.inc();
                    tracing::warn!(webhook = %d.webhook_id, "webhooks: endpoint disabled after failing");
                }
            }
            // The lease expires and another attempt follows: at least once.
            Err(e) => {
                tracing::warn!(delivery = %d.id, error = %e, "webhooks: attempt not recorded")
            }
        }
    }
}
