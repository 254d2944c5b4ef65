//! The audit trail: one hash-chained row per mutating or denied request.
//!
//! **Nothing a request changed goes unaudited.** A request that changes state writes
//! its row in the transaction of the change ([`PendingAudit`], taken from the request's
//! [`AuditSlot`] by the lifecycle): the row commits with the change or not at all, so a
//! crash right after the answer cannot lose it. Every other row (refused, failed, or a
//! write that changed nothing) is queued just after the answer to one [`AuditWriter`]
//! per process, which appends in batches and, while the database is down, keeps the
//! rows in a bounded spool and retries until it returns; rows beyond the spool are
//! counted (`gateway_audit_write_errors_total`) and alerted on.
//!
//! **The chain.** Rows are inserted unsealed, so writers never wait for a global lock.
//! The sealer ([`run_sealer`], in every API process; one at a time by a
//! transaction-scoped advisory lock) chains final rows in batches — those written by
//! transactions older than every transaction still running, in `(xid, id)` order — by
//! appending a link per row to `audit_chain`: its place (`chain_seq`), the previous
//! link's hash and its own hash, which covers the previous hash and every field of the
//! row, encoded unambiguously. Neither table is ever updated. [`verify`] seals what was
//! committed before it began, then recomputes the whole chain and names the first row
//! that does not match, or a row the chain went past without linking (one inserted
//! behind the sealer, under another transaction's ID).

pub mod anchor;

use crate::metrics::Metrics;
use crate::store::{self, audit::AuditRow};
use chrono::{DateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Advisory-lock key that serializes sealing ("gwaudit").
const LOCK_KEY: i64 = 0x0067_7761_7564_6974;
/// The `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// What happened, before it is chained.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request was answered.
    pub at: DateTime<Utc>,
    /// Who asked, when known.
    pub principal: Option<(Uuid, String)>,
    /// The tenant acted on.
    pub tenant: Option<String>,
    /// Method and route template.
    pub action: String,
    /// The concrete path.
    pub target: String,
    /// HTTP status answered.
    pub status: u16,
    /// The request's ID.
    pub request_id: String,
    /// The client's address.
    pub source: Option<String>,
}

/// Every outcome an audit row can have.
pub const OUTCOMES: [&str; 3] = ["allowed", "denied", "failed"];

/// `allowed` (2xx/3xx), `denied` (401, 403, 429) or `failed` (any other error).
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=399 => "allowed",
        401 | 403 | 429 => "denied",
        _ => "failed",
    }
}

fn field(h: &mut Sha256, value: Option<&[u8]>) {
    match value {
        None => h.update([0u8]),
        Some(v) => {
            h.update([1u8]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
    }
}

/// The hash of a row whose predecessor's hash is `prev_hash`: SHA-256 over that hash
/// and the row's length-prefixed fields.
pub fn row_hash(r: &AuditRow, prev_hash: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev_hash);
    field(&mut h, Some(&r.at.timestamp_micros().to_be_bytes()));
    field(
        &mut h,
        r.principal_id.as_ref().map(|u| u.as_bytes().as_slice()),
    );
    field(&mut h, r.principal_name.as_deref().map(str::as_bytes));
    field(&mut h, r.tenant.as_deref().map(str::as_bytes));
    field(&mut h, Some(r.action.as_bytes()));
    field(&mut h, Some(r.target.as_bytes()));
    field(&mut h, Some(r.outcome.as_bytes()));
    field(&mut h, Some(&r.status.to_be_bytes()));
    field(&mut h, Some(r.request_id.as_bytes()));
    field(&mut h, r.source.as_deref().map(str::as_bytes));
    h.finalize().to_vec()
}

impl Entry {
    /// The unsealed row of this entry.
    fn row(self) -> AuditRow {
        AuditRow {
            id: 0,
            at: self.at.trunc_subsecs(6),
            principal_id: self.principal.as_ref().map(|p| p.0),
            principal_name: self.principal.map(|p| p.1),
            tenant: self.tenant,
            action: self.action,
            target: self.target,
            outcome: outcome(self.status).to_owned(),
            status: self.status as i16,
            request_id: self.request_id,
            source: self.source,
            chain_seq: None,
            prev_hash: None,
            hash: None,
        }
    }
}

/// Appends `entries`, unsealed, in one statement.
pub async fn append_batch(conn: &mut PgConnection, entries: Vec<Entry>) -> sqlx::Result<()> {
    store::audit::insert(conn, &rows(entries)).await
}

/// The unsealed rows of `entries`, for a statement that writes them with its change.
pub fn rows(entries: impl IntoIterator<Item = Entry>) -> Vec<AuditRow> {
    entries.into_iter().map(Entry::row).collect()
}

/// The audit entry of one request, shared by the guard and the handler. A handler
/// whose write commits records the entry in its transaction ([`PendingAudit::take`]);
/// the guard writes whatever is left after the answer ([`AuditSlot::remaining`]), so
/// each request leaves exactly one row.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(Arc<Mutex<Option<Entry>>>);

impl AuditSlot {
    /// A slot holding `entry` (its status is set when it is written).
    pub fn new(entry: Entry) -> Self {
        Self(Arc::new(Mutex::new(Some(entry))))
    }

    fn put_back(&self, entry: Entry) {
        *self.0.lock().expect("audit slot") = Some(entry);
    }

    /// The entry, unless a committed transaction recorded it (or took it to).
    pub fn remaining(&self) -> Option<Entry> {
        self.0.lock().expect("audit slot").take()
    }
}

/// An audit entry on its way into a transaction: written with the change it records,
/// or — if that transaction does not commit — back in its slot for the guard to write
/// with the answer's real status.
#[derive(Debug)]
pub struct PendingAudit {
    slot: AuditSlot,
    entry: Option<Entry>,
    /// Rows written instead of `entry`, one per part of a request that acts on several
    /// things at once (a batch of reports).
    parts: Vec<Entry>,
}

/// One part of a request that acts on several things, audited as a row of its own:
/// what the same part would have recorded as a request alone.
#[derive(Debug, Clone)]
pub struct AuditPart<'a> {
    /// The tenant acted on, when known.
    pub tenant: Option<&'a str>,
    /// Method and route template of the request the part stands for.
    pub action: &'a str,
    /// Its concrete path.
    pub target: String,
    /// The status it got.
    pub status: u16,
    /// The request ID it carried, if any (else the request's).
    pub request_id: Option<&'a str>,
}

impl PendingAudit {
    /// Takes the slot's entry, to be recorded with `status` (the answer a committed
    /// change gets); `None` when the request is not audited.
    pub fn take(slot: &AuditSlot, status: u16) -> Option<Self> {
        let mut entry = slot.remaining()?;
        entry.status = status;
        Some(Self {
            slot: slot.clone(),
            entry: Some(entry),
            parts: Vec::new(),
        })
    }

    /// Records `part` as a row of its own; once a request has parts, they are written
    /// instead of its one row.
    pub fn part(&mut self, part: AuditPart<'_>) {
        let Some(entry) = &self.entry else {
            return;
        };
        let mut row = entry.clone();
        row.tenant = part.tenant.map(str::to_owned);
        row.action = part.action.to_owned();
        row.target = part.target;
        row.status = part.status;
        if let Some(id) = part.request_id {
            row.request_id = id.to_owned();
        }
        self.parts.push(row);
    }

    /// Sets the tenant acted on, when the path did not name one (operations).
    pub fn tenant(&mut self, tenant: &str) {
        if let Some(e) = self.entry.as_mut().filter(|e| e.tenant.is_none()) {
            e.tenant = Some(tenant.to_owned());
        }
    }

    /// The rows to write in the caller's transaction (with those of other requests
    /// the transaction records). Call [`Self::committed`] once it has committed.
    pub fn rows(&self) -> Vec<Entry> {
        match &self.entry {
            Some(_) if !self.parts.is_empty() => self.parts.clone(),
            Some(e) => vec![e.clone()],
            None => Vec::new(),
        }
    }

    /// The transaction committed: the row is written.
    pub fn committed(mut self) {
        self.entry = None;
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.slot.put_back(entry);
        }
    }
}

/// Rows sealed per transaction at most.
const SEAL_BATCH: i64 = 1_000;

/// Seals one batch of final rows (those of transactions older than every one still
/// running, see [`store::audit::unsealed`]); returns how many.
pub async fn seal(pool: &PgPool) -> sqlx::Result<usize> {
    Ok(seal_pass(pool).await?.0)
}

/// A link of the chain: its place and hash.
pub type Place = (i64, Vec<u8>);

/// [`seal`], and the chain's end after it (the last link written, or the one found).
async fn seal_pass(pool: &PgPool) -> sqlx::Result<(usize, Option<Place>)> {
    let mut tx = store::begin(pool).await?;
    store::advisory_xact_lock(&mut tx, LOCK_KEY).await?;
    let head = store::audit::chain_head(&mut tx).await?;
    let after = head.as_ref().map_or((0, 0), |h| (h.xid, h.audit_id));
    let rows = store::audit::unsealed(&mut tx, after, SEAL_BATCH).await?;
    if rows.is_empty() {
        return Ok((0, head.map(|h| (h.chain_seq, h.hash))));
    }
    let (mut seq, mut prev) = head.map_or((0, GENESIS.to_vec()), |h| (h.chain_seq, h.hash));
    let mut links = Vec::with_capacity(rows.len());
    for r in &rows {
        seq += 1;
        let hash = row_hash(&r.row, &prev);
        links.push(store::audit::Link {
            audit_id: r.row.id,
            xid: r.xid,
            chain_seq: seq,
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    store::audit::seal(&mut tx, &links).await?;
    tx.commit().await?;
    Ok((rows.len(), Some((seq, prev))))
}

/// How long [`verify`] waits for the transactions older than itself to end.
pub const VERIFY_WAIT: Duration = Duration::from_secs(30);

/// Seals every row committed before it began: it waits (up to `wait`) for the
/// transactions running then to end, since rows of newer transactions are sealed only
/// after them. Answers whether it got there: `false` when one of those transactions was
/// still open at the end of the wait (rows written since it began are left unsealed).
pub async fn seal_all(pool: &PgPool, wait: Duration) -> sqlx::Result<bool> {
    let begun = store::audit::transactions_begun(pool).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut said = false;
    loop {
        // Asked before the pass, not after: a transaction that ends between a pass that
        // found nothing final and the question would leave its rows, and every row
        // after them, unsealed and unchecked.
        let ended = store::audit::transactions_ended(pool, begun).await?;
        if seal(pool).await? == 0 {
            #[cfg(debug_assertions)]
            crate::pause::here(crate::pause::Point::AfterAnEmptySealingPass, pool).await;
            if ended {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            if !said {
                said = true;
                tracing::info!(
                    wait_at_most = ?wait,
                    "audit: waiting for transactions older than this one to end (their rows, and newer ones, are chained after them)"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Pause of the sealer when it found nothing left to seal.
const SEAL_INTERVAL: Duration = Duration::from_millis(200);

/// Seals committed rows until `shutdown`, a batch at a time, and watches the chain's
/// end ([`ChainWatch`]); with `anchor`, checks the end saved on the broker when it
/// starts and saves each new end there ([`anchor::Anchoring`]).
pub async fn run_sealer(
    pool: PgPool,
    metrics: Metrics,
    anchor: Option<anchor::Anchor>,
    shutdown: CancellationToken,
) {
    let mut watch = ChainWatch::default();
    let mut anchoring = anchor.map(anchor::Anchoring::new);
    loop {
        let pause = match seal_pass(&pool).await {
            Ok((n, head)) => {
                match watch.check(&pool, &metrics, head.clone()).await {
                    Ok(true) => {}
                    // Told: the saved end is checked again, quietly, and replaced.
                    Ok(false) => anchoring.iter_mut().for_each(|a| a.chain_rewritten()),
                    Err(e) => {
                        tracing::debug!(error = %e, "audit sealer: could not check the chain's end")
                    }
                }
                if let Some(a) = anchoring.as_mut() {
                    a.step(&pool, &metrics, head.as_ref()).await;
                }
                if n as i64 == SEAL_BATCH {
                    Duration::ZERO
                } else {
                    SEAL_INTERVAL
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "audit sealer: pass failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// A tripwire on the chain's end, which the chain itself cannot guard: removing the
/// newest rows *and* their links (with the append-only triggers off) leaves a shorter
/// chain that [`verify`] finds intact, and the sealers then chain new rows after it.
///
/// Each sealer remembers the last link it saw and, at its next pass, checks that this
/// link is still there with the same hash. Links are only ever appended, so a link gone
/// or changed means the end of the chain was removed or rewritten: an `ERROR` line and
/// `gateway_audit_chain_rewritten_total` (alerted on) say so. It sees what happens
/// while a sealer runs, in any API process; what happens while every one is stopped,
/// the end saved on the broker shows ([`anchor`]).
#[derive(Debug, Default)]
pub struct ChainWatch {
    last: Option<Place>,
}

impl ChainWatch {
    /// Checks the link seen last, then remembers `head` (the chain's end now, as the
    /// pass read or wrote it): a read of that link, unless it is `head` itself (an idle
    /// chain costs no query). Answers whether the link was still there, unchanged.
    pub async fn check(
        &mut self,
        pool: &PgPool,
        metrics: &Metrics,
        head: Option<Place>,
    ) -> sqlx::Result<bool> {
        let mut intact = true;
        // The end this pass read is the link seen last: there, unchanged, no query.
        if let Some(last) = self
            .last
            .as_ref()
            .filter(|&last| head.as_ref() != Some(last))
        {
            intact = still_linked(
                pool,
                metrics,
                last,
                head.as_ref(),
                "a link this process saw",
            )
            .await?;
        }
        self.last = head;
        Ok(intact)
    }
}

/// How `link` stands in the chain now: `None` while it is there with the same hash,
/// else `gone` or `changed`.
pub async fn link_lost(pool: &PgPool, link: &Place) -> sqlx::Result<Option<&'static str>> {
    let now = store::audit::link_hash(pool, link.0).await?;
    Ok(match now {
        Some(hash) if hash == link.1 => None,
        Some(_) => Some("changed"),
        None => Some("gone"),
    })
}

/// Whether `link` is still in the chain with the same hash; if not, says so (an
/// `ERROR` line naming `whose` link it was, and `gateway_audit_chain_rewritten_total`).
async fn still_linked(
    pool: &PgPool,
    metrics: &Metrics,
    link: &Place,
    head: Option<&Place>,
    whose: &str,
) -> sqlx::Result<bool> {
    let Some(how) = link_lost(pool, link).await? else {
        return Ok(true);
    };
    metrics.audit_chain_rewritten.inc();
    tracing::error!(
        chain_seq = link.0,
        now = head.map(|h| h.0),
        "audit chain rewritten: {whose} is {how} (the newest rows and their links were \
         removed, or replaced); `gateway admin verify-audit` checks what is there now",
    );
    Ok(false)
}

/// Entries written per transaction at most.
const BATCH: usize = 512;
/// How long the writer keeps going after shutdown for requests still finishing.
const GRACE: Duration = Duration::from_secs(20);
/// Longest pause between tries while the database is down.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Hands the audit entries that no transaction recorded to one writer task per process,
/// which appends them in batches. While the database is down the entries wait in a
/// bounded spool (`GATEWAY_AUDIT_SPOOL`) and are written when it returns; an entry
/// that finds the spool full is counted lost. Recording never blocks a request.
#[derive(Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Entry>,
    metrics: Metrics,
}

impl AuditWriter {
    /// A writer spooling up to `spool` entries, and the task that drains it into
    /// `pool`. The task ends when every writer is dropped, or 20 s after `shutdown`,
    /// writing what is queued first.
    pub fn new(
        pool: PgPool,
        metrics: Metrics,
        spool: usize,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let (queue, rx) = mpsc::channel::<Entry>(spool.max(1));
        let task = drain(pool, metrics.clone(), rx, shutdown);
        (Self { queue, metrics }, task)
    }

    /// Queues `entry`; counts it lost if the spool is full.
    pub fn record(&self, entry: Entry) {
        match self.queue.try_send(entry) {
            Ok(()) => {
                self.metrics.audit_spooled.inc();
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.audit_write_errors.inc();
                tracing::error!("the audit spool is full; an audit entry was lost");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.audit_write_errors.inc();
                tracing::error!("the audit writer has stopped; an audit entry was lost");
            }
        }
    }
}

/// The writer task: batches from the spool, each retried until written (or until the
/// grace period after shutdown ends).
async fn drain(
    pool: PgPool,
    metrics: Metrics,
    mut rx: mpsc::Receiver<Entry>,
    shutdown: CancellationToken,
) {
    let hard_stop = async {
        shutdown.cancelled().await;
        tokio::time::sleep(GRACE).await;
    };
    tokio::pin!(hard_stop);
    // The batch in hand counts against the spool too: at most twice its size is held.
    let batch_max = BATCH.min(rx.max_capacity());
    let mut batch: VecDeque<Entry> = VecDeque::new();
    let mut delay = Duration::from_millis(100);
    loop {
        if batch.is_empty() {
            let first = tokio::select! {
                e = rx.recv() => e,
                _ = &mut hard_stop => return lost(&metrics, &mut rx, batch),
            };
            let Some(first) = first else { return };
            batch.push_back(first);
            while batch.len() < batch_max {
                match rx.try_recv() {
                    Ok(e) => batch.push_back(e),
                    Err(_) => break,
                }
            }
        }
        let written = async {
            let mut conn = pool.acquire().await?;
            append_batch(&mut conn, batch.iter().cloned().collect()).await
        };
        match written.await {
            Ok(()) => {
                metrics.audit_spooled.dec_by(batch.len() as i64);
                batch.clear();
                delay = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = batch.len(), "audit rows not written yet; spooling and retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut hard_stop => return lost(&metrics, &mut rx, batch),
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// Counts what is still spooled when the writer must stop.
fn lost(metrics: &Metrics, rx: &mut mpsc::Receiver<Entry>, batch: VecDeque<Entry>) {
    rx.close();
    let mut n = batch.len();
    while rx.try_recv().is_ok() {
        n += 1;
    }
    if n > 0 {
        metrics.audit_write_errors.inc_by(n as u64);
        tracing::error!(rows = n, "stopping with audit rows not written");
    }
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every row matches; this many were checked.
    Intact(u64),
    /// The first row whose content or link does not match.
    Broken {
        /// Its ID.
        id: i64,
        /// Why.
        reason: &'static str,
    },
}

/// Seals what was committed before it began (waiting up to [`VERIFY_WAIT`] for older
/// transactions to end), then recomputes the whole chain.
pub async fn verify(pool: &PgPool) -> sqlx::Result<Verdict> {
    verify_within(pool, VERIFY_WAIT).await
}

/// [`verify`], waiting up to `wait` for the transactions older than itself; rows left
/// behind by a transaction still open are not checked (a warning says so).
pub async fn verify_within(pool: &PgPool, wait: Duration) -> sqlx::Result<Verdict> {
    if !seal_all(pool, wait).await? {
        tracing::warn!(
            waited = ?wait,
            "audit: a transaction that began before this verification is still open; the \
             rows written since it began are not chained yet and were not checked: run \
             again once it ends (pg_stat_activity shows it)"
        );
    }
    let mut prev = GENESIS.to_vec();
    let mut after = 0;
    let mut checked = 0;
    loop {
        let rows = store::audit::chain_page(pool, after, 1000).await?;
        if rows.is_empty() {
            // The chain's last links, if their rows were removed (earlier ones are
            // found by the link of the row after them).
            if let Some(id) = store::audit::link_after(pool, after).await? {
                return Ok(Verdict::Broken {
                    id,
                    reason: "was removed (its link is in the chain, the row is gone)",
                });
            }
            return Ok(match unchained_behind(pool).await? {
                Some(id) => Verdict::Broken {
                    id,
                    reason: "is not in the chain, though the chain went past it (inserted \
                             behind the sealer with another transaction's ID: forged or \
                             back-dated)",
                },
                None => Verdict::Intact(checked),
            });
        }
        for r in rows {
            if r.prev_hash.as_deref() != Some(prev.as_slice()) {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "does not link to the row before it (a row was removed or altered)",
                });
            }
            let hash = row_hash(&r, &prev);
            if r.hash.as_deref() != Some(hash.as_slice()) {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "its content does not match its hash (the row was altered)",
                });
            }
            prev = hash;
            after = r.chain_seq.unwrap_or(after);
            checked += 1;
        }
    }
}

/// Row IDs [`verify`] checks for links at once.
const UNCHAINED_RANGE: i64 = 50_000;

/// The first row the chain does not cover though it sorts before the chain's end
/// ([`store::audit::unchained_behind`]), looked for a range of IDs at a time.
async fn unchained_behind(pool: &PgPool) -> sqlx::Result<Option<i64>> {
    let Some(head) = store::audit::chain_head(&mut *pool.acquire().await?).await? else {
        return Ok(None);
    };
    let last = store::audit::last_id(pool).await?;
    let mut from = 0;
    while from <= last {
        let ids = from..from.saturating_add(UNCHAINED_RANGE);
        if let Some(id) =
            store::audit::unchained_behind(pool, head.xid, head.audit_id, ids.clone()).await?
        {
            return Ok(Some(id));
        }
        from = ids.end;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> AuditRow {
        AuditRow {
            id: 1,
            at: DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap(),
            principal_id: None,
            principal_name: Some("ab".into()),
            tenant: Some("c".into()),
            action: "POST /x".into(),
            target: "/x".into(),
            outcome: "allowed".into(),
            status: 202,
            request_id: "r".into(),
            source: None,
            chain_seq: None,
            prev_hash: None,
            hash: None,
        }
    }

    #[test]
    fn every_field_is_covered_unambiguously() {
        let base = row_hash(&row(), &GENESIS);
        let mut moved = row();
        // Shifting a character between adjacent fields changes the hash.
        moved.principal_name = Some("a".into());
        moved.tenant = Some("bc".into());
        assert_ne!(row_hash(&moved, &GENESIS), base);
        let mut other = row();
        other.status = 403;
        assert_ne!(row_hash(&other, &GENESIS), base);
        let mut none = row();
        none.tenant = None;
        assert_ne!(row_hash(&none, &GENESIS), base);
        assert_ne!(row_hash(&row(), &[1; 32]), base);
    }

    fn entry() -> Entry {
        Entry {
            at: Utc::now(),
            principal: None,
            tenant: None,
            action: "POST /v1/tenants".into(),
            target: "/v1/tenants".into(),
            status: 0,
            request_id: "r".into(),
            source: None,
        }
    }

    #[test]
    fn an_entry_goes_back_to_its_request_unless_its_transaction_committed() {
        // Not committed (an early return, a failed commit): the guard writes it.
        let slot = AuditSlot::new(entry());
        let mut pending = PendingAudit::take(&slot, 202).unwrap();
        pending.tenant("acme");
        assert!(PendingAudit::take(&slot, 202).is_none(), "taken once");
        drop(pending);
        let back = slot.remaining().expect("back in the slot");
        assert_eq!(back.tenant.as_deref(), Some("acme"));
        // Committed: nothing is left for the guard, so the request has one row.
        let slot = AuditSlot::new(entry());
        PendingAudit::take(&slot, 202).unwrap().committed();
        assert!(slot.remaining().is_none());
    }

    #[test]
    fn outcomes_sort_statuses() {
        assert_eq!(outcome(202), "allowed");
        assert_eq!(outcome(403), "denied");
        assert_eq!(outcome(429), "denied");
        assert_eq!(outcome(422), "failed");
    }
}
