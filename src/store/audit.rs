//! The audit log's rows and their chain. Rows are inserted unsealed; the sealer
//! appends their links to `audit_chain` afterwards (migration 0019), in `(xid, id)`
//! order. The hash chain itself is computed in `crate::audit`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// One audit row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Its ID (insertion order).
    pub id: i64,
    /// When the request was answered (microsecond precision).
    pub at: DateTime<Utc>,
    /// Who asked, when known.
    pub principal_id: Option<Uuid>,
    /// Their name, when known.
    pub principal_name: Option<String>,
    /// The tenant acted on, when there is one.
    pub tenant: Option<String>,
    /// Method and route template, e.g. `POST /v1/tenants/{tenant}/{kind}`.
    pub action: String,
    /// The concrete path.
    pub target: String,
    /// `allowed`, `denied` or `failed`.
    pub outcome: String,
    /// HTTP status answered.
    pub status: i16,
    /// The request's ID.
    pub request_id: String,
    /// The client's address.
    pub source: Option<String>,
    /// Its place in the chain, once sealed.
    pub chain_seq: Option<i64>,
    /// The hash of the row before it in the chain (32 zero bytes for the first), once
    /// sealed.
    pub prev_hash: Option<Vec<u8>>,
    /// SHA-256 over `prev_hash` and this row's content, once sealed.
    pub hash: Option<Vec<u8>>,
}

/// An audit row `a` with its link `c` (from `audit_chain`, when sealed).
const COLUMNS: &str = "a.id, a.at, a.principal_id, a.principal_name, a.tenant, a.action, \
                       a.target, a.outcome, a.status, a.request_id, a.source, \
                       c.chain_seq, c.prev_hash, c.hash";

/// Inserts unsealed rows (their `id`, chain and hashes are ignored); one statement for
/// the whole batch.
pub async fn insert(conn: &mut PgConnection, rows: &[AuditRow]) -> sqlx::Result<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1));
    // No rows come back: the row type is never decoded.
    let _: Vec<(i64,)> = bind_all(sqlx::query_as(&SQL), rows).fetch_all(conn).await?;
    Ok(())
}

/// The type of each column [`insert_sql`] inserts, in its order: one array parameter each.
const INSERT_TYPES: [&str; 10] = [
    "timestamptz",
    "uuid",
    "text",
    "text",
    "text",
    "text",
    "text",
    "smallint",
    "text",
    "text",
];

/// The parameters of [`insert_sql`].
pub(super) const INSERT_PARAMS: usize = INSERT_TYPES.len();

/// The insert of unsealed rows from arrays bound from `$first` on ([`bind_all`]).
pub(super) fn insert_sql(first: usize) -> String {
    super::unnest_insert(
        "audit_log (at, principal_id, principal_name, tenant, action, target, outcome, \
         status, request_id, source)",
        first,
        &INSERT_TYPES,
    )
}

/// Binds the column arrays of `rows`, in [`insert_sql`]'s order.
pub(super) fn bind_all<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    rows: &[AuditRow],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let column = |f: fn(&AuditRow) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
    query
        .bind(rows.iter().map(|r| r.at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.principal_id).collect::<Vec<_>>())
        .bind(column(|r| r.principal_name.clone()))
        .bind(column(|r| r.tenant.clone()))
        .bind(column(|r| Some(r.action.clone())))
        .bind(column(|r| Some(r.target.clone())))
        .bind(column(|r| Some(r.outcome.clone())))
        .bind(rows.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(column(|r| Some(r.request_id.clone())))
        .bind(column(|r| r.source.clone()))
}

/// The end of the chain: the last link's place and hash, and where the sealer goes on
/// from (its row's `(xid, id)`; `xid` 0 for links made before migration 0019).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChainHead {
    /// The last link's place.
    pub chain_seq: i64,
    /// Its hash.
    pub hash: Vec<u8>,
    /// Its row's transaction ID.
    pub xid: i64,
    /// Its row's ID.
    pub audit_id: i64,
}

/// The last link of the chain, if any.
pub async fn chain_head(conn: &mut PgConnection) -> sqlx::Result<Option<ChainHead>> {
    sqlx::query_as(
        "SELECT chain_seq, hash, COALESCE(xid::text::bigint, 0) AS xid, audit_id
         FROM audit_chain ORDER BY chain_seq DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await
}

/// A row the sealer may chain, and its transaction ID.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unsealed {
    /// The row (no link yet).
    #[sqlx(flatten)]
    pub row: AuditRow,
    /// The ID of the transaction that wrote it.
    pub xid: i64,
}

/// The rows after `(xid, id)` in `(xid, id)` order, up to `limit`, whose transactions
/// are older than every transaction still running: those are final, no row can join
/// them any more, so a cursor over them meets each row once (however commits
/// interleave). Rows of transactions still running, or newer than one still running,
/// wait for a later call. (The join that never matches gives [`COLUMNS`] its link
/// columns, NULL: no link yet.)
pub async fn unsealed(
    conn: &mut PgConnection,
    after: (i64, i64),
    limit: i64,
) -> sqlx::Result<Vec<Unsealed>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS}, a.xid::text::bigint AS xid
         FROM audit_log a LEFT JOIN audit_chain c ON false
         WHERE (a.xid, a.id) > ($1::bigint::text::xid8, $2)
           AND a.xid < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY a.xid, a.id LIMIT $3"
    ))
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The most rows [`unsealed_count`] counts: ten times what the `AuditChainBehind` alert
/// fires at. Under a transaction left open for hours every row since waits, and a
/// metrics refresh (each process, every few seconds) must not read them all.
pub const UNSEALED_COUNTED: i64 = 100_000;

/// How many rows wait to be chained (those of transactions still running too), up to
/// [`UNSEALED_COUNTED`] (which then means "at least").
pub async fn unsealed_count(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "WITH head AS (SELECT COALESCE(xid, '0') AS xid, audit_id FROM audit_chain
                       ORDER BY chain_seq DESC LIMIT 1)
         SELECT count(*) FROM (
             SELECT 1 FROM audit_log a
             WHERE (a.xid, a.id) > (COALESCE((SELECT xid FROM head), '0'),
                                    COALESCE((SELECT audit_id FROM head), 0))
             LIMIT $1) waiting",
    )
    .bind(UNSEALED_COUNTED)
    .fetch_one(db)
    .await
}

/// Whether every transaction that had begun when `since` was taken
/// ([`transactions_begun`]) has ended.
pub async fn transactions_ended(db: impl PgExecutor<'_>, since: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::bigint::text::xid8")
        .bind(since)
        .fetch_one(db)
        .await
}

/// A transaction ID just assigned (to this statement's own transaction, which ends
/// with it): every transaction that has written so far has a lower one, and any that
/// writes later gets a higher one.
///
/// Not a snapshot's `xmax`, which is one past the newest transaction that has *ended*:
/// a transaction still running may have that very ID, or a higher one, and
/// [`transactions_ended`] then said it had ended while it ran (so `verify` skipped its
/// rows: found as an intact chain of no rows behind a gateway killed mid-transaction).
pub async fn transactions_begun(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(db)
        .await
}

/// A link to append: the audit row's ID and transaction ID, its place, the previous
/// link's hash and its own.
#[derive(Debug, Clone)]
pub struct Link {
    /// The audit row.
    pub audit_id: i64,
    /// Its transaction ID.
    pub xid: i64,
    /// Its place.
    pub chain_seq: i64,
    /// The hash of the link before it.
    pub prev_hash: Vec<u8>,
    /// Its hash.
    pub hash: Vec<u8>,
}

/// Appends `links` to the chain, in one statement.
pub async fn seal(conn: &mut PgConnection, links: &[Link]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_chain (chain_seq, audit_id, xid, prev_hash, hash)
         SELECT s.chain_seq, s.audit_id, s.xid::text::xid8, s.prev_hash, s.hash
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[])
             AS s(chain_seq, audit_id, xid, prev_hash, hash)",
    )
    .bind(links.iter().map(|l| l.chain_seq).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.audit_id).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.xid).collect::<Vec<_>>())
    .bind(
        links
            .iter()
            .map(|l| l.prev_hash.clone())
            .collect::<Vec<_>>(),
    )
    .bind(links.iter().map(|l| l.hash.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Filters of the audit list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this principal.
    pub principal_id: Option<Uuid>,
    /// With `principal_id`: only when that principal is a key of this tenant, so an
    /// owner cannot learn where another tenant's keys acted by filtering on their IDs.
    pub principals_of: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only rows at or after this instant.
    pub since: Option<DateTime<Utc>>,
}

/// An audit row as listed: the row, and the tenant of the key that acted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ListedRow {
    /// The row itself.
    #[sqlx(flatten)]
    pub row: AuditRow,
    /// The tenant of the row's principal; none for platform keys (admins, workers) and
    /// requests without a valid key.
    pub principal_tenant: Option<String>,
}

/// A page of rows, newest first, strictly before `before_id`.
pub async fn list(
    db: impl PgExecutor<'_>,
    f: &AuditFilter,
    before_id: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<ListedRow>> {
    let mut q = super::Filtered::new(format!(
        "SELECT {COLUMNS},
                (SELECT p.tenant FROM principals p WHERE p.id = a.principal_id)
                    AS principal_tenant
         FROM audit_log a LEFT JOIN audit_chain c ON c.audit_id = a.id"
    ));
    q.and("a.tenant = ", f.tenant.as_deref())
        .and("a.principal_id = ", f.principal_id);
    if let (Some(id), Some(tenant)) = (f.principal_id, f.principals_of.as_deref()) {
        let exists = q.condition();
        exists
            .push("EXISTS (SELECT 1 FROM principals p WHERE p.id = ")
            .push_bind(id);
        exists.push(" AND p.tenant = ").push_bind(tenant).push(")");
    }
    q.and("a.outcome = ", f.outcome.as_deref())
        .and("a.at >= ", f.since)
        .and("a.id < ", before_id);
    q.page(db, "a.id DESC", limit).await
}

/// Sealed rows in chain order, strictly after place `after_seq` (a link whose row is
/// gone is left out: the next row's link tells).
pub async fn chain_page(
    db: impl PgExecutor<'_>,
    after_seq: i64,
    limit: i64,
) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id
         WHERE c.chain_seq > $1 ORDER BY c.chain_seq LIMIT $2"
    ))
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The first row with an ID in `ids` that the chain passed over: at or before
/// `(head_xid, head_id)` (the end of the chain, in the sealer's `(xid, id)` order) and
/// yet without a link. The sealer links every row it passes, and a row is only written
/// with its own transaction's ID, which is above the end of the chain while that
/// transaction runs; so such a row was inserted behind the sealer with a transaction ID
/// not its own (or none): forged or back-dated. A range at a time, through the primary
/// key, so each statement stays well within the statement timeout however long the
/// trail.
pub async fn unchained_behind(
    db: impl PgExecutor<'_>,
    head_xid: i64,
    head_id: i64,
    ids: std::ops::Range<i64>,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT a.id FROM audit_log a
         WHERE a.id >= $3 AND a.id < $4
           AND (COALESCE(a.xid, '0'), a.id) <= ($1::bigint::text::xid8, $2)
           AND NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.audit_id = a.id)
         ORDER BY a.id LIMIT 1",
    )
    .bind(head_xid)
    .bind(head_id)
    .bind(ids.start)
    .bind(ids.end)
    .fetch_optional(db)
    .await
}

/// The highest row ID of the trail (0 when it is empty).
pub async fn last_id(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM audit_log")
        .fetch_one(db)
        .await
}

/// The hash of the link at place `chain_seq`, if there is one.
pub async fn link_hash(db: impl PgExecutor<'_>, chain_seq: i64) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT hash FROM audit_chain WHERE chain_seq = $1")
        .bind(chain_seq)
        .fetch_optional(db)
        .await
}

/// The row of the first link after place `after_seq`, if there is one.
pub async fn link_after(db: impl PgExecutor<'_>, after_seq: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT audit_id FROM audit_chain WHERE chain_seq > $1 ORDER BY chain_seq LIMIT 1",
    )
    .bind(after_seq)
    .fetch_optional(db)
    .await
}
