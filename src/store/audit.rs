//! The audit log's rows. Rows are inserted unsealed and chained afterwards by the
//! sealer; the hash chain itself is computed in `crate::audit`.

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

const COLUMNS: &str = "id, at, principal_id, principal_name, tenant, action, target, outcome, \
                       status, request_id, source, chain_seq, prev_hash, hash";

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

/// The last sealed row's place in the chain and hash, if any.
pub async fn chain_head(conn: &mut PgConnection) -> sqlx::Result<Option<(i64, Vec<u8>)>> {
    sqlx::query_as(
        "SELECT chain_seq, hash FROM audit_log WHERE chain_seq IS NOT NULL
         ORDER BY chain_seq DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await
}

/// Committed rows not yet sealed, oldest first.
pub async fn unsealed(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM audit_log WHERE hash IS NULL ORDER BY id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Seals rows: `(id, chain_seq, prev_hash, hash)` each, in one statement.
pub async fn seal(
    conn: &mut PgConnection,
    seals: &[(i64, i64, Vec<u8>, Vec<u8>)],
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE audit_log a SET chain_seq = s.chain_seq, prev_hash = s.prev_hash, hash = s.hash
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[])
             AS s(id, chain_seq, prev_hash, hash)
         WHERE a.id = s.id",
    )
    .bind(seals.iter().map(|s| s.0).collect::<Vec<_>>())
    .bind(seals.iter().map(|s| s.1).collect::<Vec<_>>())
    .bind(seals.iter().map(|s| s.2.clone()).collect::<Vec<_>>())
    .bind(seals.iter().map(|s| s.3.clone()).collect::<Vec<_>>())
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
    sqlx::query_as(&format!(
        "SELECT {COLUMNS},
                (SELECT p.tenant FROM principals p WHERE p.id = audit_log.principal_id)
                    AS principal_tenant
         FROM audit_log
         WHERE ($1::text IS NULL OR tenant = $1)
           AND ($2::uuid IS NULL OR principal_id = $2)
           AND ($2::uuid IS NULL OR $7::text IS NULL
                OR EXISTS (SELECT 1 FROM principals p WHERE p.id = $2 AND p.tenant = $7))
           AND ($3::text IS NULL OR outcome = $3)
           AND ($4::timestamptz IS NULL OR at >= $4)
           AND ($5::bigint IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6"
    ))
    .bind(&f.tenant)
    .bind(f.principal_id)
    .bind(&f.outcome)
    .bind(f.since)
    .bind(before_id)
    .bind(limit)
    .bind(&f.principals_of)
    .fetch_all(db)
    .await
}

/// Sealed rows in chain order, strictly after place `after_seq`.
pub async fn chain_page(
    db: impl PgExecutor<'_>,
    after_seq: i64,
    limit: i64,
) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM audit_log WHERE chain_seq > $1 ORDER BY chain_seq LIMIT $2"
    ))
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db)
    .await
}
