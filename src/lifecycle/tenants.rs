//! Creating tenants: the one rule set for the API (`POST /v1/tenants`) and the admin
//! CLI (`gateway admin create-tenant`).

use super::LifecycleError;
use crate::domain::names;
use crate::store::tenants::{self, TenantRow};
use sqlx::PgPool;

/// Creates tenant `id` (a DNS label).
pub async fn create(
    pool: &PgPool,
    id: &str,
    display_name: &str,
) -> Result<TenantRow, LifecycleError> {
    names::validate_label("id", id)?;
    let mut conn = pool.acquire().await?;
    tenants::insert(&mut conn, id, display_name)
        .await?
        .ok_or_else(|| LifecycleError::TenantExists(id.to_owned()))
}
