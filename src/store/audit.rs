//! The audit log's rows. The hash chain itself is computed in `crate::audit`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// One audit row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// Position in the chain.
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
    /// The previous row's hash (32 zero bytes for the first row).
    pub prev_hash: Vec<u8>,
    /// SHA-256 over `prev_hash` and this row's content.
    pub hash: Vec<u8>,
}

const COLUMNS: &str = "id, at, principal_id, principal_name, tenant, action, target, outcome, \
                       status, request_id, source, prev_hash, hash";

/// The hash of the last row, if any.
pub async fn last_hash(conn: &mut PgConnection) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1")
        .fetch_optional(conn)
        .await
}

/// Appends a row (the caller holds the chain's lock and computed the hash).
pub async fn insert(conn: &mut PgConnection, r: &AuditRow) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO audit_log (at, principal_id, principal_name, tenant, action, target,
             outcome, status, request_id, source, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(r.at)
    .bind(r.principal_id)
    .bind(&r.principal_name)
    .bind(&r.tenant)
    .bind(&r.action)
    .bind(&r.target)
    .bind(&r.outcome)
    .bind(r.status)
    .bind(&r.request_id)
    .bind(&r.source)
    .bind(&r.prev_hash)
    .bind(&r.hash)
    .fetch_one(conn)
    .await
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

/// Rows in chain order, strictly after `after_id`.
pub async fn chain_page(
    db: impl PgExecutor<'_>,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after_id)
    .bind(limit)
    .fetch_all(db)
    .await
}
