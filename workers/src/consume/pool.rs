//! The JetStream side of the consume loop: [`run_pool`] binds the pool's durable pull
//! consumer, pulls as many messages as there are free slots, hands each to the
//! `Handler` in a task of its own while sending `Progress`, settles it as the handler
//! decided (ack / nak / term), and on shutdown drains what is in flight.
//!
//! It has no unit tests: it is exercised against a real NATS in
//! `workers/tests/nats_loop.rs`.

use super::handler::{Delivery, Handler, Timing};
use super::{seeded, Disposition};
use crate::config::PoolConfig;
use crate::drivers::Driver;
use crate::metrics::{MessageOutcome, WorkerMetrics};
use crate::peers::Peers;
use crate::report::{GatewayClient, Reporter, TraceHeaders};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use backon::ExponentialBuilder;
use futures::StreamExt;
use gateway_proto::{consumer_name, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
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
    let reporter = GatewayClient::new(&cfg.gateway_url, &cfg.gateway_key)?;
    let handler = Arc::new(Handler {
        driver,
        reporter,
        service: cfg.service,
        zone: cfg.zone.clone(),
        max_deliver: cfg.max_deliver,
        timing: Timing::default(),
        metrics: metrics.pool(cfg.service, &cfg.zone),
    });
    let span = info_span!("pool", service = %cfg.service, zone = %cfg.zone);
    let pool = Pool {
        js,
        consumer: consumer_name(cfg.service, &cfg.zone),
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
        'bind: loop {
            let bound = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                c = self.js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    &self.consumer,
                    &self.cfg.stream,
                ) => c,
            };
            let consumer: PullConsumer = match bound {
                Ok(consumer) => consumer,
                Err(e) => {
                    tracing::warn!(
                        stream = %self.cfg.stream,
                        consumer = %self.consumer,
                        error = %e,
                        "cannot bind to the consumer (has `gateway migrate` run? is NATS up?); retrying"
                    );
                    if !pause(shutdown, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::debug!(consumer = %self.consumer, "bound to the consumer");
            let server_max = consumer.cached_info().config.max_deliver;
            if self.cfg.max_deliver > 0 && server_max > 0 && server_max != self.cfg.max_deliver {
                tracing::warn!(
                    consumer = %self.consumer,
                    configured = self.cfg.max_deliver,
                    consumer_max_deliver = server_max,
                    "WORKER_MAX_DELIVER differs from the consumer's max_deliver; the last attempt will be misjudged"
                );
            }

            // Busy: take what is there now, as slots free up (`fetch` answers at once).
            // Idle (the last fetch found nothing): wait, server-side, for the next
            // message, then go back to fetching. A long pull for many messages would
            // hold every free slot until it filled or expired.
            let mut idle = false;
            loop {
                self.reap();
                // Pull only as many messages as can start now: a message waiting in a
                // local buffer would see its AckWait run out without any Progress.
                let Some(mut slots) = self.free_slots(shutdown).await else {
                    return;
                };
                let request = async {
                    if idle {
                        consumer
                            .batch()
                            .max_messages(1)
                            .expires(PULL_EXPIRES)
                            .messages()
                            .await
                    } else {
                        consumer.fetch().max_messages(slots.len()).messages().await
                    }
                };
                let batch = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    b = request => b,
                };
                let mut batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::warn!(error = %e, "pull request failed; binding again");
                        if !pause(shutdown, &mut backoff).await {
                            return;
                        }
                        continue 'bind;
                    }
                };
                // The server ends a pull at its expiry; if it has not by this time, the
                // request was lost (NATS restarted) and waiting longer only adds latency.
                let lost_after = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
                let wanted = slots.len();
                loop {
                    let next = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        n = batch.next() => n,
                        _ = tokio::time::sleep_until(lost_after) => None,
                    };
                    match next {
                        None => {
                            backoff = reconnect_backoff();
                            // Nothing came: wait for work next time.
                            idle = slots.len() == wanted;
                            break;
                        }
                        Some(Ok(msg)) => {
                            backoff = reconnect_backoff();
                            match slots.pop() {
                                Some(slot) => self.spawn(msg, slot),
                                // The batch asks for `slots.len()` messages; should the
                                // server send more, hand the extra back at once.
                                None => {
                                    self.handler.metrics.message(MessageOutcome::HandedBack);
                                    settle(&msg, Disposition::Nak(None)).await;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "pulling messages failed; binding again");
                            if !pause(shutdown, &mut backoff).await {
                                return;
                            }
                            continue 'bind;
                        }
                    }
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
        let tasks = &mut self.tasks;
        let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(result) = tasks.join_next().await {
                log_join(result);
            }
        })
        .await;
        if finished.is_ok() {
            return;
        }
        tracing::warn!(
            unfinished = self.tasks.len(),
            "grace period over: handing unfinished messages back to JetStream"
        );
        self.hard_stop.cancel();
        let tasks = &mut self.tasks;
        let handed_back = tokio::time::timeout(HAND_BACK_TIMEOUT, async {
            while let Some(result) = tasks.join_next().await {
                log_join(result);
            }
        })
        .await;
        if handed_back.is_err() {
            // JetStream redelivers them after AckWait.
            self.tasks.abort_all();
        }
    }
}

fn log_join(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            tracing::error!(error = %e, "a message task panicked; JetStream will deliver the message again");
        }
    }
}

/// Backoff between attempts to bind or pull: 250 ms doubling to 2.5 s, each wait
/// stretched by up to 100 % jitter (so at most 5 s), without end.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
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
            payload: msg.message.payload.clone(),
            delivered: msg.info().ok().map(|info| info.delivered),
            trace: TraceHeaders {
                request_id: header(REQUEST_ID_HEADER),
                traceparent: header(TRACEPARENT_HEADER),
            },
        }
    }
}
