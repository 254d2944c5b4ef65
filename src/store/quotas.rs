//! Quotas: each tenant's limits (one row per tenant that has any), and what its live
//! resources consume.
//!
//! A resource's consumption is kept on its row (`vcpus`, `memory_mb`, `nodes`,
//! `storage_gb`; `count` is 1 per row), written with its spec by
//! [`super::resources::insert`] and [`super::resources::update_spec`]. Usage is their
//! sum over live rows, so a resource stops counting the moment it is deleted.

use crate::domain::quota::{Amounts, Limit, Usage};
use crate::domain::Kind;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// The limits `select` (a query of the `limits` of tenant `$1`) finds.
async fn limits(
    db: impl PgExecutor<'_>,
    select: &str,
    tenant: &str,
) -> sqlx::Result<Option<Vec<Limit>>> {
    let json: Option<serde_json::Value> = sqlx::query_scalar(select)
        .bind(tenant)
        .fetch_optional(db)
        .await?;
    json.map(decode).transpose()
}

/// Limits as stored (a JSON array).
fn decode(json: serde_json::Value) -> sqlx::Result<Vec<Limit>> {
    serde_json::from_value(json).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The limits of `tenant`; `None` when it has none.
pub async fn get(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<Option<Vec<Limit>>> {
    limits(db, "SELECT limits FROM quotas WHERE tenant = $1", tenant).await
}

/// Locks the quota rows of `tenants` for the rest of the transaction, in the order
/// given (callers sort them, so two transactions lock shared tenants in one order), and
/// returns the limits of those that have any; a tenant without limits has no row and
/// takes no lock. Every write checked against the quota takes this lock, so the checks
/// of one tenant's writes run one at a time.
pub async fn lock(
    conn: &mut PgConnection,
    tenants: &[&str],
) -> sqlx::Result<Vec<(String, Vec<Limit>)>> {
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT q.tenant, q.limits FROM UNNEST($1::text[]) WITH ORDINALITY AS t (id, n)
         JOIN quotas q ON q.tenant = t.id ORDER BY t.n FOR NO KEY UPDATE OF q",
    )
    .bind(tenants)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(|(t, j)| Ok((t, decode(j)?))).collect()
}

/// Replaces the limits of `tenant`; with none, removes its row, so its writes take no
/// quota lock at all.
pub async fn replace(conn: &mut PgConnection, tenant: &str, limits: &[Limit]) -> sqlx::Result<()> {
    if limits.is_empty() {
        sqlx::query("DELETE FROM quotas WHERE tenant = $1")
            .bind(tenant)
            .execute(conn)
            .await?;
        return Ok(());
    }
    let json = serde_json::to_value(limits).expect("limits serialize");
    sqlx::query(
        "INSERT INTO quotas (tenant, limits) VALUES ($1, $2)
         ON CONFLICT (tenant) DO UPDATE SET limits = EXCLUDED.limits, updated_at = now()",
    )
    .bind(tenant)
    .bind(json)
    .execute(conn)
    .await?;
    Ok(())
}

type UsageRow = (String, String, i64, i64, i64, i64, i64);

/// What the live resources of `tenant` consume, per kind and zone (only those with
/// resources), by kind and zone; a sum past `i64::MAX` is `i64::MAX`.
pub async fn usage(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<Vec<Usage>> {
    let rows: Vec<UsageRow> = sqlx::query_as(
        // Saturating, as the sums in `domain::quota` are: resources whose amounts add up
        // past a bigint must not make the tenant's every quota check fail.
        "SELECT kind, zone, count(*),
                LEAST(sum(vcpus), 9223372036854775807)::bigint,
                LEAST(sum(memory_mb), 9223372036854775807)::bigint,
                LEAST(sum(nodes), 9223372036854775807)::bigint,
                LEAST(sum(storage_gb), 9223372036854775807)::bigint
         FROM resources WHERE tenant = $1 AND deleted_at IS NULL
         GROUP BY kind, zone ORDER BY kind, zone",
    )
    .bind(tenant)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(kind, zone, count, vcpus, memory_mb, nodes, storage_gb)| {
            let kind = Kind::try_from(kind).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok(Usage {
                kind,
                zone,
                amounts: Amounts {
                    count,
                    vcpus,
                    memory_mb,
                    nodes,
                    storage_gb,
                },
            })
        })
        .collect()
}

/// What resource `id` consumes as recorded (`count` 1).
pub async fn footprint(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Amounts> {
    let (vcpus, memory_mb, nodes, storage_gb): (i64, i64, i64, i64) =
        sqlx::query_as("SELECT vcpus, memory_mb, nodes, storage_gb FROM resources WHERE id = $1")
            .bind(id)
            .fetch_one(db)
            .await?;
    Ok(Amounts {
        count: 1,
        vcpus,
        memory_mb,
        nodes,
        storage_gb,
    })
}
