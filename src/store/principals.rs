//! API keys and who they belong to.

use crate::domain::{Role, Service};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, PgExecutor, Row};
use uuid::Uuid;

/// A principal as authentication sees it.
#[derive(Debug, Clone)]
pub struct PrincipalRow {
    /// Its ID (never the key).
    pub id: Uuid,
    /// A human-readable name, unique within its tenant (or among platform keys).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The tenant of a tenant-scoped role.
    pub tenant: Option<String>,
    /// The service and zone a worker serves.
    pub scope: Option<(Service, String)>,
    /// When its key stops working, if it expires.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads a text column holding an enum's value.
fn parsed<T>(row: &PgRow, column: &str) -> sqlx::Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| t.parse::<T>())
        .transpose()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: Box::new(e),
        })
}

/// The role and the worker scope of a principals row.
fn role_and_scope(row: &PgRow) -> sqlx::Result<(Role, Option<(Service, String)>)> {
    let role = parsed::<Role>(row, "role")?.ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "role".into(),
        source: "NULL role".into(),
    })?;
    let service = parsed::<Service>(row, "service")?;
    let zone: Option<String> = row.try_get("zone")?;
    Ok((role, service.zip(zone)))
}

impl FromRow<'_, PgRow> for PrincipalRow {
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        let (role, scope) = role_and_scope(row)?;
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role,
            tenant: row.try_get("tenant")?,
            scope,
            expires_at: row.try_get("expires_at")?,
        })
    }
}

/// The live (unrevoked, unexpired) principal whose key hashes to `key_hash`.
pub async fn find_live_by_hash(
    db: impl PgExecutor<'_>,
    key_hash: &[u8],
) -> sqlx::Result<Option<PrincipalRow>> {
    sqlx::query_as(
        "SELECT id, name, role, tenant, service, zone, expires_at FROM principals
         WHERE key_hash = $1 AND revoked_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(key_hash)
    .fetch_optional(db)
    .await
}

/// What a new or rotated principal is.
#[derive(Debug, Clone)]
pub struct NewPrincipal<'a> {
    /// Name, unique within the tenant (or among platform keys); for `upsert`, an
    /// existing principal of that name gets the new key.
    pub name: &'a str,
    /// Its role.
    pub role: Role,
    /// Tenant of a tenant-scoped role.
    pub tenant: Option<&'a str>,
    /// Service and zone of a worker.
    pub scope: Option<(Service, &'a str)>,
    /// SHA-256 of the key.
    pub key_hash: &'a [u8],
}

/// The conflict target of key names: unique per tenant, and among platform keys (no
/// tenant); the unique index `principals_name_per_tenant` (migration 0006).
const NAME_CONFLICT: &str = "ON CONFLICT ((COALESCE(tenant, '')), name)";

/// Creates the principal `p.name` (of `p.tenant`, or of the platform), or gives the
/// existing one the new key, role and scope (and un-revokes it). Returns its ID.
pub async fn upsert(conn: &mut PgConnection, p: &NewPrincipal<'_>) -> sqlx::Result<Uuid> {
    sqlx::query_scalar(&format!(
        "INSERT INTO principals (id, name, role, tenant, service, zone, key_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         {NAME_CONFLICT} DO UPDATE SET
             role = EXCLUDED.role, tenant = EXCLUDED.tenant, service = EXCLUDED.service,
             zone = EXCLUDED.zone, key_hash = EXCLUDED.key_hash, revoked_at = NULL
         RETURNING id"
    ))
    .bind(named_id(p.tenant, p.name))
    .bind(p.name)
    .bind(p.role.as_str())
    .bind(p.tenant)
    .bind(p.scope.as_ref().map(|(s, _)| s.as_str()))
    .bind(p.scope.as_ref().map(|(_, z)| *z))
    .bind(p.key_hash)
    .fetch_one(conn)
    .await
}

/// The ID a principal made by name gets: the same in every region, so that two regions
/// making `bootstrap-admin` (or a pool's worker) make one principal, not two that
/// replication would find conflicting.
fn named_id(tenant: Option<&str>, name: &str) -> Uuid {
    let namespace = Uuid::from_u128(0x6761_7465_7761_792d_7072_696e_6369_7061);
    Uuid::new_v5(
        &namespace,
        format!("{}/{name}", tenant.unwrap_or("")).as_bytes(),
    )
}

/// Whether a live platform principal (one of no tenant) named `name` exists. Tenants'
/// keys may have the same names as platform keys.
pub async fn exists(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM principals
                        WHERE name = $1 AND tenant IS NULL AND revoked_at IS NULL)",
    )
    .bind(name)
    .fetch_one(db)
    .await
}

/// A key as listed (never its hash): who it is, and its lifetime.
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// The principal.
    pub principal: PrincipalRow,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it stops working.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl FromRow<'_, PgRow> for KeyRow {
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        Ok(Self {
            principal: PrincipalRow::from_row(row)?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }
}

const KEY_COLUMNS: &str =
    "id, name, role, tenant, service, zone, created_at, expires_at, revoked_at";

/// Inserts a new key; `None` if its tenant (or the platform) has a key of that name.
pub async fn insert(
    conn: &mut PgConnection,
    p: &NewPrincipal<'_>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO principals (id, name, role, tenant, service, zone, key_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         {NAME_CONFLICT} DO NOTHING
         RETURNING {KEY_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(p.name)
    .bind(p.role.as_str())
    .bind(p.tenant)
    .bind(p.scope.as_ref().map(|(s, _)| s.as_str()))
    .bind(p.scope.as_ref().map(|(_, z)| *z))
    .bind(p.key_hash)
    .bind(expires_at)
    .fetch_optional(conn)
    .await
}

/// The keys (live and revoked) of `tenant`, or with `None` the platform's (admins and
/// workers, which have no tenant), oldest first.
pub async fn list(db: impl PgExecutor<'_>, tenant: Option<&str>) -> sqlx::Result<Vec<KeyRow>> {
    let condition = match tenant {
        Some(_) => "tenant = $1",
        None => "tenant IS NULL AND $1::text IS NULL",
    };
    sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM principals WHERE {condition} ORDER BY created_at, id"
    ))
    .bind(tenant)
    .fetch_all(db)
    .await
}

/// Revokes a key; with `tenant`, only a key of that tenant. Returns whether a live key
/// was revoked.
pub async fn revoke(conn: &mut PgConnection, id: Uuid, tenant: Option<&str>) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE principals SET revoked_at = now()
         WHERE id = $1 AND revoked_at IS NULL AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(id)
    .bind(tenant)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}
