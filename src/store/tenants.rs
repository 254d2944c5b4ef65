//! Tenants.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

/// A tenant row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TenantRow {
    /// Its ID, a DNS label chosen by the admin.
    pub id: String,
    /// Free text for humans.
    pub display_name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// Inserts a tenant; `None` if the ID is taken.
pub async fn insert(
    conn: &mut PgConnection,
    id: &str,
    display_name: &str,
) -> sqlx::Result<Option<TenantRow>> {
    sqlx::query_as(
        "INSERT INTO tenants (id, display_name) VALUES ($1, $2)
         ON CONFLICT (id) DO NOTHING
         RETURNING id, display_name, created_at",
    )
    .bind(id)
    .bind(display_name)
    .fetch_optional(conn)
    .await
}

/// One tenant.
pub async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<TenantRow>> {
    sqlx::query_as("SELECT id, display_name, created_at FROM tenants WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Locks one tenant's row for the rest of the transaction (serializing writes that
/// count something of the tenant, such as its webhooks).
pub async fn lock(conn: &mut sqlx::PgConnection, id: &str) -> sqlx::Result<Option<TenantRow>> {
    sqlx::query_as(
        "SELECT id, display_name, created_at FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Every tenant, by ID.
pub async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<TenantRow>> {
    sqlx::query_as("SELECT id, display_name, created_at FROM tenants ORDER BY id")
        .fetch_all(db)
        .await
}
