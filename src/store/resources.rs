//! Resources: desired state (`spec`), observed state (`status`) and their generations.

use crate::domain::quota::{Amounts, Dimension};
use crate::domain::{Kind, Phase};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

const COLUMNS: &str = "id, tenant, kind, zone, name, labels, spec, status, phase, generation, \
                       observed_generation, version, created_at, updated_at, deleted_at";

/// A resource row.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct ResourceRow {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: String,
    /// Kind.
    #[sqlx(try_from = "String")]
    pub kind: Kind,
    /// Zone.
    pub zone: String,
    /// Name, unique per tenant and kind among live resources.
    pub name: String,
    /// Key/value metadata.
    pub labels: Value,
    /// Desired state.
    pub spec: Value,
    /// Observed state, as last reported by a worker.
    pub status: Value,
    /// What is happening to it.
    #[sqlx(try_from = "String")]
    pub phase: Phase,
    /// Bumped on every spec change.
    pub generation: i64,
    /// The generation a worker last converged on.
    pub observed_generation: i64,
    /// Bumped on every change of the row; the ETag.
    pub version: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When its delete succeeded.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// A resource to insert.
#[derive(Debug, Clone)]
pub struct NewResource<'a> {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: &'a str,
    /// Kind.
    pub kind: Kind,
    /// Zone.
    pub zone: &'a str,
    /// Name.
    pub name: &'a str,
    /// Validated spec.
    pub spec: &'a Value,
    /// Validated labels (a JSON object of strings).
    pub labels: &'a Value,
    /// Initial phase.
    pub phase: Phase,
    /// What it consumes, for quotas (`store::quotas`).
    pub footprint: Amounts,
}

/// Inserts a resource at generation 1.
pub async fn insert(conn: &mut PgConnection, r: &NewResource<'_>) -> sqlx::Result<ResourceRow> {
    let mut rows = insert_many(conn, std::slice::from_ref(r)).await?;
    Ok(rows.pop().expect("one row inserted"))
}

/// Inserts resources at generation 1 in one statement, in `(tenant, kind, name)` order:
/// two transactions inserting names the other also inserts then wait on each other's
/// names in one order, never in a cycle. Returns the rows in that order.
pub async fn insert_many<'a>(
    conn: &mut PgConnection,
    rs: &[NewResource<'a>],
) -> sqlx::Result<Vec<ResourceRow>> {
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("{} RETURNING {COLUMNS}", insert_sql(1)));
    let rs = in_lock_order(rs);
    bind_all(sqlx::query_as(&SQL), &rs).fetch_all(conn).await
}

/// `rs` in the order their names are inserted: `(tenant, kind, name)`.
pub(super) fn in_lock_order<'r, 'a>(rs: &'r [NewResource<'a>]) -> Vec<&'r NewResource<'a>> {
    let mut rs: Vec<&NewResource> = rs.iter().collect();
    rs.sort_by(|a, b| {
        (a.tenant, a.kind.as_str(), a.name).cmp(&(b.tenant, b.kind.as_str(), b.name))
    });
    rs
}

/// The type of each column [`insert_sql`] inserts, in its order: one array parameter each.
const INSERT_TYPES: [&str; 12] = [
    "uuid", "text", "text", "text", "text", "jsonb", "text", "jsonb", "bigint", "bigint", "bigint",
    "bigint",
];

/// The parameters of [`insert_sql`].
pub(super) const INSERT_PARAMS: usize = INSERT_TYPES.len();

/// The insert of resources at generation 1 from arrays bound from `$first` on
/// ([`bind_all`]), in the arrays' order.
pub(super) fn insert_sql(first: usize) -> String {
    super::unnest_insert(
        "resources (id, tenant, kind, zone, name, spec, phase, labels, vcpus, memory_mb, \
         nodes, storage_gb)",
        first,
        &INSERT_TYPES,
    )
}

/// Binds the column arrays of `rs`, in [`insert_sql`]'s order.
pub(super) fn bind_all<'q, 'a: 'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    rs: &'q [&'q NewResource<'a>],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let text =
        |f: for<'x> fn(&'x NewResource<'a>) -> &'x str| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
    let json = |f: for<'x> fn(&'x NewResource<'a>) -> &'x Value| {
        rs.iter().map(|r| f(r)).collect::<Vec<_>>()
    };
    let amount = |d: Dimension| rs.iter().map(|r| r.footprint.get(d)).collect::<Vec<i64>>();
    query
        .bind(rs.iter().map(|r| r.id).collect::<Vec<Uuid>>())
        .bind(text(|r| r.tenant))
        .bind(text(|r| r.kind.as_str()))
        .bind(text(|r| r.zone))
        .bind(text(|r| r.name))
        .bind(json(|r| r.spec))
        .bind(text(|r| r.phase.as_str()))
        .bind(json(|r| r.labels))
        .bind(amount(Dimension::Vcpus))
        .bind(amount(Dimension::MemoryMb))
        .bind(amount(Dimension::Nodes))
        .bind(amount(Dimension::StorageGb))
}

/// A live resource of `tenant` and `kind`.
pub async fn get_live(
    db: impl PgExecutor<'_>,
    tenant: &str,
    kind: &Kind,
    id: Uuid,
) -> sqlx::Result<Option<ResourceRow>> {
    Ok(get(db, id).await?.filter(|r| is_live_of(r, tenant, kind)))
}

/// The ID of the live resource of `tenant` and `kind` named `name`, if there is one
/// (the name is unique among them: `resources_live_name`).
pub async fn live_id_by_name(
    db: impl PgExecutor<'_>,
    tenant: &str,
    kind: &Kind,
    name: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM resources
         WHERE tenant = $1 AND kind = $2 AND name = $3 AND deleted_at IS NULL",
    )
    .bind(tenant)
    .bind(kind.as_str())
    .bind(name)
    .fetch_optional(db)
    .await
}

/// Resource `id`, live or deleted, of whichever tenant.
pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<ResourceRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM resources WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Whether `r` is a live resource of `tenant` and `kind`. Checked on the row rather than
/// in SQL: with the tenant and kind in the `WHERE` clause, PostgreSQL's generic plan
/// scans the `(tenant, kind, created_at, id)` list index for the ID — every resource of
/// the tenant per read — instead of using the primary key.
pub fn is_live_of(r: &ResourceRow, tenant: &str, kind: &Kind) -> bool {
    r.tenant == tenant && r.kind == *kind && r.deleted_at.is_none()
}

/// Locks a live resource of `tenant` and `kind` for the rest of the transaction.
pub async fn lock_live(
    conn: &mut PgConnection,
    tenant: &str,
    kind: &Kind,
    id: Uuid,
) -> sqlx::Result<Option<ResourceRow>> {
    // By primary key only (see `is_live_of`). Tenant and kind never change, so they are
    // checked before locking: no request locks another tenant's row.
    let owned: Option<(String, String)> =
        sqlx::query_as("SELECT tenant, kind FROM resources WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if owned.is_none_or(|(t, k)| t != tenant || k != kind.as_str()) {
        return Ok(None);
    }
    let row = lock(conn, id).await?;
    Ok(Some(row).filter(|r| is_live_of(r, tenant, kind)))
}

/// Locks the resources of operations `ids`, in ID order, for the rest of the
/// transaction: the lifecycle's lock order (resource before operation). Answers how many
/// resources it locked (none when no such operation exists).
pub async fn lock_of_operations(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "SELECT r.id FROM resources r
         WHERE r.id IN (SELECT resource_id FROM operations WHERE id = ANY($1))
         ORDER BY r.id FOR NO KEY UPDATE",
    )
    .bind(ids)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Locks any resource by ID for the rest of the transaction.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<ResourceRow> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resources WHERE id = $1 FOR NO KEY UPDATE"
    ))
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Replaces the desired spec, and what the resource consumes with it: a new generation.
pub async fn update_spec(
    conn: &mut PgConnection,
    id: Uuid,
    spec: &Value,
    footprint: &Amounts,
) -> sqlx::Result<ResourceRow> {
    sqlx::query_as(&format!(
        "UPDATE resources SET spec = $2, generation = generation + 1, version = version + 1,
             updated_at = now(), vcpus = $3, memory_mb = $4, nodes = $5, storage_gb = $6
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(spec)
    .bind(footprint.vcpus)
    .bind(footprint.memory_mb)
    .bind(footprint.nodes)
    .bind(footprint.storage_gb)
    .fetch_one(conn)
    .await
}

/// Replaces the labels (metadata: the version moves, the generation does not).
pub async fn set_labels(
    conn: &mut PgConnection,
    id: Uuid,
    labels: &Value,
) -> sqlx::Result<ResourceRow> {
    sqlx::query_as(&format!(
        "UPDATE resources SET labels = $2, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(labels)
    .fetch_one(conn)
    .await
}

/// Sets the phase.
pub async fn set_phase(conn: &mut PgConnection, id: Uuid, phase: Phase) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE resources SET phase = $2, version = version + 1, updated_at = now(),
             deleted_at = CASE WHEN $2 = 'deleted' THEN now() END
         WHERE id = $1",
    )
    .bind(id)
    .bind(phase.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// How an operation's end changes a resource's `status`.
#[derive(Debug, Clone)]
pub enum StatusChange<'a> {
    /// The worker observed the whole state: it replaces the old status.
    Replace(&'a Value),
    /// Keys to set over the old status (for example `last_error`).
    Merge(&'a Value),
}

/// The end of an operation, as it changes its resource ([`record_outcomes`]).
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// The resource.
    pub id: Uuid,
    /// Its new phase.
    pub phase: Phase,
    /// How its status changes.
    pub status: StatusChange<'a>,
    /// The generation the operation acted on (`0`: none).
    pub generation: i64,
}

/// Records the ends of operations on their (distinct) resources: each resource's new
/// phase, its status, and the observed generation, which never moves backwards. In the
/// same statement, answers the operations still active on those resources (the queued
/// ones that may start now), each resource's oldest first, as
/// [`super::operations::active_for_resources`] would: one round trip instead of two.
/// The ended operations must be ended already (an earlier statement of the
/// transaction): the statement's reads do not see its own writes.
pub async fn record_outcomes(
    conn: &mut PgConnection,
    outcomes: &[Outcome<'_>],
) -> sqlx::Result<Vec<super::operations::OperationRow>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH recorded AS (
                 UPDATE resources r SET
                     phase = v.phase,
                     status = CASE WHEN v.replace THEN v.status ELSE r.status || v.status END,
                     observed_generation = GREATEST(r.observed_generation, v.generation),
                     version = r.version + 1,
                     updated_at = now(),
                     deleted_at = CASE WHEN v.phase = 'deleted' THEN now() END
                 FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::jsonb[], $5::bigint[])
                     AS v(id, phase, replace, status, generation)
                 WHERE r.id = v.id
             )
             {}",
            *super::operations::ACTIVE_FOR_RESOURCES
        )
    });
    let (replace, status): (Vec<bool>, Vec<&Value>) = outcomes
        .iter()
        .map(|o| match o.status {
            StatusChange::Replace(v) => (true, v),
            StatusChange::Merge(v) => (false, v),
        })
        .unzip();
    sqlx::query_as(&SQL)
        .bind(outcomes.iter().map(|o| o.id).collect::<Vec<_>>())
        .bind(
            outcomes
                .iter()
                .map(|o| o.phase.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(replace)
        .bind(status)
        .bind(outcomes.iter().map(|o| o.generation).collect::<Vec<_>>())
        .fetch_all(conn)
        .await
}

/// Filters of a resource list.
#[derive(Debug, Clone, Default)]
pub struct ResourceFilter {
    /// Only this zone.
    pub zone: Option<String>,
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only resources created at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Only resources carrying all these labels (a JSON object of strings).
    pub labels: Option<Value>,
}

/// One page of live resources of `tenant` and `kind`, newest first, strictly after
/// `after` (the `(created_at, id)` of the last row of the previous page).
pub async fn list_live(
    db: impl PgExecutor<'_>,
    tenant: &str,
    kind: &Kind,
    filter: &ResourceFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<ResourceRow>> {
    let mut q = super::Filtered::new(format!("SELECT {COLUMNS} FROM resources"));
    q.is("tenant = ", tenant)
        .is("kind = ", kind.as_str())
        .holds("deleted_at IS NULL")
        .and("zone = ", filter.zone.as_deref())
        .and("phase = ", filter.phase.map(Phase::as_str))
        .and("created_at >= ", filter.since)
        .before("(created_at, id)", after)
        .and("labels @> ", filter.labels.as_ref());
    q.page(db, "created_at DESC, id DESC", limit).await
}
