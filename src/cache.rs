//! A read-through cache of the catalog and the zones: static data every write checks;
//! and of which tenants exist (positive answers only: tenants are never deleted, and a
//! tenant made a moment ago on another replica is found by the read a miss makes).
//!
//! Entries live for [`TTL`]; unknown names are cached too (as absent), so a client
//! hammering an invalid flavor does not reach the database either. A catalog change made
//! with SQL is therefore seen within [`TTL`] by every replica. Hits and misses are
//! counted in `gateway_cache_requests_total{cache, result}`.

use crate::domain::spec::Category;
use crate::metrics::Metrics;
use crate::store::catalog::{self, ZoneRow};
use moka::future::Cache;
use serde_json::Value;
use sqlx::PgConnection;
use std::sync::Arc;
use std::time::Duration;

/// How long an entry is trusted.
pub const TTL: Duration = Duration::from_secs(60);
/// How long a zone (and where it is served) is trusted: short, since with regions a
/// zone's row arrives, and may change hands, through replication.
pub const ZONE_TTL: Duration = Duration::from_secs(5);
/// Entries kept at most (per cache).
const CAPACITY: u64 = 10_000;

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct CatalogCache {
    entries: Cache<(Category, String), Option<Arc<Value>>>,
    zones: Cache<String, Option<Arc<ZoneRow>>>,
    tenants: Cache<String, ()>,
    metrics: Metrics,
}

impl Default for CatalogCache {
    /// A cache whose counters are registered nowhere.
    fn default() -> Self {
        Self::new(Metrics::default())
    }
}

impl CatalogCache {
    /// An empty cache counting into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
            zones: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ZONE_TTL)
                .build(),
            tenants: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
            metrics,
        }
    }

    /// The attributes of catalog entry `name` in `category`, or `None` if there is none.
    ///
    /// A miss reads through `conn`, the caller's connection: taking a second one from the
    /// pool while holding one could exhaust the pool under load.
    pub async fn entry(
        &self,
        conn: &mut PgConnection,
        category: Category,
        name: &str,
    ) -> sqlx::Result<Option<Arc<Value>>> {
        let key = (category, name.to_owned());
        if let Some(found) = self.entries.get(&key).await {
            self.metrics.cache_lookup("catalog", true);
            return Ok(found);
        }
        self.metrics.cache_lookup("catalog", false);
        let found = catalog::find(&mut *conn, &[(category, name)])
            .await?
            .into_iter()
            .next()
            .map(|row| Arc::new(row.attributes));
        self.entries.insert(key, found.clone()).await;
        Ok(found)
    }

    /// Whether tenant `id` exists. Only answers "yes" are kept, so a tenant created
    /// since is never missed.
    pub async fn tenant_exists(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        id: &str,
    ) -> sqlx::Result<bool> {
        if self.tenants.get(id).await.is_some() {
            self.metrics.cache_lookup("tenants", true);
            return Ok(true);
        }
        self.metrics.cache_lookup("tenants", false);
        let found = crate::store::tenants::get(db, id).await?.is_some();
        if found {
            self.tenants.insert(id.to_owned(), ()).await;
        }
        Ok(found)
    }

    /// Whether zone `name` exists (in any region).
    pub async fn zone_exists(&self, conn: &mut PgConnection, name: &str) -> sqlx::Result<bool> {
        Ok(self.zone(conn, name).await?.is_some())
    }

    /// [`Self::zone`] on a connection of `pool`, for callers outside a transaction.
    pub async fn zone_outside(
        &self,
        pool: &sqlx::PgPool,
        name: &str,
    ) -> sqlx::Result<Option<Arc<ZoneRow>>> {
        if let Some(found) = self.zones.get(name).await {
            self.metrics.cache_lookup("zones", true);
            return Ok(found);
        }
        let mut conn = pool.acquire().await?;
        self.zone(&mut conn, name).await
    }

    /// Zone `name` and where it is served, if it exists. An unknown zone is only cached
    /// for a moment: it may be another region's, on its way here.
    pub async fn zone(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> sqlx::Result<Option<Arc<ZoneRow>>> {
        if let Some(found) = self.zones.get(name).await {
            self.metrics.cache_lookup("zones", true);
            return Ok(found);
        }
        self.metrics.cache_lookup("zones", false);
        let found = catalog::zone(&mut *conn, name).await?.map(Arc::new);
        self.zones.insert(name.to_owned(), found.clone()).await;
        Ok(found)
    }
}
