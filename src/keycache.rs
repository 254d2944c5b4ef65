//! Resolved API keys, cached for at most `GATEWAY_KEY_CACHE_MS` (1 s by default), so most
//! requests authenticate without a database round trip.
//!
//! Revocation is a security promise, so the cache keeps it:
//! - every change of a key (revoked, expired, rotated, deleted) notifies the `principals`
//!   channel (migration 0014), and every gateway drops its whole cache when it hears it
//!   ([`KeyCache::follow`]); the gateway that revoked a key drops it before it answers;
//! - an entry lives at most the cache's lifetime, so even a notification lost with its
//!   connection keeps a revoked key working for at most that long on another replica;
//! - a key's own `expires_at` is checked at every use, cached or not.
//!
//! Unknown keys are cached too (as absent), so a client hammering a wrong key does not
//! reach the database either. A miss reads the database with the request; its error (a
//! database that is down) is the request's, as without the cache. Hits and misses are
//! counted in `gateway_cache_requests_total{cache="keys"}`.

use crate::metrics::Metrics;
use crate::store;
use crate::store::principals::{self, PrincipalRow};
use moka::future::Cache;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The channel the `principals` trigger notifies.
pub const CHANNEL: &str = "principals";

/// Keys cached at most.
const CAPACITY: u64 = 100_000;

/// The cache of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct KeyCache {
    pool: PgPool,
    /// `None`: caching is off (`GATEWAY_KEY_CACHE_MS=0`).
    entries: Option<Cache<Vec<u8>, Option<Arc<PrincipalRow>>>>,
    metrics: Metrics,
}

impl KeyCache {
    /// A cache of keys resolved through `pool`, each kept at most `ttl` (zero: none).
    pub fn new(pool: PgPool, ttl: Duration, metrics: Metrics) -> Self {
        let entries = (!ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl)
                .build()
        });
        Self {
            pool,
            entries,
            metrics,
        }
    }

    /// The live principal whose key hashes to `hash`, if any.
    pub async fn resolve(&self, hash: Vec<u8>) -> sqlx::Result<Option<Arc<PrincipalRow>>> {
        let find = || {
            store::again_if_ended(&self.pool, || {
                principals::find_live_by_hash(&self.pool, &hash)
            })
        };
        let Some(entries) = &self.entries else {
            return Ok(find().await?.map(Arc::new));
        };
        let cached = entries.get(&hash).await;
        self.metrics.cache_lookup("keys", cached.is_some());
        let found = match cached {
            Some(found) => found,
            None => {
                let row = find().await?;
                let row = row.map(Arc::new);
                entries.insert(hash, row.clone()).await;
                row
            }
        };
        let now = chrono::Utc::now();
        Ok(found.filter(|p| p.expires_at.is_none_or(|t| t > now)))
    }

    /// Drops every cached key: the next use of each reads the database.
    pub fn invalidate_all(&self) {
        if let Some(entries) = &self.entries {
            entries.invalidate_all();
        }
    }

    /// Drops the cache whenever a key changes anywhere (and after the listening
    /// connection is lost), until `shutdown`.
    pub async fn follow(self, shutdown: CancellationToken) {
        let (pool, every) = (self.pool.clone(), Duration::from_secs(30));
        crate::notify::follow(pool, CHANNEL, every, shutdown, || {
            self.invalidate_all();
            std::future::ready(())
        })
        .await;
    }
}
