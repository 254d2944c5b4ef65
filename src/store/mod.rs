//! All SQL lives here, one module per table group.
//!
//! Functions that write take `&mut PgConnection`, so callers compose them inside one
//! transaction (the outbox invariant depends on it); reads take any executor.
//! Queries are built at run time with `sqlx::query_as` rather than the `query!` macros,
//! so the build needs neither a database nor committed offline data; every query is
//! exercised by the integration tests against a real PostgreSQL instead.
//!
//! Row locks are `FOR NO KEY UPDATE`, never `FOR UPDATE`: no statement changes a
//! primary key, and the weaker lock does not conflict with the `KEY SHARE` locks that
//! foreign-key checks take. With `FOR UPDATE`, a report holding its resource row
//! deadlocked with a relay whose second update of an operation row (in one
//! transaction) re-checks that row's foreign key to the same resource.
//!
//! **Architecture invariant:** nothing outside this module writes SQL.

pub mod audit;
pub mod catalog;
pub mod creates;
pub mod events;
pub mod health;
pub mod operations;
pub mod outbox;
pub mod principals;
pub mod quotas;
pub mod replication;
pub mod resource_types;
pub mod resources;
pub mod tenants;
pub mod webhooks;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// Migrations embedded at build time from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Options every gateway connection gets: short transactions are enforced by the server,
/// so a stalled relay or handler can never hold locks or bloat tables for long.
fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .context("DATABASE_URL: not a valid PostgreSQL URL")?
        .options([
            ("idle_in_transaction_session_timeout", "30s"),
            ("statement_timeout", "30s"),
            // Never compile a query: a plan that must scan a table whole (a trigger's
            // read of a one-row table) costs `enable_seqscan = off`'s 10^10 in the
            // transactions `begin` starts, past every JIT threshold, and each such
            // statement was compiled anew, some 13 ms a time (a tenant's insert took 25
            // ms for its two replication triggers). The gateway's statements are short
            // and read through indexes; none gains from JIT.
            ("jit", "off"),
        ])
        .application_name("gateway")
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// A pooled connection idle at least this long is checked (a round trip) before it is
/// handed out; one used more recently is not.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Opens a pool on `url`, creating the database first if it does not exist.
///
/// sqlx checks every idle connection with a round trip before handing it out (and again
/// when it comes back): under load, a third of the pool's round trips for a one-query
/// read. Only connections idle for [`PING_IF_IDLE_FOR`] are checked here: those are the
/// ones a database restart or an idle timeout may have closed meanwhile. A connection
/// that died in less time fails its first query, which is answered `503` like any other
/// loss of the database, and is discarded when it comes back.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = connect_options(url)?;
    create_database_if_missing(&options).await?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                crate::config::redact_url(url)
            )
        })
}

/// Applies the embedded migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .context(
            "connecting to PostgreSQL (database `postgres`) to check that the database exists",
        )?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        match sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our create.
            Err(e) if is_unique_violation(&e) || pg_code(&e).as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("creating the database"),
        }
    }
    Ok(())
}

/// `INSERT INTO {into} SELECT * FROM UNNEST(…)`, one array parameter per column of
/// `types` (its SQL type), numbered from `$first`: a batch of any size inserted by one
/// statement whose text never changes, so it is prepared once per connection. `first`
/// lets a larger statement (a group commit's) hold several such inserts.
pub(crate) fn unnest_insert(into: &str, first: usize, types: &[&str]) -> String {
    let arrays: Vec<String> = (first..)
        .zip(types)
        .map(|(n, t)| format!("${n}::{t}[]"))
        .collect();
    format!(
        "INSERT INTO {into} SELECT * FROM UNNEST({})",
        arrays.join(", ")
    )
}

/// A list page's query, built from only the filters its request gave (an `AND` clause
/// with a parameter for each) and with its limit written into the text.
///
/// Why not one text for every request, each filter `($n IS NULL OR column = $n)` and
/// `LIMIT $m`: PostgreSQL then plans every execution anew (a custom plan), since a
/// generic plan of such a text cannot tell which filters apply, nor how many rows the
/// limit takes. Measured on a page of 100 VMs with `EXPLAIN (ANALYZE)` over a prepared
/// statement: planning took 0.07 ms of each execution on an empty table and 0.10 ms
/// beside 1,000,000 other tenants' rows (more statistics to weigh), about as long as
/// executing it. A text per shape is planned once per connection and kept (0.01 ms),
/// the same on a grown table.
///
/// The limit is written as one of a few sizes ([`PAGE_SIZES`]): the smallest that holds
/// the rows asked for, the extra rows fetched dropped. So the shapes stay few (the
/// filters a route offers, times eleven sizes) whatever page sizes clients ask for.
/// sqlx keeps each connection's prepared statements in a bounded cache (100, least
/// recently used first out): with the limit written as asked (1 to 500 rows a page, plus
/// the one that says there is more), a client cycling through page sizes prepared a
/// statement per size and pushed the other statements, the creates' and reports' among
/// them, out of the caches of the connections it was served on.
pub(crate) struct Filtered<'a> {
    query: sqlx::QueryBuilder<'a, sqlx::Postgres>,
    conditions: usize,
}

impl<'a> Filtered<'a> {
    /// Starts with `select`, a `SELECT … FROM …` without conditions.
    pub fn new(select: impl Into<String>) -> Self {
        Self {
            query: sqlx::QueryBuilder::new(select),
            conditions: 0,
        }
    }

    /// Adds a condition, written by the caller on the builder this returns (with its
    /// parameters bound by `push_bind`).
    pub fn condition(&mut self) -> &mut sqlx::QueryBuilder<'a, sqlx::Postgres> {
        self.conditions += 1;
        let joint = if self.conditions == 1 {
            " WHERE "
        } else {
            " AND "
        };
        self.query.push(joint)
    }

    /// Adds a condition without parameters.
    pub fn holds(&mut self, condition: &str) -> &mut Self {
        self.condition().push(condition);
        self
    }

    /// Adds the condition `{condition}$n` with `value` as `$n`; `condition` ends with its
    /// operator (`"tenant = "`), and holds no parameter of its own.
    pub fn is<T>(&mut self, condition: &str, value: T) -> &mut Self
    where
        T: 'a + sqlx::Encode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        self.condition().push(condition).push_bind(value);
        self
    }

    /// [`Filtered::is`], when there is a value (a filter the request gave).
    pub fn and<T>(&mut self, condition: &str, value: Option<T>) -> &mut Self
    where
        T: 'a + sqlx::Encode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        if let Some(value) = value {
            self.is(condition, value);
        }
        self
    }

    /// Adds `{row} < ($n, $m)` with `after`'s two values, when there are: a keyset page's
    /// "after the last row of the previous page" for a descending order.
    pub fn before<A, B>(&mut self, row: &str, after: Option<(A, B)>) -> &mut Self
    where
        A: 'a + sqlx::Encode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
        B: 'a + sqlx::Encode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        if let Some((a, b)) = after {
            let query = self.condition().push(row).push(" < (");
            query.push_bind(a).push(", ").push_bind(b).push(")");
        }
        self
    }

    /// Ends it with `ORDER BY {order}` and a limit of [`page_size`]`(limit)`, and fetches
    /// the first `limit` rows.
    pub async fn page<R>(
        mut self,
        db: impl sqlx::PgExecutor<'_>,
        order: &str,
        limit: i64,
    ) -> sqlx::Result<Vec<R>>
    where
        R: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.order(order, limit);
        let mut rows: Vec<R> = self.query.build_query_as().fetch_all(db).await?;
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(rows)
    }

    fn order(&mut self, order: &str, limit: i64) {
        self.query
            .push(format!(" ORDER BY {order} LIMIT {}", page_size(limit)));
    }
}

/// The limits a page query's text is written with: the API's page sizes people pick
/// (1, 2, 4, 8, 16, 25, 50, 100 — the default —, 200, 250, 500 — the most —), each
/// plus the row that says there is a next page.
pub(crate) const PAGE_SIZES: [i64; 11] = [2, 3, 5, 9, 17, 26, 51, 101, 201, 251, 501];

/// The limit written for a page of `limit` rows: the smallest of [`PAGE_SIZES`] that
/// holds them (at most twice as many), or `limit` itself past the largest.
pub(crate) fn page_size(limit: i64) -> i64 {
    let limit = limit.max(0);
    PAGE_SIZES
        .into_iter()
        .find(|&size| size >= limit)
        .unwrap_or(limit)
}

/// Begins a transaction on `pool`, on a connection the database has not ended
/// ([`again_if_ended`]): `BEGIN` is what fails on an ended one, before anything of the
/// caller's ran.
///
/// The begin runs in a task of its own, to its end whatever becomes of the caller: sqlx
/// (0.8.6; launchbadge/sqlx#4393) counts a transaction only once `BEGIN`'s answer is
/// read, so a begin cancelled before that (a client gone, a request's deadline) left
/// the connection inside a transaction that nothing rolled back, and the pool handed it
/// to the next request, whose writes ran in it, were answered, and were never committed.
/// Finished in its task, a begin whose caller is gone is a transaction dropped: rolled
/// back before the connection is used again.
pub async fn begin(pool: &PgPool) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let pool = pool.clone();
    let begun = tokio::spawn(async move { again_if_ended(&pool, || pool.begin_with(BEGIN)).await });
    match begun.await {
        Ok(tx) => tx,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(sqlx::Error::PoolClosed),
    }
}

/// How [`begin`] begins, in one round trip: every statement of the transactions that
/// change state runs its generic plan (planned once per connection, where a custom plan
/// was made at every execution: the `UNNEST` batches' generic estimate of ten rows priced
/// it above a custom plan for one), and a plan never scans a table whole where an index
/// can answer (every statement of these transactions reads by key or through an index;
/// a generic plan made while a table was nearly empty would otherwise keep its scans as
/// the table grows, while nothing analyzes it).
const BEGIN: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// How long [`again_if_ended`] goes on trying. Ended connections fail at once (the end
/// is already in their sockets), so a pool's worth of them fits well within it; a
/// connection that cannot be made at all (a host gone, a network cut) fails slower and
/// is not tried again past it, so an outage is still answered within the pool's
/// acquire timeout, and the health check takes over.
pub const ENDED_RETRY_WINDOW: Duration = Duration::from_millis(250);

/// Runs `work` (a fresh future each time), and again while it fails because the pooled
/// connection it got had been ended by the database: only for work that has no effect
/// when it fails so (a read, a `BEGIN`).
///
/// A pooled connection used within the last [`PING_IF_IDLE_FOR`] is handed out
/// unchecked, to save a round trip; if the database ended it meanwhile
/// (`pg_terminate_backend`, a proxy dropping connections, a restart), the first
/// statement fails on it and sqlx discards it. When the database ended them all, each
/// idle one fails in turn until a new connection is made, so this tries at most the
/// pool's size over, and only within [`ENDED_RETRY_WINDOW`]; then the error stands.
pub async fn again_if_ended<T, F, Fut>(pool: &PgPool, mut work: F) -> sqlx::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let started = std::time::Instant::now();
    let mut tries = pool.options().get_max_connections() + 1;
    loop {
        match work().await {
            Err(e)
                if tries > 1
                    && started.elapsed() < ENDED_RETRY_WINDOW
                    && is_ended_connection(&e) =>
            {
                tracing::debug!(error = %e, "a pooled connection had been ended; again on another");
                tries -= 1;
            }
            done => return done,
        }
    }
}

/// Whether `e` says the connection itself is gone (closed, or ended by the server), as
/// opposed to the pool being exhausted or the statement being refused.
pub fn is_ended_connection(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_))
        || matches!(pg_code(e), Some(c) if c.starts_with("08") || c.starts_with("57P0"))
}

/// Checks that the database answers.
pub async fn ping(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// Tries to take the session advisory lock `key` on `conn`; held until the connection
/// closes.
pub async fn try_advisory_lock(conn: &mut PgConnection, key: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
}

/// Takes a transaction-scoped advisory lock on `key`, waiting for it.
pub async fn advisory_xact_lock(conn: &mut PgConnection, key: i64) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(key)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Takes the transaction-scoped advisory locks `keys`, one after another in the order
/// given (callers sort them, so that two transactions never wait on each other in a
/// cycle), in one statement.
pub async fn advisory_xact_locks(conn: &mut PgConnection, keys: &[i64]) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::bigint[]) AS k")
        .bind(keys)
        .execute(conn)
        .await
        .map(|_| ())
}

/// The SQLSTATE of a database error, if it is one.
pub fn pg_code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The constraint a database error violated, if any.
pub fn violated_constraint(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// Whether `e` is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Whether `e` means the database could not be reached (as opposed to a bad query), or
/// cannot do the work for now: a server that is read-only (`25006`), as a standby or a
/// demoted primary is while a failover moves the writable address; a statement it
/// cancelled (`57014`: the `statement_timeout` ran out, say waiting for a lock, or an
/// operator cancelled it; the transaction is rolled back); a server out of resources
/// (class `53`: too many connections, disk full, out of memory).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
    ) || matches!(pg_code(e), Some(c) if c.starts_with("08") || c.starts_with("57P")
            || c.starts_with("53") || c == "57014" || c == "25006")
        || is_refused_tls_request(e)
}

/// Whether `e` is sqlx's answer to a connection closed before the server said whether
/// it speaks TLS: a proxy or load balancer in front of a database that is gone accepts
/// the connection and closes it, and sqlx reads that end of stream as the byte 0
/// ("unexpected response from SSLRequest: 0x00"), a protocol error, not an I/O one.
fn is_refused_tls_request(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Protocol(m) if m.starts_with("unexpected response from SSLRequest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The text of a page query: only the filters given, each its own parameter,
    /// joined by `WHERE` then `AND`, and the limit written in (never negative).
    #[test]
    fn a_page_query_holds_only_the_filters_given() {
        let text = |zone: Option<&'static str>, after: Option<(i64, i64)>, limit: i64| {
            let mut q = Filtered::new("SELECT id FROM t");
            q.is("tenant = ", "a")
                .holds("gone IS NULL")
                .and("zone = ", zone)
                .before("(at, id)", after);
            q.order("at DESC, id DESC", limit);
            q.query.sql().to_owned()
        };
        assert_eq!(
            text(None, None, 101),
            "SELECT id FROM t WHERE tenant = $1 AND gone IS NULL ORDER BY at DESC, id DESC LIMIT 101"
        );
        assert_eq!(
            text(Some("z"), Some((1, 2)), 30),
            "SELECT id FROM t WHERE tenant = $1 AND gone IS NULL AND zone = $2 \
             AND (at, id) < ($3, $4) ORDER BY at DESC, id DESC LIMIT 51"
        );
        // Every page the API serves (1 to 500 rows, and one more) is written with one of
        // eleven limits, each holding the rows asked for and at most twice as many.
        let texts: std::collections::HashSet<String> =
            (2..=501).map(|limit| text(None, None, limit)).collect();
        assert_eq!(texts.len(), PAGE_SIZES.len());
        for limit in 2..=501 {
            let size = page_size(limit);
            assert!(size >= limit && size < 2 * limit, "{limit}: {size}");
        }
        assert_eq!(page_size(-5), 2);
        assert_eq!(page_size(1000), 1000);
        let mut none = Filtered::new("SELECT id FROM t");
        none.and("zone = ", None::<&str>).and("kind = ", Some("vm"));
        assert_eq!(none.query.sql(), "SELECT id FROM t WHERE kind = $1");
    }

    fn ended() -> sqlx::Error {
        sqlx::Error::Io(std::io::ErrorKind::UnexpectedEof.into())
    }

    /// A pool that never connects: `again_if_ended` only reads its size.
    fn pool_of(size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
    }

    #[tokio::test]
    async fn ended_connections_are_passed_over_up_to_the_pools_size() {
        let calls = AtomicU32::new(0);
        let work = || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=4 => Err(ended()),
                _ => Ok("answered"),
            }
        };
        assert_eq!(again_if_ended(&pool_of(8), work).await.unwrap(), "answered");
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        // Never more than the pool's size over.
        calls.store(0, Ordering::SeqCst);
        let always = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(ended())
        };
        assert!(again_if_ended(&pool_of(3), always).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Other errors are the caller's at once.
        calls.store(0, Ordering::SeqCst);
        let refused = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(sqlx::Error::RowNotFound)
        };
        assert!(again_if_ended(&pool_of(8), refused).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A connection that cannot be made fails slowly (a host gone): it is not tried a
    /// pool's worth of times over, which would keep an outage's first requests waiting
    /// for minutes instead of answering 503 within the acquire timeout.
    #[tokio::test]
    async fn slow_failures_are_not_tried_past_the_window() {
        let calls = AtomicU32::new(0);
        let slow = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<(), _>(ended())
        };
        let started = std::time::Instant::now();
        assert!(again_if_ended(&pool_of(40), slow).await.is_err());
        assert!(calls.load(Ordering::SeqCst) <= 4, "{calls:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Found by `deploy_kubernetes::failover`: behind a proxy whose database had just
    /// died, two creates were answered `500` instead of `503 database_unavailable`.
    #[tokio::test]
    async fn a_connection_closed_by_a_proxy_before_the_tls_answer_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                // As a proxy does: it takes what the client sent, finds no database
                // to pass it to, and closes the connection.
                let mut request = [0u8; 8];
                let _ = conn.read_exact(&mut request).await;
                let _ = conn.shutdown().await;
            }
        });
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/gone"))
            .unwrap();
        let e = sqlx::query("SELECT 1").execute(&pool).await.unwrap_err();
        assert!(is_unavailable(&e), "{e:?}");
        let bug = sqlx::Error::Protocol("no resource type x is registered".into());
        assert!(!is_unavailable(&bug), "other protocol errors stay internal");
    }
}
