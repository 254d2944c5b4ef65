//! Zones and the catalog (flavors, images, machine classes, Kubernetes versions,
//! storage classes).

use crate::domain::spec::Category;
use sqlx::PgExecutor;

/// One catalog entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CatalogRow {
    /// Its group, as stored (`flavor`, `image`, …).
    pub category: String,
    /// Its name.
    pub name: String,
    /// Free-form attributes (sizes, limits).
    pub attributes: serde_json::Value,
}

/// A zone row, with where it is served.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ZoneRow {
    /// Its name.
    pub name: String,
    /// Free text for humans.
    pub description: String,
    /// The region that owns it (`None` in a single-region installation).
    pub region: Option<String>,
    /// Whether this installation serves it (its region is this one's).
    pub local: bool,
    /// The public URL of its region's gateway, when another region serves it.
    pub url: Option<String>,
}

const ZONES: &str = "SELECT z.name, z.description, z.region,
        z.region IS NOT DISTINCT FROM c.region AS local, r.url
   FROM zones z CROSS JOIN replication_clock c LEFT JOIN regions r ON r.name = z.region";

/// The entries named by `(category, name)` pairs that exist; missing ones are absent.
pub async fn find(
    db: impl PgExecutor<'_>,
    wanted: &[(Category, &str)],
) -> sqlx::Result<Vec<CatalogRow>> {
    let categories: Vec<&str> = wanted.iter().map(|(c, _)| c.as_str()).collect();
    let names: Vec<&str> = wanted.iter().map(|(_, n)| *n).collect();
    sqlx::query_as(
        "SELECT c.category, c.name, c.attributes
         FROM catalog c
         JOIN unnest($1::text[], $2::text[]) AS w(category, name)
           ON c.category = w.category AND c.name = w.name",
    )
    .bind(&categories)
    .bind(&names)
    .fetch_all(db)
    .await
}

/// Every entry of one category, by name.
pub async fn list(db: impl PgExecutor<'_>, category: Category) -> sqlx::Result<Vec<CatalogRow>> {
    sqlx::query_as(
        "SELECT category, name, attributes FROM catalog WHERE category = $1 ORDER BY name",
    )
    .bind(category.as_str())
    .fetch_all(db)
    .await
}

/// Every zone, by name.
pub async fn zones(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<ZoneRow>> {
    sqlx::query_as(&format!("{ZONES} ORDER BY z.name"))
        .fetch_all(db)
        .await
}

/// One zone, if it exists (in any region).
pub async fn zone(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Option<ZoneRow>> {
    sqlx::query_as(&format!("{ZONES} WHERE z.name = $1"))
        .bind(name)
        .fetch_optional(db)
        .await
}

/// Whether a zone exists (in any region).
pub async fn zone_exists(db: impl PgExecutor<'_>, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM zones WHERE name = $1)")
        .bind(name)
        .fetch_one(db)
        .await
}
