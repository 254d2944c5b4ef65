//! Operations and resources read by ID, cached for at most `GATEWAY_READ_CACHE_MS`
//! (1 s by default), so polls and resource reads repeated within that time skip the
//! database. Every change drops its rows' entries on every replica:
//!
//! - a lifecycle commit names the operations and resources it changed
//!   ([`crate::lifecycle::Txn`]); the gateway that committed drops them before it answers
//!   (so a client reads its own write on the replica that took it), and every other
//!   replica drops them when it hears the change on NATS ([`crate::changes::Changes`]),
//!   about a millisecond later;
//! - an entry lives at most the cache's lifetime, so a notification lost with NATS (or a
//!   change made with SQL) is seen within that time; while its own NATS connection is
//!   down a process reads the database instead;
//! - a read that raced a change does not store what it read: each entry's stripe counts
//!   the changes dropped in it, and a row read before a drop is not stored after it;
//! - `Cache-Control: no-cache` on a request reads the database whatever the cache holds
//!   (a client that wrote through one replica and reads through another at once).
//!
//! Writes never use the cache: they lock and read their rows in their transaction, so a
//! stale read can at worst make a client's `If-Match` fail with `412`, never lose a
//! write. Absent rows are not cached. Hits and misses are counted in
//! `gateway_cache_requests_total{cache="operations"|"resources"}`. A read that meets a
//! pooled connection the database ended is made again on another
//! ([`store::again_if_ended`]).
//!
//! Why by hand around `moka`: the stripes' counts make "drop, then never store an older
//! read" hold, which a plain cache does not (a read that started before a change could
//! otherwise store the old row after the change dropped it).

use crate::domain::Kind;
use crate::metrics::Metrics;
use crate::store;
use crate::store::operations::{self, OperationRow};
use crate::store::resources::{self, ResourceRow};
use moka::sync::Cache;
use sqlx::PgPool;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Entries kept at most, per table: about 10–20 MiB of rows.
const CAPACITY: u64 = 10_000;
/// Stripes of invalidation counts.
const STRIPES: usize = 64;

/// The cache of one process. Cheap to clone; off (every read goes to the database) when
/// made with a zero lifetime.
#[derive(Clone, Default)]
pub struct ReadCache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    operations: Cache<Uuid, Arc<OperationRow>>,
    resources: Cache<Uuid, Arc<ResourceRow>>,
    /// Changes dropped, by stripe of ID.
    stripes: [Mutex<u64>; STRIPES],
    metrics: Metrics,
}

impl ReadCache {
    /// A cache whose entries live at most `ttl` (zero: no cache).
    pub fn new(ttl: Duration, metrics: Metrics) -> Self {
        let inner = (!ttl.is_zero()).then(|| {
            Arc::new(Inner {
                operations: table(ttl),
                resources: table(ttl),
                stripes: [const { Mutex::new(0) }; STRIPES],
                metrics,
            })
        });
        Self { inner }
    }

    /// Operation `id` (whoever owns it: the caller checks who may see it).
    pub async fn operation(
        &self,
        pool: &PgPool,
        id: Uuid,
    ) -> sqlx::Result<Option<Arc<OperationRow>>> {
        let load = store::again_if_ended(pool, || operations::get(pool, id));
        let Some(inner) = &self.inner else {
            return Ok(load.await?.map(Arc::new));
        };
        inner
            .through(&inner.operations, "operations", id, load)
            .await
    }

    /// Live resource `id` of `tenant` and `kind`.
    pub async fn resource(
        &self,
        pool: &PgPool,
        tenant: &str,
        kind: &Kind,
        id: Uuid,
    ) -> sqlx::Result<Option<Arc<ResourceRow>>> {
        let load = store::again_if_ended(pool, || resources::get(pool, id));
        let row = match &self.inner {
            None => load.await?.map(Arc::new),
            Some(inner) => {
                inner
                    .through(&inner.resources, "resources", id, load)
                    .await?
            }
        };
        Ok(row.filter(|r| resources::is_live_of(r, tenant, kind)))
    }

    /// Drops the entries of `ids` (operations or resources): they changed.
    pub fn invalidate(&self, ids: impl IntoIterator<Item = Uuid>) {
        let Some(inner) = &self.inner else { return };
        for id in ids {
            let mut dropped = inner.stripe(id).lock().expect("read cache stripe");
            *dropped += 1;
            inner.operations.invalidate(&id);
            inner.resources.invalidate(&id);
        }
    }

    /// Drops every entry.
    pub fn invalidate_all(&self) {
        let Some(inner) = &self.inner else { return };
        for stripe in &inner.stripes {
            *stripe.lock().expect("read cache stripe") += 1;
        }
        inner.operations.invalidate_all();
        inner.resources.invalidate_all();
    }
}

/// A table of rows kept at most `ttl`.
fn table<T: Send + Sync + 'static>(ttl: Duration) -> Cache<Uuid, Arc<T>> {
    Cache::builder()
        .max_capacity(CAPACITY)
        .time_to_live(ttl)
        .build()
}

impl Inner {
    fn stripe(&self, id: Uuid) -> &Mutex<u64> {
        &self.stripes[(id.as_u64_pair().1 % STRIPES as u64) as usize]
    }

    /// The entry of `id` in `table`, or what `load` reads, stored unless a change of its
    /// stripe was dropped while it read.
    async fn through<T>(
        &self,
        table: &Cache<Uuid, Arc<T>>,
        name: &'static str,
        id: Uuid,
        load: impl Future<Output = sqlx::Result<Option<T>>>,
    ) -> sqlx::Result<Option<Arc<T>>>
    where
        T: Send + Sync + 'static,
    {
        if let Some(hit) = table.get(&id) {
            self.metrics.cache_lookup(name, true);
            return Ok(Some(hit));
        }
        self.metrics.cache_lookup(name, false);
        let seen = *self.stripe(id).lock().expect("read cache stripe");
        let Some(row) = load.await?.map(Arc::new) else {
            return Ok(None);
        };
        let dropped = self.stripe(id).lock().expect("read cache stripe");
        if *dropped == seen {
            table.insert(id, row.clone());
        }
        Ok(Some(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ReadCache {
        ReadCache::new(Duration::from_secs(60), Metrics::default())
    }

    #[tokio::test]
    async fn a_row_read_while_its_change_was_dropped_is_not_kept() {
        let cache = cache();
        let inner = cache.inner.as_ref().unwrap();
        let table = table::<u32>(Duration::from_secs(60));
        let id = Uuid::now_v7();
        // The change commits (and is dropped) while the read is under way: what the
        // read found is answered, but not kept.
        let racing = async {
            cache.invalidate([id]);
            Ok(Some(1))
        };
        let got = inner.through(&table, "t", id, racing).await.unwrap();
        assert_eq!(got.as_deref(), Some(&1));
        assert!(
            table.get(&id).is_none(),
            "an older read outlived the change"
        );
        // A change of another stripe does not stop it.
        let neighbour = (0..)
            .map(|_| Uuid::now_v7())
            .find(|n| !std::ptr::eq(inner.stripe(*n), inner.stripe(id)))
            .unwrap();
        let quiet = async {
            cache.invalidate([neighbour]);
            Ok(Some(2))
        };
        inner.through(&table, "t", id, quiet).await.unwrap();
        assert_eq!(table.get(&id).as_deref(), Some(&2));
        // Then served from memory, without reading.
        let unread = async { panic!("read again") };
        let hit = inner.through(&table, "t", id, unread).await.unwrap();
        assert_eq!(hit.as_deref(), Some(&2));
    }

    #[tokio::test]
    async fn absent_rows_are_not_kept_and_a_zero_lifetime_keeps_nothing() {
        let cache = cache();
        let inner = cache.inner.as_ref().unwrap();
        let table = table::<u32>(Duration::from_secs(60));
        let id = Uuid::now_v7();
        let none = inner.through(&table, "t", id, async { Ok(None) }).await;
        assert!(none.unwrap().is_none());
        assert!(table.get(&id).is_none());
        let off = ReadCache::new(Duration::ZERO, Metrics::default());
        assert!(off.inner.is_none());
        off.invalidate([id]);
        off.invalidate_all();
    }
}
