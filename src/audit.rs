//! The audit trail: one hash-chained row per mutating or denied request.
//!
//! Appends are serialized by a transaction-scoped advisory lock, so the chain has one
//! order across every gateway replica; each process batches its entries through one
//! [`AuditWriter`] so the lock is taken per batch, not per request. The hash covers the previous row's hash and every
//! field of the row, encoded unambiguously; `verify` recomputes the chain and names the
//! first row that does not match.

use crate::metrics::Metrics;
use crate::store::{self, audit::AuditRow};
use chrono::{DateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Advisory-lock key that serializes appends ("gwaudit").
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

/// The hash of a row: SHA-256 over its predecessor's hash and its length-prefixed fields.
pub fn row_hash(r: &AuditRow) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(&r.prev_hash);
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

/// Appends `entries` to the chain, in order, in one transaction.
pub async fn append_batch(pool: &PgPool, entries: Vec<Entry>) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    store::advisory_xact_lock(&mut tx, LOCK_KEY).await?;
    let mut prev_hash = store::audit::last_hash(&mut tx)
        .await?
        .unwrap_or_else(|| GENESIS.to_vec());
    for entry in entries {
        let mut row = AuditRow {
            id: 0,
            at: entry.at.trunc_subsecs(6),
            principal_id: entry.principal.as_ref().map(|p| p.0),
            principal_name: entry.principal.map(|p| p.1),
            tenant: entry.tenant,
            action: entry.action,
            target: entry.target,
            outcome: outcome(entry.status).to_owned(),
            status: entry.status as i16,
            request_id: entry.request_id,
            source: entry.source,
            prev_hash,
            hash: Vec::new(),
        };
        row.hash = row_hash(&row);
        store::audit::insert(&mut tx, &row).await?;
        prev_hash = row.hash;
    }
    tx.commit().await
}

/// Appends one entry.
pub async fn append(pool: &PgPool, entry: Entry) -> sqlx::Result<()> {
    append_batch(pool, vec![entry]).await
}

/// Entries queued before callers wait for the writer.
const QUEUE: usize = 8_192;
/// Entries written per transaction at most.
const BATCH: usize = 512;
/// How long the writer keeps going after shutdown for requests still finishing.
const GRACE: Duration = Duration::from_secs(20);

/// Hands audit entries to one writer task per process, which appends them in batches:
/// one transaction and one turn of the chain's lock per batch instead of per request,
/// so auditing does not serialize the API. Callers wait only when the queue is full.
#[derive(Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Entry>,
}

impl AuditWriter {
    /// A writer and the task that drains it into `pool`. The task ends when every
    /// writer is dropped, or 20 s after `shutdown`, writing what is queued first.
    pub fn new(
        pool: PgPool,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let (queue, mut rx) = mpsc::channel::<Entry>(QUEUE);
        let task = async move {
            let hard_stop = async {
                shutdown.cancelled().await;
                tokio::time::sleep(GRACE).await;
            };
            tokio::pin!(hard_stop);
            loop {
                let first = tokio::select! {
                    e = rx.recv() => e,
                    _ = &mut hard_stop => {
                        rx.close();
                        rx.recv().await
                    }
                };
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                write_with_retries(&pool, &metrics, batch).await;
            }
        };
        (Self { queue }, task)
    }

    /// Queues `entry`.
    pub async fn record(&self, entry: Entry) {
        if self.queue.send(entry).await.is_err() {
            tracing::error!("the audit writer has stopped; an audit entry was lost");
        }
    }
}

async fn write_with_retries(pool: &PgPool, metrics: &Metrics, batch: Vec<Entry>) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match append_batch(pool, batch.clone()).await {
            Ok(()) => return,
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, "audit batch not written yet; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                metrics.audit_write_errors.inc_by(batch.len() as u64);
                tracing::error!(error = %e, rows = batch.len(), "audit rows could not be written");
            }
        }
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

/// Recomputes the whole chain.
pub async fn verify(pool: &PgPool) -> sqlx::Result<Verdict> {
    let mut prev = GENESIS.to_vec();
    let mut after = 0;
    let mut checked = 0;
    loop {
        let rows = store::audit::chain_page(pool, after, 1000).await?;
        if rows.is_empty() {
            return Ok(Verdict::Intact(checked));
        }
        for r in rows {
            if r.prev_hash != prev {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "does not link to the row before it (a row was removed or altered)",
                });
            }
            if row_hash(&r) != r.hash {
                return Ok(Verdict::Broken {
                    id: r.id,
                    reason: "its content does not match its hash (the row was altered)",
                });
            }
            prev = r.hash;
            after = r.id;
            checked += 1;
        }
    }
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
            prev_hash: GENESIS.to_vec(),
            hash: vec![],
        }
    }

    #[test]
    fn every_field_is_covered_unambiguously() {
        let base = row_hash(&row());
        let mut moved = row();
        // Shifting a character between adjacent fields changes the hash.
        moved.principal_name = Some("a".into());
        moved.tenant = Some("bc".into());
        assert_ne!(row_hash(&moved), base);
        let mut other = row();
        other.status = 403;
        assert_ne!(row_hash(&other), base);
        let mut none = row();
        none.tenant = None;
        assert_ne!(row_hash(&none), base);
    }

    #[test]
    fn outcomes_sort_statuses() {
        assert_eq!(outcome(202), "allowed");
        assert_eq!(outcome(403), "denied");
        assert_eq!(outcome(429), "denied");
        assert_eq!(outcome(422), "failed");
    }
}
