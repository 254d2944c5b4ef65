//! Whether PostgreSQL answers, as far as this process knows: the API answers `503
//! database_unavailable` at once while it is known to be down, instead of letting every
//! request wait for the pool's acquire timeout (5 s) to say so.
//!
//! Nothing polls while the database answers. The first request that finds it
//! unavailable calls [`DbHealth::suspect`], which probes it at once (see `probe`). If
//! the probe fails, the database is marked down and probed again every
//! [`PROBE_INTERVAL`] until it answers, which marks it up: service resumes by itself.
//! A probe that succeeds at once (the pool was merely exhausted) marks nothing.

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a database known to be down is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The shared view of the database's health; clones share it.
#[derive(Clone)]
pub struct DbHealth {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    down: AtomicBool,
    probing: AtomicBool,
}

impl DbHealth {
    /// Health of the database behind `pool`, assumed up.
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                down: AtomicBool::new(false),
                probing: AtomicBool::new(false),
            }),
        }
    }

    /// Whether the database is known to be unreachable (a probe failed and none has
    /// succeeded since).
    pub fn is_down(&self) -> bool {
        self.inner.down.load(Ordering::Acquire)
    }

    /// Something found the database unavailable: probe it now, unless a probe already
    /// runs, and keep probing while it is down. Needs a Tokio runtime.
    pub fn suspect(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(self.inner.clone().probe_until_up());
    }
}

impl Inner {
    async fn probe_until_up(self: Arc<Self>) {
        loop {
            if probe(&self.pool).await {
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::info!("the database answers again");
                }
                break;
            }
            if !self.down.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    "the database is unreachable: API requests answer 503 at once until it returns"
                );
            }
            // The process is stopping: nobody needs the answer.
            if self.pool.is_closed() {
                break;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        self.probing.store(false, Ordering::Release);
    }
}

/// Whether the database runs `SELECT 1` within [`PROBE_TIMEOUT`]: on an idle pooled
/// connection if there is one, else (or if that fails) on a fresh connection, which
/// fails at once when the server is gone where the pool's `acquire` would keep retrying.
async fn probe(pool: &PgPool) -> bool {
    let attempt = async {
        if let Some(mut conn) = pool.try_acquire() {
            if ping(&mut conn).await.is_ok() {
                return Ok(());
            }
        }
        let mut conn = pool.connect_options().connect().await?;
        ping(&mut conn).await?;
        conn.close().await
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Ok(()))
    )
}

/// What keeps the database small, as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upkeep {
    /// Whether the server's `autovacuum` setting is on.
    pub autovacuum: bool,
    /// The on-disk size in bytes (indexes and TOAST included) of each table whose rows
    /// live for one relay pass, by name.
    pub queue_tables: [(&'static str, i64); 2],
}

/// Reads [`Upkeep`] in one statement.
pub async fn upkeep(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<Upkeep> {
    let (autovacuum, outbox, events): (bool, i64, i64) = sqlx::query_as(
        "SELECT current_setting('autovacuum')::bool,
                pg_total_relation_size('outbox'), pg_total_relation_size('event_outbox')",
    )
    .fetch_one(db)
    .await?;
    Ok(Upkeep {
        autovacuum,
        queue_tables: [("outbox", outbox), ("event_outbox", events)],
    })
}

/// What is wrong with the database, in words that name no host, user or database (for
/// unauthenticated answers such as `/readyz`; the error itself goes to the log).
pub fn reason(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Io(_) => "unreachable",
        sqlx::Error::Tls(_) => "TLS failed",
        sqlx::Error::PoolTimedOut => "timed out",
        sqlx::Error::PoolClosed => "closed",
        sqlx::Error::Database(_) => "refused",
        sqlx::Error::Protocol(_) => "protocol error",
        sqlx::Error::Configuration(_) => "misconfigured",
        _ => "error",
    }
}

async fn ping(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_no_host_or_user() {
        let refused = sqlx::Error::Io(std::io::Error::other(
            "connect to db.internal.example:5432 as gateway_admin",
        ));
        assert_eq!(reason(&refused), "unreachable");
        let config = sqlx::Error::Configuration("postgres://admin:pw@db.internal/x".into());
        assert_eq!(reason(&config), "misconfigured");
        assert_eq!(reason(&sqlx::Error::PoolTimedOut), "timed out");
    }

    #[tokio::test]
    async fn a_probe_that_fails_marks_the_database_down_until_the_pool_closes() {
        // A port nothing listens on: connections are refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/gone"))
            .unwrap();
        let health = DbHealth::new(pool.clone());
        assert!(!health.is_down());
        health.suspect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !health.is_down() {
            assert!(tokio::time::Instant::now() < deadline, "never marked down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Closing the pool (the process stops) stops the prober.
        pool.close().await;
        while health.inner.probing.load(Ordering::Acquire) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the prober never stopped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
