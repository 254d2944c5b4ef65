//! The relay: moves outbox rows to JetStream.
//!
//! Each pass claims a batch with `FOR UPDATE SKIP LOCKED` (so any number of relays can
//! run), publishes the whole batch with its acks outstanding at once (the batch size
//! bounds the window), then deletes the rows JetStream acknowledged, marks their
//! operations `dispatched` and records where JetStream stored each message — in the
//! same short transaction. It locks the operations' resources for that record without
//! waiting ([`crate::lifecycle::dispatch::record_published`], one statement): a row whose resource
//! another transaction holds stays in the outbox with the stream sequence it got, and a
//! pass 10 ms later records it without publishing it again. So the relay never waits
//! for a row lock, and holds none of a resource's while it waits for JetStream.
//!
//! A crash between publish and delete leaves the rows for the next pass; their fixed
//! `Nats-Msg-Id` makes JetStream drop the second copy, and the relay counts that
//! duplicate ack (which carries the first copy's sequence) as success.
//!
//! Transactions stay short: a pass claims nothing while NATS is disconnected (rows
//! would only sit locked behind a buffered publish), and the publishes of one pass are
//! bounded by [`PASS_PUBLISH_TIMEOUT`], well under the server's
//! `idle_in_transaction_session_timeout`. Each ack is also bounded by the JetStream
//! context's timeout (`NATS_PUBLISH_TIMEOUT_MS`). The outbox stays small: rows live for
//! one pass and the table is vacuumed eagerly (see the migration).
//!
//! Every message is signed ([`gateway_proto::signing`]) over its subject, `Nats-Msg-Id`
//! and body, exactly as published: workers act only on messages the relay signed.

use crate::store::outbox;
use async_nats::jetstream;
use async_nats::HeaderMap;
use gateway_proto::signing::{self, SigningKey};
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::changes::{Bell, Doorbell, Wake};

/// Longest wait for all publishes of one pass: whatever has not been acknowledged by
/// then counts as failed, and its rows stay for the next pass. Shorter than the 30 s
/// `idle_in_transaction_session_timeout` of every gateway connection.
pub const PASS_PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the events loop lets a ring's events gather before its pass. Every commit
/// records events and rings it; at a steady rate each ring used to cost a pass (a
/// transaction, a claim and a delete) for the one or two events of one commit. A few
/// milliseconds let the commits of that time share a pass; in a burst, passes are full
/// and run back to back without it.
const EVENTS_LINGER: Duration = Duration::from_millis(5);

/// How long the leading operations loop's pass may run before the rings it cannot hear
/// go to the helpers. A pass takes milliseconds; one this long waits on the broker's
/// acks (up to [`PASS_PUBLISH_TIMEOUT`]) or on a slow database, and the commits made
/// meanwhile must not wait for it, nor for the helpers' poll (`RELAY_POLL_INTERVAL_MS`).
const HELD_UP: Duration = Duration::from_millis(100);

/// Runs `pass`; once it is `recording` (its acks are in, and it goes on to record them)
/// or has run [`HELD_UP`], every ring of `bell` until it ends (and one that came before)
/// is passed on to a loop of `helpers`. `bell` and `helpers` must be different groups:
/// a ring passed on to the group it came from would come straight back.
///
/// Recording takes about half of a pass at a steady rate (its statement and commit, on
/// a machine the load keeps busy); a row committed meanwhile used to wait for it and
/// then for a pass of its own. A helper now claims it at once (the leader's rows are
/// locked, `SKIP LOCKED` passes them by), and the two passes overlap. Five alternated
/// pairs of benchmark runs at 500 operations/s: relay lag p50 5.8–7.3 ms against
/// 6.9–10.5 ms, p99 15.9–25.2 ms against 25.5–31.6 ms. Handing rings on from the end of
/// the claim instead (the publishes overlapping too) did no better in three pairs.
async fn handing_rings_on_when_busy<T>(
    pass: impl std::future::Future<Output = T>,
    bell: &Doorbell,
    helpers: &Doorbell,
    recording: &Notify,
) -> T {
    tokio::pin!(pass);
    tokio::select! {
        biased;
        done = &mut pass => return done,
        _ = recording.notified() => {}
        _ = tokio::time::sleep(HELD_UP) => {}
    }
    loop {
        tokio::select! {
            biased;
            done = &mut pass => return done,
            _ = bell.rung() => helpers.pass_on(),
        }
    }
}

/// Pause before passing again over rows left because another transaction held their
/// resource (nothing rings when it lets go): short, since such a transaction is a
/// request's or a report's, and those take milliseconds.
const BUSY_RETRY: Duration = Duration::from_millis(10);

/// Pause after `passes` passes in a row that left rows behind a lock: [`BUSY_RETRY`],
/// doubling from the fourth on, so a resource held for long (an operator's open
/// transaction) costs a pass now and then, not a hundred a second.
fn busy_retry(passes: u32) -> Duration {
    BUSY_RETRY.saturating_mul(1 << passes.saturating_sub(3).min(10))
}

/// What one relay needs.
pub struct Relay {
    /// The outbox's database.
    pub pool: PgPool,
    /// Where to publish.
    pub js: jetstream::Context,
    /// Rows per pass.
    pub batch_size: i64,
    /// Operations loops (and passes of [`Relay::passes`]) running at once.
    pub concurrent_passes: usize,
    /// Longest sleep without a ring.
    pub poll_interval: Duration,
    /// The doorbell.
    pub wake: Wake,
    /// Told which operations became `dispatched`.
    pub changes: crate::changes::Changes,
    /// Throughput, errors, batch sizes and lag.
    pub metrics: crate::metrics::Metrics,
    /// Signs every message, so workers act only on what the gateway decided.
    pub signer: SigningKey,
    /// Events are published on `{events_prefix}.{tenant}.{kind}.{zone}`.
    pub events_prefix: String,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows JetStream acknowledged (including duplicates) and deleted.
    pub published: usize,
    /// Rows JetStream acknowledged but left in the outbox, because another transaction
    /// held their resource: they keep the sequence JetStream gave them, and a later pass
    /// records them without publishing them again.
    pub busy: usize,
}

impl Relay {
    /// Runs until `shutdown`: [`Relay::concurrent_passes`] operations loops and one events
    /// loop, each a task of its own, so a slow or failing events pass (a full or missing
    /// events stream) never delays a dispatch. Each loop sleeps between passes until rung
    /// or polled, and backs off after a failure.
    ///
    /// One operations loop, the *leader*, hears the doorbell: commits made while its pass
    /// runs wait for its next pass and share it, so at a steady rate passes carry what
    /// arrived meanwhile instead of one row each. The others are *helpers*, woken only
    /// by a pass that claimed a full batch (a backlog): they run passes independently,
    /// each on rows of its own (`SKIP LOCKED`), so a burst still has every loop at work.
    /// Every loop used to hear the doorbell: at a steady rate a commit's ring woke an
    /// idle loop for its one row, each pass a transaction and a commit of its own.
    /// A leader's pass that records what it published, or runs longer than [`HELD_UP`]
    /// (its acks slow to come), passes the rings it gets meanwhile on to the helpers, if
    /// there are any, so new rows do not wait for it ([`handing_rings_on_when_busy`]).
    /// This does not reorder what matters: a resource has one dispatch waiting at a time
    /// (its next operation is queued until the current one ends), and a message published
    /// twice is dropped by its `Nats-Msg-Id`.
    pub async fn run(self, shutdown: CancellationToken) {
        let relay = std::sync::Arc::new(self);
        let dispatches = relay.wake.doorbell(Bell::Dispatches);
        let events = relay.wake.doorbell(Bell::Events);
        let helpers = Doorbell::unrung();
        let leader = (Work::Operations, dispatches, helpers.clone());
        let others = std::iter::repeat_n(
            (Work::Operations, helpers.clone(), helpers),
            relay.concurrent_passes.max(1) - 1,
        );
        let mut loops = tokio::task::JoinSet::new();
        // Subscribed before the loops' first passes: a ring after them is heard.
        loops.spawn(relay.wake.clone().listen(shutdown.clone()).await);
        for (work, bell, recruit) in
            [leader]
                .into_iter()
                .chain(others)
                .chain([(Work::Events, events.clone(), events)])
        {
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            loops.spawn(async move { relay.cycle(work, bell, recruit, &shutdown).await });
        }
        while let Some(done) = loops.join_next().await {
            // A loop that panicked takes the relay down with it, as one loop did.
            if let Err(e) = done {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }

    /// Runs passes of `work` until `shutdown`, waking at a ring of `bell` (or a poll);
    /// a pass that leaves more behind rings `recruit` for another loop to help.
    async fn cycle(
        &self,
        work: Work,
        bell: Doorbell,
        recruit: Doorbell,
        shutdown: &CancellationToken,
    ) {
        let (mut failures, mut busy_passes) = (0u32, 0u32);
        loop {
            let pass = match work {
                // The leader, with helpers to take over: a pass held up must not hold up
                // the commits made meanwhile. (Alone, it keeps its rings for its next
                // pass: passed on to a group with no member they would be lost.)
                Work::Operations if !bell.is(&recruit) && self.concurrent_passes > 1 => {
                    let recording = Notify::new();
                    let pass = self.pass_noting(Some(&recording));
                    handing_rings_on_when_busy(pass, &bell, &recruit, &recording).await
                }
                Work::Operations => self.pass().await,
                Work::Events => self.events_pass().await.map(|p| Pass {
                    claimed: p.claimed,
                    published: p.published,
                    busy: 0,
                }),
            };
            if work == Work::Operations
                && matches!(pass, Ok(Pass { published, .. }) if published > 0)
            {
                // Marking them `dispatched` recorded events (by trigger).
                self.wake.ring_here(&[Bell::Events]);
            }
            let step = self.next_step(work, pass);
            busy_passes = if matches!(step, Step::Soon) {
                busy_passes + 1
            } else {
                0
            };
            let pause = match step {
                Step::Again => {
                    // More may wait: another idle loop may take a batch meanwhile.
                    recruit.pass_on();
                    failures = 0;
                    continue;
                }
                Step::Wait => {
                    failures = 0;
                    self.poll_interval
                }
                Step::Soon => {
                    failures = 0;
                    busy_retry(busy_passes).min(self.poll_interval)
                }
                Step::Retry => {
                    failures += 1;
                    backoff(failures)
                }
            };
            let rung = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = bell.rung(), if failures == 0 => true,
                _ = tokio::time::sleep(pause) => false,
            };
            if rung && work == Work::Events {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(EVENTS_LINGER) => {}
                }
            }
        }
    }

    /// Runs [`Relay::concurrent_passes`] passes at once and adds them up (each on rows of
    /// its own, as [`Relay::run`]'s loops do). Fails if any pass failed; what the others
    /// did stands.
    pub async fn passes(&self) -> anyhow::Result<Pass> {
        let runs = (0..self.concurrent_passes.max(1)).map(|_| self.pass());
        let mut total = Pass::default();
        for pass in futures::future::join_all(runs).await {
            let pass = pass?;
            total.claimed += pass.claimed;
            total.published += pass.published;
            total.busy += pass.busy;
        }
        Ok(total)
    }

    /// Claims, publishes and deletes one batch. Fails without claiming anything while
    /// NATS is disconnected.
    pub async fn pass(&self) -> anyhow::Result<Pass> {
        self.pass_noting(None).await
    }

    /// [`Relay::pass`]; notifies `recording` once its publishes are settled and it goes on
    /// to record them.
    async fn pass_noting(&self, recording: Option<&Notify>) -> anyhow::Result<Pass> {
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            anyhow::bail!("NATS is not connected; the outbox keeps the messages");
        }
        let mut tx = crate::store::begin(&self.pool).await?;
        let rows = outbox::claim(&mut tx, self.batch_size).await?;
        if rows.is_empty() {
            self.metrics.relay_empty_passes.inc();
            return Ok(Pass::default());
        }
        #[cfg(debug_assertions)]
        crate::pause::here(crate::pause::Point::RelayPassClaimed, &self.pool).await;
        let results = self.publish(&rows).await;
        if let Some(recording) = recording {
            recording.notify_one();
        }
        self.metrics.relay_batch_size.observe(rows.len() as f64);
        let acked_at = chrono::Utc::now();
        let mut acked = Vec::with_capacity(rows.len());
        let mut failed = 0;
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(seq) => acked.push((row, seq)),
                Err(e) => {
                    failed += 1;
                    self.metrics.outbox_publish_errors.inc();
                    tracing::warn!(msg_id = %row.msg_id, subject = %row.subject, error = %e, "relay: publish failed")
                }
            }
        }
        let record: Vec<outbox::Acked> = acked
            .iter()
            .map(|(row, seq)| outbox::Acked {
                id: row.id,
                operation: row.operation_id,
                dispatch: dispatch_number(&row.msg_id),
                seq: *seq,
                kept: row.published_seq.is_some(),
            })
            .collect();
        let held = crate::lifecycle::dispatch::record_published(&mut tx, &record).await?;
        tx.commit().await?;
        let (mut published, mut dispatched) = (0, Vec::new());
        for (row, _) in acked {
            // The lag is the message's, from its insert to its ack, counted once, in the
            // pass JetStream acknowledged it in: a row left for a later pass to record
            // (its resource was in use) is in the stream already, and a row an earlier
            // pass published was counted there. (Counting it when recorded added the
            // wait for the resource, 10 ms or more, to a few percent of the rows at a low
            // rate: the lag's p99 was that wait.)
            if row.published_seq.is_none() {
                let lag = (acked_at - row.created_at).to_std().unwrap_or_default();
                self.metrics.relay_lag.observe(lag.as_secs_f64());
            }
            if row.operation_id.is_some_and(|op| held.contains(&op)) {
                continue;
            }
            published += 1;
            dispatched.extend(row.operation_id);
        }
        let busy = rows.len() - published - failed;
        self.metrics.relay_busy_rows.inc_by(busy as u64);
        self.metrics.outbox_published.inc_by(published as u64);
        self.changes.publish(&dispatched, &[]).await;
        Ok(Pass {
            claimed: rows.len(),
            published,
            busy,
        })
    }

    /// Publishes `rows` with their acks outstanding at once; answers each one's stream
    /// sequence, or why it failed (every publish still out past
    /// [`PASS_PUBLISH_TIMEOUT`]). A row an earlier pass published but could not record
    /// is not published again: it answers the sequence it kept.
    async fn publish(&self, rows: &[outbox::OutboxRow]) -> Vec<Result<u64, async_nats::Error>> {
        let kept = |row: &outbox::OutboxRow| row.published_seq.map(|seq| seq as u64);
        let publishes = rows.iter().map(|row| {
            let js = self.js.clone();
            async move {
                if let Some(seq) = kept(row) {
                    return Ok(seq);
                }
                let (headers, body) = self.message(row);
                let ack = js
                    .publish_with_headers(row.subject.clone(), headers, body.into())
                    .await?
                    .await?;
                if ack.duplicate {
                    tracing::debug!(msg_id = %row.msg_id, "relay: duplicate publish acknowledged");
                }
                Ok::<_, async_nats::Error>(ack.sequence)
            }
        });
        tokio::time::timeout(PASS_PUBLISH_TIMEOUT, futures::future::join_all(publishes))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(
                    rows = rows.len(),
                    "relay: publishes timed out; retrying them later"
                );
                rows.iter()
                    .map(|row| kept(row).ok_or_else(|| "publish timed out".into()))
                    .collect()
            })
    }
}

/// What a relay loop publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Outbox rows: dispatches.
    Operations,
    /// Event rows.
    Events,
}

impl Work {
    /// Its name in logs.
    fn name(self) -> &'static str {
        match self {
            Self::Operations => "operations",
            Self::Events => "events",
        }
    }
}

/// What the relay does after a pass.
enum Step {
    /// A batch was full: pass again at once.
    Again,
    /// All caught up: wait for a ring or the poll interval.
    Wait,
    /// Rows were left because their resources were in use: pass again shortly.
    Soon,
    /// Something failed: back off.
    Retry,
}

impl Relay {
    /// Publishes waiting events (see [`crate::events::publish`]).
    pub async fn events_pass(&self) -> anyhow::Result<crate::events::publish::EventsPass> {
        crate::events::publish::EventPublisher {
            pool: &self.pool,
            js: &self.js,
            prefix: &self.events_prefix,
            batch_size: self.batch_size,
            timeout: PASS_PUBLISH_TIMEOUT,
            metrics: &self.metrics,
        }
        .pass()
        .await
    }

    /// The step after a pass of `work`.
    fn next_step(&self, work: Work, pass: anyhow::Result<Pass>) -> Step {
        let what = work.name();
        match pass {
            Ok(Pass {
                claimed,
                published,
                busy,
            }) if published + busy == claimed => {
                if claimed as i64 >= self.batch_size && busy < claimed {
                    // A whole batch claimed: more may wait. At worst the next pass finds
                    // nothing.
                    Step::Again
                } else if busy > 0 {
                    Step::Soon
                } else {
                    Step::Wait
                }
            }
            Ok(Pass {
                claimed, published, ..
            }) => {
                tracing::warn!(what, claimed, published, "relay: some publishes failed");
                Step::Retry
            }
            Err(e) => {
                tracing::warn!(what, error = %e, "relay pass failed");
                Step::Retry
            }
        }
    }

    /// The headers and body of `row`'s message: its ID, its extra headers, and the
    /// signature over subject, ID and body.
    fn message(&self, row: &outbox::OutboxRow) -> (HeaderMap, Vec<u8>) {
        let mut headers = unsigned_headers(&row.headers, &row.msg_id);
        let body = row.payload.as_bytes().to_vec();
        for (name, value) in self.signer.sign(&row.subject, &row.msg_id, &body) {
            headers.insert(name, value.as_str());
        }
        (headers, body)
    }
}

/// The headers of an outbox row's message before its signature's: its extra headers
/// (`extra`, a JSON object of strings, as the outbox stores them) and its
/// `Nats-Msg-Id`.
pub fn unsigned_headers(extra: &serde_json::Value, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in extra.as_object().into_iter().flatten() {
        if let Some(v) = v.as_str() {
            headers.insert(k.as_str(), v);
        }
    }
    headers.insert(signing::MSG_ID_HEADER, msg_id);
    headers
}

/// The dispatch number `n` of a message ID `{operation}.{n}`.
fn dispatch_number(msg_id: &str) -> Option<i32> {
    msg_id.rsplit_once('.').and_then(|(_, n)| n.parse().ok())
}

/// Pause after `failures` failed passes in a row: 100 ms doubling to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dispatch_number_is_the_message_ids_suffix() {
        let id = "0193a1b2-0000-7000-8000-000000000000";
        assert_eq!(super::dispatch_number(&format!("{id}.1")), Some(1));
        assert_eq!(super::dispatch_number(&format!("{id}.12")), Some(12));
        assert_eq!(super::dispatch_number(id), None);
    }

    #[test]
    fn passes_behind_a_lock_come_back_soon_then_less_often() {
        use super::{busy_retry, BUSY_RETRY};
        assert_eq!(busy_retry(1), BUSY_RETRY);
        assert_eq!(busy_retry(3), BUSY_RETRY);
        assert_eq!(busy_retry(4), BUSY_RETRY * 2);
        assert!(busy_retry(100) >= std::time::Duration::from_secs(10));
    }

    /// Whether `d` is rung within 20 ms.
    async fn rung(d: &super::Doorbell) -> bool {
        tokio::time::timeout(std::time::Duration::from_millis(20), d.rung())
            .await
            .is_ok()
    }

    /// A leader's pass that ends in time leaves the rings it got meanwhile to the leader
    /// (its next pass takes their rows); one held up past `HELD_UP` passes them on to a
    /// helper, the ring that came before and those that come after.
    #[tokio::test]
    async fn rings_during_a_held_up_pass_go_to_the_helpers() {
        use super::{handing_rings_on_when_busy, Doorbell, HELD_UP};
        use tokio::sync::Notify;
        let (bell, helpers) = (Doorbell::unrung(), Doorbell::unrung());

        // In time: the ring stays with the leader.
        let quick = async {
            bell.pass_on();
            tokio::time::sleep(HELD_UP / 4).await;
        };
        handing_rings_on_when_busy(quick, &bell, &helpers, &Notify::new()).await;
        assert!(
            !rung(&helpers).await,
            "a helper was rung for a pass in time"
        );
        assert!(rung(&bell).await, "the leader lost the ring");

        // Held up: the ring before `HELD_UP` goes to a helper at `HELD_UP`, and so does
        // each one after, while the pass still runs.
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let held = tokio::spawn({
            let (bell, helpers) = (bell.clone(), helpers.clone());
            async move {
                bell.pass_on();
                handing_rings_on_when_busy(finished, &bell, &helpers, &Notify::new()).await
            }
        });
        assert!(
            !rung(&helpers).await,
            "passed on before the pass was held up"
        );
        tokio::time::sleep(HELD_UP).await;
        assert!(
            rung(&helpers).await,
            "the ring before HELD_UP was not passed on"
        );
        bell.pass_on();
        assert!(
            rung(&helpers).await,
            "a ring after HELD_UP was not passed on"
        );
        finish.send(()).unwrap();
        held.await.unwrap().unwrap();
        assert!(
            !rung(&bell).await,
            "a ring passed on was also left to the leader"
        );
    }

    /// A leader's pass that is recording its acks passes the rings on at once, without
    /// waiting for `HELD_UP`: the ring that came during its claim and publishes, and
    /// each one after.
    #[tokio::test]
    async fn rings_while_a_pass_records_go_to_the_helpers_at_once() {
        use super::{handing_rings_on_when_busy, Doorbell, HELD_UP};
        use std::time::Duration;
        use tokio::sync::Notify;
        let (bell, helpers) = (Doorbell::unrung(), Doorbell::unrung());
        let started = tokio::time::Instant::now();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let recording = tokio::spawn({
            let (bell, helpers) = (bell.clone(), helpers.clone());
            async move {
                let recording = Notify::new();
                let pass = async {
                    // A commit during the claim and publishes, then the acks are in.
                    bell.pass_on();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    recording.notify_one();
                    finished.await
                };
                handing_rings_on_when_busy(pass, &bell, &helpers, &recording).await
            }
        });
        assert!(
            rung(&helpers).await,
            "the ring before recording was not passed on"
        );
        bell.pass_on();
        assert!(
            rung(&helpers).await,
            "a ring while recording was not passed on"
        );
        assert!(started.elapsed() < HELD_UP, "passed on only when held up");
        finish.send(()).unwrap();
        recording.await.unwrap().unwrap();
        assert!(
            !rung(&bell).await,
            "a ring passed on was also left to the leader"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(super::backoff(1) < super::backoff(2));
        assert_eq!(super::backoff(30), std::time::Duration::from_secs(5));
    }
}
