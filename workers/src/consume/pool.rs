//! The JetStream side of the consume loop: [`run_pool`] binds the pool's durable pull
//! consumer, pulls as many messages as there are free slots, reads each into a
//! `Delivery` and hands it to the `Handler` in a task of its own while sending
//! `Progress`, settles it as the handler decided (ack / nak / term), and on shutdown
//! drains what is in flight.
//!
//! It has no unit tests: it is exercised against a real NATS in
//! `workers/tests/nats_loop.rs`.

use super::handler::{Delivery, Handler, SignatureHeaders, Timing};
use super::{seeded, Disposition};
use crate::batch::BatchReporter;
use crate::config::PoolConfig;
use crate::drivers::Driver;
use crate::metrics::{MessageOutcome, WorkerMetrics};
use crate::peers::Peers;
use crate::report::{GatewayClient, Reporter, TraceHeaders};
use async_nats::jetstream::consumer::pull::{Batch, BatchError};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use backon::{ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use gateway_proto::signing;
use gateway_proto::{consumer_name, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

/// How often a worker tells JetStream it is still working on a message (`+WPI`): well
/// under the consumer's AckWait of 30 s, so a message being worked on is never
/// redelivered to another worker.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How long a shutting-down pool waits for in-flight messages before handing the rest
/// back to JetStream (`-NAK`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How long after its expiry a pull request counts as lost.
const PULL_GRACE: Duration = Duration::from_secs(1);

/// How long to wait for the hand-backs after the grace period, and for the final flush.
const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs one pool until `shutdown` is cancelled; returns after in-flight messages finished
/// or were handed back.
///
/// Binds to the durable pull consumer [`consumer_name`]`(service, zone)` on `cfg.stream`
/// (created by `gateway migrate`; while it is missing the pool logs a warning and keeps
/// trying), and processes up to `cfg.concurrency` messages at once. NATS outages are
/// logged and outlived, never returned. Errors only for an invalid `cfg`.
///
/// Its metrics are kept but registered nowhere; see [`run_pool_with_metrics`].
pub async fn run_pool<D: Driver>(
    js: jetstream::Context,
    cfg: PoolConfig,
    driver: D,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_pool_with_metrics(js, cfg, driver, WorkerMetrics::default(), shutdown).await
}

/// [`run_pool`], counting into `metrics` (usually registered with
/// [`WorkerMetrics::register`]) under the labels `service` and `zone` of `cfg`. Several
/// pools may share one `WorkerMetrics`.
pub async fn run_pool_with_metrics<D: Driver>(
    js: jetstream::Context,
    cfg: PoolConfig,
    driver: D,
    metrics: WorkerMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let reporter = BatchReporter::new(
        GatewayClient::new(&cfg.gateway_url, &cfg.gateway_key)?,
        cfg.report_batch,
    );
    let handler = Arc::new(Handler {
        driver,
        reporter,
        service: cfg.service.clone(),
        zone: cfg.zone.clone(),
        max_deliver: AtomicI64::new(cfg.max_deliver),
        trust: cfg.dispatch_keys.clone(),
        timing: Timing::default(),
        metrics: metrics.pool(&cfg.service, &cfg.zone),
    });
    let span = info_span!("pool", service = %cfg.service, zone = %cfg.zone);
    let pool = Pool {
        js,
        consumer: consumer_name(&cfg.service, &cfg.zone),
        slots: Arc::new(Semaphore::new(cfg.concurrency)),
        cfg,
        handler,
        hard_stop: CancellationToken::new(),
        tasks: JoinSet::new(),
    };
    pool.run(shutdown).instrument(span).await;
    Ok(())
}

/// The JetStream side of one pool.
struct Pool<D, R> {
    js: jetstream::Context,
    cfg: PoolConfig,
    /// The durable consumer's name.
    consumer: String,
    handler: Arc<Handler<D, R>>,
    /// One permit per message that may be in flight.
    slots: Arc<Semaphore>,
    /// Cancelled when the grace period is over: unfinished messages are handed back.
    hard_stop: CancellationToken,
    /// The messages in flight.
    tasks: JoinSet<()>,
}

impl<D: Driver, R: Reporter + Peers> Pool<D, R> {
    /// Pulls until `shutdown`, drains, then flushes the last acks.
    async fn run(mut self, shutdown: CancellationToken) {
        tracing::debug!(
            stream = %self.cfg.stream,
            consumer = %self.consumer,
            concurrency = self.cfg.concurrency,
            "pool started"
        );
        self.pull(&shutdown).await;
        self.drain().await;
        // Acks and naks are buffered by the client: make sure they leave before we do.
        match tokio::time::timeout(HAND_BACK_TIMEOUT, self.js.client().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not flush the last acks; JetStream will redeliver those messages")
            }
            Err(_) => tracing::warn!(
                "timed out flushing the last acks; JetStream will redeliver those messages"
            ),
        }
        tracing::debug!("pool stopped");
    }

    /// Pulls and dispatches messages until `shutdown`; outlives NATS outages and a
    /// missing stream or consumer.
    async fn pull(&mut self, shutdown: &CancellationToken) {
        let mut backoff = reconnect_backoff();
        loop {
            let Some(consumer) = self.bind(shutdown, &mut backoff).await else {
                return;
            };
            match self.pull_from(&consumer, shutdown, &mut backoff).await {
                Pulled::Shutdown => return,
                Pulled::Failed => {
                    if !pause(shutdown, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Binds to the durable consumer, retrying until it exists and NATS answers; `None`
    /// if `shutdown` came first.
    async fn bind(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut ExponentialBackoff,
    ) -> Option<PullConsumer> {
        loop {
            let bound = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                c = self.js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    &self.consumer,
                    &self.cfg.stream,
                ) => c,
            };
            match bound {
                Ok(consumer) => {
                    tracing::debug!(consumer = %self.consumer, "bound to the consumer");
                    self.adopt_max_deliver(&consumer);
                    return Some(consumer);
                }
                Err(e) => {
                    tracing::warn!(
                        stream = %self.cfg.stream,
                        consumer = %self.consumer,
                        error = %e,
                        "cannot bind to the consumer (has `gateway migrate` run? is NATS up?); retrying"
                    );
                    if !pause(shutdown, backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Takes `max_deliver` from the consumer itself, so the handler knows which
    /// delivery is the last without a second setting that must match. A pool configured
    /// with none (`max_deliver` ≤ 0) never judges a delivery last: JetStream's dead
    /// letters end what it cannot finish.
    fn adopt_max_deliver(&self, consumer: &PullConsumer) {
        if self.cfg.max_deliver <= 0 {
            return;
        }
        let server_max = consumer.cached_info().config.max_deliver;
        let before = self.handler.max_deliver.swap(server_max, Ordering::Relaxed);
        if before != server_max {
            tracing::info!(consumer = %self.consumer, max_deliver = server_max,
                "using the consumer's max_deliver");
        }
    }

    /// Pulls from a bound consumer as slots free up, until `shutdown` or a failure.
    ///
    /// Busy: take what is there now, as slots free up (`fetch` answers at once). Idle
    /// (the last fetch found nothing): wait, server-side, for the next message, then go
    /// back to fetching. A long pull for many messages would hold every free slot until
    /// it filled or expired.
    async fn pull_from(
        &mut self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
        backoff: &mut ExponentialBackoff,
    ) -> Pulled {
        let mut idle = false;
        loop {
            self.reap();
            // Pull only as many messages as can start now: a message waiting in a
            // local buffer would see its AckWait run out without any Progress.
            let Some(slots) = self.free_slots(shutdown).await else {
                return Pulled::Shutdown;
            };
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Pulled::Shutdown,
                b = request(consumer, idle, slots.len()) => b,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "pull request failed; binding again");
                    return Pulled::Failed;
                }
            };
            idle = match self.take(batch, slots, shutdown, backoff).await {
                Taken::Ended { nothing_came } => nothing_came,
                Taken::Stopped(pulled) => return pulled,
            };
        }
    }

    /// Starts a task for each message of `batch`, one slot each, until the batch ends.
    async fn take(
        &mut self,
        mut batch: Batch,
        mut slots: Vec<OwnedSemaphorePermit>,
        shutdown: &CancellationToken,
        backoff: &mut ExponentialBackoff,
    ) -> Taken {
        // The server ends a pull at its expiry; if it has not by this time, the request
        // was lost (NATS restarted) and waiting longer only adds latency.
        let lost_after = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
        let wanted = slots.len();
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Taken::Stopped(Pulled::Shutdown),
                n = batch.next() => n,
                _ = tokio::time::sleep_until(lost_after) => None,
            };
            match next {
                None => {
                    *backoff = reconnect_backoff();
                    // Nothing came: wait for work next time.
                    let nothing_came = slots.len() == wanted;
                    return Taken::Ended { nothing_came };
                }
                Some(Ok(msg)) => {
                    *backoff = reconnect_backoff();
                    match slots.pop() {
                        Some(slot) => self.spawn(msg, slot),
                        // The batch asks for `slots.len()` messages; should the server
                        // send more, hand the extra back at once.
                        None => {
                            self.handler.metrics.message(MessageOutcome::HandedBack);
                            settle(&msg, Disposition::Nak(None)).await;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pulling messages failed; binding again");
                    return Taken::Stopped(Pulled::Failed);
                }
            }
        }
    }

    /// Waits for at least one free slot and takes every free one.
    async fn free_slots(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            p = self.slots.clone().acquire_owned() => p.ok()?,
        };
        let mut slots = vec![first];
        while let Ok(slot) = self.slots.clone().try_acquire_owned() {
            slots.push(slot);
        }
        Some(slots)
    }

    /// Works on `msg` in a task of its own, holding `slot` until it is settled.
    fn spawn(&mut self, msg: jetstream::Message, slot: OwnedSemaphorePermit) {
        let handler = self.handler.clone();
        let hard_stop = self.hard_stop.clone();
        let in_flight = handler.metrics.in_flight();
        self.tasks.spawn(async move {
            work_on(&handler, msg, &hard_stop).await;
            drop(slot);
            drop(in_flight);
        });
    }

    /// Collects finished message tasks.
    fn reap(&mut self) {
        while let Some(result) = self.tasks.try_join_next() {
            log_join(result);
        }
    }

    /// Waits up to [`SHUTDOWN_GRACE`] for in-flight messages, then hands the rest back.
    async fn drain(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        tracing::info!(
            in_flight = self.tasks.len(),
            "shutting down: waiting for in-flight messages"
        );
        if self.join_within(SHUTDOWN_GRACE).await {
            return;
        }
        tracing::warn!(
            unfinished = self.tasks.len(),
            "grace period over: handing unfinished messages back to JetStream"
        );
        self.hard_stop.cancel();
        if !self.join_within(HAND_BACK_TIMEOUT).await {
            // JetStream redelivers them after AckWait.
            self.tasks.abort_all();
        }
    }

    /// Waits up to `limit` for every message task to finish; `false` if some did not.
    async fn join_within(&mut self, limit: Duration) -> bool {
        let tasks = &mut self.tasks;
        let joined = tokio::time::timeout(limit, async {
            while let Some(result) = tasks.join_next().await {
                log_join(result);
            }
        })
        .await;
        joined.is_ok()
    }
}

/// Why pulling from a bound consumer stopped.
enum Pulled {
    /// `shutdown` was cancelled.
    Shutdown,
    /// The pull request or its messages failed: bind again, after a pause.
    Failed,
}

/// How taking the messages of one batch ended.
enum Taken {
    /// The batch ended (or its request was lost); `nothing_came` if it brought no
    /// message, so the next pull waits for one.
    Ended { nothing_came: bool },
    /// Pulling from this consumer must stop.
    Stopped(Pulled),
}

/// One pull request for up to `slots` messages: answered at once, or, when the pool is
/// `idle`, waiting on the server up to [`PULL_EXPIRES`] for one message.
async fn request(consumer: &PullConsumer, idle: bool, slots: usize) -> Result<Batch, BatchError> {
    if idle {
        consumer
            .batch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages()
            .await
    } else {
        consumer.fetch().max_messages(slots).messages().await
    }
}

/// Logs a message task that panicked.
fn log_join(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            tracing::error!(error = %e, "a message task panicked; JetStream will deliver the message again");
        }
    }
}

/// Backoff between attempts to bind or pull: 250 ms doubling to 2.5 s, each wait
/// stretched by up to 100 % jitter (so at most 5 s), without end.
fn reconnect_backoff() -> ExponentialBackoff {
    use backon::BackoffBuilder;
    seeded(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_millis(2500))
            .with_jitter()
            .without_max_times(),
    )
    .build()
}

/// Sleeps for the next backoff delay; `false` if `shutdown` came first.
async fn pause(shutdown: &CancellationToken, backoff: &mut impl Iterator<Item = Duration>) -> bool {
    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Handles one message to the end: works on it while telling JetStream it is alive, then
/// settles it. On hard stop, hands it back.
async fn work_on<D: Driver, R: Reporter + Peers>(
    handler: &Handler<D, R>,
    msg: jetstream::Message,
    hard_stop: &CancellationToken,
) {
    let delivery = Delivery::of(&msg);
    let span = handler.span(&delivery);
    async {
        let work = handler.handle(&delivery);
        tokio::pin!(work);
        let period = handler.timing.progress_interval;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let disposition = loop {
            tokio::select! {
                biased;
                _ = hard_stop.cancelled() => {
                    tracing::warn!("shutting down before the operation finished: handing the message back");
                    handler.metrics.message(MessageOutcome::HandedBack);
                    break Disposition::Nak(None);
                }
                d = &mut work => break d,
                _ = progress.tick() => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "could not tell JetStream the work is in progress");
                    }
                }
            }
        };
        settle(&msg, disposition).await;
    }
    .instrument(span)
    .await
}

/// Tells JetStream what became of a message.
async fn settle(msg: &jetstream::Message, disposition: Disposition) {
    let result = match disposition {
        Disposition::Ack => msg.ack().await,
        Disposition::Term => msg.ack_with(AckKind::Term).await,
        Disposition::Nak(delay) => msg.ack_with(AckKind::Nak(delay)).await,
    };
    if let Err(e) = result {
        tracing::warn!(
            error = %e,
            ?disposition,
            "could not settle the message; JetStream will deliver it again"
        );
    }
}

/// Reading a delivery out of a JetStream message.
impl Delivery {
    /// What the handler needs of `msg`.
    fn of(msg: &jetstream::Message) -> Self {
        let header = |name: &str| {
            msg.message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Self {
            subject: msg.message.subject.to_string(),
            signature: SignatureHeaders {
                msg_id: header(signing::MSG_ID_HEADER),
                key: header(signing::KEY_HEADER),
                signature: header(signing::SIGNATURE_HEADER),
            },
            payload: msg.message.payload.clone(),
            delivered: msg.info().ok().map(|info| info.delivered),
            trace: TraceHeaders {
                request_id: header(REQUEST_ID_HEADER),
                traceparent: header(TRACEPARENT_HEADER),
            },
        }
    }
}
