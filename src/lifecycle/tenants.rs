//! Creating tenants: the one rule set for the API (`POST /v1/tenants`) and the admin
//! CLI (`gateway admin create-tenant`).

use super::txn::commit_audited;
use super::{Audit, LifecycleError};
use crate::domain::names;
use crate::store::tenants::{self, TenantRow};
use sqlx::PgPool;

/// Creates tenant `id` (a DNS label), with the request's audit row.
pub async fn create(
    pool: &PgPool,
    id: &str,
    display_name: &str,
    audit: Audit<'_>,
) -> Result<TenantRow, LifecycleError> {
    names::validate_label("id", id)?;
    let mut tx = crate::store::begin(pool).await?;
    let row = tenants::insert(&mut tx, id, display_name)
        .await?
        .ok_or_else(|| LifecycleError::TenantExists(id.to_owned()))?;
    commit_audited(tx, audit).await?;
    Ok(row)
}
