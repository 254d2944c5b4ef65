//! Group commit: creates that arrive together share one transaction and one commit.
//!
//! A create that has passed its in-process checks joins a queue. One of a few *lanes*
//! ([`LANES`]) takes everything queued, up to the configured batch size, and records it
//! in one transaction (`creates::together`): one statement per table for the whole
//! batch instead of a round trip per row. Nothing waits for a batch to fill: a create
//! that finds the first lane free goes at once, alone; batches form from the creates
//! that arrive while it is busy, so their size follows the load. The other lanes take
//! full batches (a backlog of the batch size or more) at once, and any batch whose
//! creates have waited [`STUCK`] for the first lane: a batch waiting on a lock holds up
//! the creates behind it for that long, no longer.
//!
//! **Each create is still answered on its own.** A refusal that the batch can tell
//! (unknown tenant, zone or catalog entry, quota, a replayed `Idempotency-Key`) answers
//! that create and leaves its neighbours alone. Any other failure of the batch's
//! transaction — a name another write took, a tenant deleted meanwhile, a lost
//! connection — rolls all of it back, and each of its creates is then recorded alone
//! (`submit::create_alone`), so only the one at fault is refused.
//!
//! **Who does the work.** The waiting requests themselves: a create that finds its
//! entry still queued and a lane free takes the queue and spawns the batch as a task of
//! its own (so a client hanging up cannot abort its neighbours' transaction), then
//! waits for its answer. A request dropped while its create is still queued withdraws
//! it: as with a single transaction, a create whose client left before it began is not
//! recorded.

use super::submit::{create_alone, ReadyCreate};
use super::{creates, Engine, LifecycleError};
use crate::store::operations::OperationRow;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Batches recorded at once, at most (each holds a database connection); all but the
/// first take full batches, or creates that waited [`STUCK`] for the first. Measured on
/// two cores (`cargo bench --bench throughput`): one, two and four lanes that any batch
/// could take gave 1,577, 1,523 and 1,419 creates/s at 8 clients, 2,722, 2,623 and 2,488
/// at 32 (fewer lanes make larger batches); at a steady rate, a second lane for any
/// batch sent most creates alone, each a statement and a commit, whose CPU the rest of
/// an operation's life then queued for. Two, so that one batch waiting on a lock does
/// not stop every create.
pub const LANES: usize = 2;

/// How long a create waits for the first lane before it takes another: a batch there
/// that takes this long is held up (a lock another transaction holds, say), and the
/// creates behind it, of any tenant, must not wait for it to end. A batch's statement
/// takes a millisecond or two; a wait this long is no load this project has measured.
/// (Two benchmark runs with 20 ms gave a half-rate p99 of 137–203 ms, two with 100 ms
/// 124–168 ms, against 105–160 ms without this timer: within the machine's noise, so the
/// longer wait, the less likely to open the second lane under mere load, was kept.)
pub const STUCK: std::time::Duration = std::time::Duration::from_millis(100);

/// What a create gets.
type Answer = Result<OperationRow, LifecycleError>;

/// A create waiting for a lane.
struct Queued {
    ticket: u64,
    create: ReadyCreate,
    reply: oneshot::Sender<Answer>,
}

/// The queue of creates and the lanes that record them.
pub struct GroupCommit {
    queue: Mutex<VecDeque<Queued>>,
    /// The lane any batch may take.
    first: Arc<Semaphore>,
    /// The other lanes ([`LANES`] − 1): full batches, and creates that waited
    /// [`STUCK`] for the first.
    others: Arc<Semaphore>,
    max_batch: usize,
    tickets: AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Batches of up to `max_batch` creates (`1`: every create in a transaction of its
    /// own).
    pub fn new(max_batch: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            first: Arc::new(Semaphore::new(1)),
            others: Arc::new(Semaphore::new(LANES - 1)),
            max_batch: max_batch.max(1),
            tickets: AtomicU64::new(0),
        }
    }

    /// Records `create`, with others that arrive meanwhile, and answers it.
    pub(super) async fn create(&self, engine: &Engine, create: ReadyCreate) -> Answer {
        if self.max_batch == 1 {
            return create_alone(engine, &create).await;
        }
        let (reply, mut answer) = oneshot::channel();
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.lock().push_back(Queued {
            ticket,
            create,
            reply,
        });
        let _withdraw = Withdraw {
            group: self,
            ticket,
        };
        loop {
            tokio::select! {
                biased;
                got = &mut answer => return got.unwrap_or_else(|_| Err(lost())),
                lane = self.lane() => {
                    let batch = self.take();
                    if batch.is_empty() {
                        // Ours is in a batch already: wait for its answer.
                        break;
                    }
                    tokio::spawn(run(engine.clone(), batch, lane));
                }
            }
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// A free lane: the first; another while a full batch waits, or once this create
    /// has waited [`STUCK`] for the first.
    async fn lane(&self) -> OwnedSemaphorePermit {
        let full = self.lock().len() >= self.max_batch;
        let other = async {
            if !full {
                tokio::time::sleep(STUCK).await;
            }
            self.others.clone().acquire_owned().await
        };
        let lane = tokio::select! {
            biased;
            first = self.first.clone().acquire_owned() => first,
            other = other => other,
        };
        lane.expect("the lanes are never closed")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().expect("group commit queue")
    }

    /// The oldest queued creates, up to a batch.
    fn take(&self) -> Vec<Queued> {
        let mut queue = self.lock();
        let n = queue.len().min(self.max_batch);
        queue.drain(..n).collect()
    }
}

/// Withdraws a create whose request was dropped while it was still queued.
struct Withdraw<'a> {
    group: &'a GroupCommit,
    ticket: u64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.group.lock().retain(|q| q.ticket != self.ticket);
    }
}

/// The answer of a create whose batch task ended without answering (it panicked).
fn lost() -> LifecycleError {
    LifecycleError::Database(sqlx::Error::Protocol(
        "the group commit recording this create stopped".into(),
    ))
}

/// Records `batch` and answers each create; the lane is free again when it returns.
///
/// If it panics (a bug), unwinding drops the batch's reply channels and its lane: each
/// create is answered [`lost`] (`500 internal`), nothing of the batch is left half
/// written (its transaction, if any, is rolled back when its connection is dropped),
/// and the next batch takes the lane. The test
/// `group_commit::a_batch_task_that_panics_answers_its_creates_and_frees_its_lane`
/// holds it there, through `fault`.
async fn run(engine: Engine, batch: Vec<Queued>, _lane: OwnedSemaphorePermit) {
    #[cfg(debug_assertions)]
    fault::check(batch.iter().map(|q| q.create.name.as_str()));
    engine.metrics.write_batch(batch.len());
    let all: Vec<&ReadyCreate> = batch.iter().map(|q| &q.create).collect();
    let recorded = match creates::at_once(&engine, &all).await {
        Ok(Some(outcomes)) => Ok(outcomes),
        // A tenant with quota limits, or a replayed key: checks that take a transaction.
        Ok(None) => creates::together(&engine, &all).await,
        Err(e) => Err(e),
    };
    drop(all);
    let alone = match recorded {
        Ok(outcomes) => {
            let mut alone = Vec::new();
            for (q, outcome) in batch.into_iter().zip(outcomes) {
                match outcome {
                    creates::Outcome::Answer(answer) => {
                        let _ = q.reply.send(answer);
                    }
                    creates::Outcome::Alone => alone.push(q),
                }
            }
            alone
        }
        Err(e) if crate::store::is_unavailable(&e) => {
            // Alone, each would wait for the database in turn (the pool's acquire
            // timeout each, two at a time): answer them all now, as a create alone
            // is answered while the database is away. A batch whose commit went
            // through unanswered is found again by its creates' Idempotency-Keys.
            tracing::warn!(error = %e, creates = batch.len(), "group commit: database unavailable");
            failed(&engine, batch.len());
            for q in batch {
                let _ = q.reply.send(Err(unavailable(&e)));
            }
            Vec::new()
        }
        Err(e) => {
            tracing::debug!(error = %e, creates = batch.len(), "group commit failed; recording each create alone");
            failed(&engine, batch.len());
            batch
        }
    };
    futures::stream::iter(alone)
        .for_each_concurrent(LANES, |q| {
            let engine = &engine;
            async move {
                let answer = create_alone(engine, &q.create).await;
                let _ = q.reply.send(answer);
            }
        })
        .await;
}

/// Counts a failed batch: only one of several creates, whose shared transaction or
/// statement failed. A create alone that fails (its name taken, say) is no batch failure.
fn failed(engine: &Engine, creates: usize) {
    if creates > 1 {
        engine.metrics.write_batch_failed();
    }
}

/// The answer of each create of a batch the database failed under: `e` again (a
/// `sqlx::Error` is not `Clone`), still a connection failure, so each is answered
/// `503 database_unavailable`.
fn unavailable(e: &sqlx::Error) -> LifecycleError {
    let io = std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string());
    LifecycleError::Database(sqlx::Error::Io(io))
}

/// Fault injection for the tests, in debug builds only (release builds have none of it):
/// a batch holding a create of a name given to [`fault::panic_on`] panics in its task,
/// before it records anything. A name is the test's own, so tests running side by side
/// in one process do not meet each other's faults.
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod fault {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    static NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

    /// Makes every batch holding a create named `name` panic.
    pub fn panic_on(name: &str) {
        NAMES.lock().expect("fault names").insert(name.to_owned());
    }

    /// Panics if one of `names` was given to [`panic_on`].
    pub(super) fn check<'a>(mut names: impl Iterator<Item = &'a str>) {
        let faulty = {
            let set = NAMES.lock().expect("fault names");
            names.find(|n| set.contains(*n)).map(str::to_owned)
        };
        if let Some(name) = faulty {
            panic!("fault injected: a batch holding a create named {name:?}");
        }
    }
}
