//! The registry of resource types, as every process serves it: the definitions of
//! `resource_types`, compiled once per version and kept in memory.
//!
//! Freshness, across replicas: a change notifies the `resource_types` channel and every
//! process's [`Registry::listen`] reloads (and reloads after its listening connection
//! is lost, and every [`RELOAD_EVERY`] in any case). Between a change and the reload, a
//! request that names a kind this process does not know, or whose spec its copy
//! refuses, reads that one type again ([`Registry::by_plural`], [`Registry::fresh`]).
//! Changes may only widen a type ([`crate::domain::resource_type::evolution`]), so a
//! stale copy can only refuse what the new one takes, never take what it refuses: the
//! re-read on refusal makes a change served at once by every replica.

use crate::domain::resource_type::ResourceType;
use crate::domain::{Kind, Service};
use crate::store::resource_types::{self, TypeRow};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The channel the `resource_types` trigger notifies.
pub const CHANNEL: &str = "resource_types";

/// How often the registry reloads even without a notification.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// The types known at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_kind: HashMap<Kind, Arc<ResourceType>>,
    by_plural: HashMap<String, Kind>,
}

impl Snapshot {
    /// The types of `rows`: those `previous` has at the same version and definition are
    /// kept as they are (schemas are compiled once per version), the others compiled; a
    /// row that does not compile (edited by hand) is logged and left out.
    fn build(rows: &[TypeRow], previous: &Snapshot) -> Snapshot {
        let kinds: BTreeSet<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        let known = |k: &Kind| kinds.contains(k.as_str());
        let mut snapshot = Snapshot::default();
        for row in rows {
            let kept = previous
                .by_kind
                .values()
                .find(|t| t.kind() == row.kind.as_str() && t.version == row.version)
                .filter(|t| row.to_def().is_ok_and(|def| def == t.def));
            if let Some(t) = kept {
                snapshot.insert(t.clone());
                continue;
            }
            match compile(row, &known) {
                Ok(t) => snapshot.insert(Arc::new(t)),
                Err(e) => {
                    tracing::error!(kind = %row.kind, error = %e, "a registered type does not compile; it is not served")
                }
            }
        }
        snapshot
    }

    fn insert(&mut self, t: Arc<ResourceType>) {
        self.by_plural
            .insert(t.def.plural.clone(), t.kind().clone());
        self.by_kind.insert(t.kind().clone(), t);
    }

    /// The type of `kind`.
    pub fn get(&self, kind: &Kind) -> Option<&Arc<ResourceType>> {
        self.by_kind.get(kind)
    }

    /// The type whose URL segment is `plural`.
    pub fn by_plural(&self, plural: &str) -> Option<&Arc<ResourceType>> {
        self.by_plural.get(plural).and_then(|k| self.by_kind.get(k))
    }

    /// Every type, by kind.
    pub fn types(&self) -> Vec<Arc<ResourceType>> {
        let mut all: Vec<_> = self.by_kind.values().cloned().collect();
        all.sort_by(|a, b| a.kind().cmp(b.kind()));
        all
    }

    /// Every service that acts on a registered kind, sorted.
    pub fn services(&self) -> Vec<Service> {
        let set: BTreeSet<Service> = self.by_kind.values().map(|t| t.service().clone()).collect();
        set.into_iter().collect()
    }

    /// The service of `kind`.
    pub fn service_of(&self, kind: &Kind) -> Option<&Service> {
        self.by_kind.get(kind).map(|t| t.service())
    }

    /// Whether workers of `service` need to read resources of `kind`: their own kinds,
    /// and the kinds those name (`x-reference`).
    pub fn service_reads(&self, service: &Service, kind: &Kind) -> bool {
        self.by_kind.values().any(|t| {
            t.service() == service && (t.kind() == kind || t.referenced_kinds().any(|k| k == kind))
        })
    }
}

fn compile(row: &TypeRow, known: &dyn Fn(&Kind) -> bool) -> anyhow::Result<ResourceType> {
    let def = row.to_def()?;
    Ok(ResourceType::compile(def, row.version, known)?)
}

/// The registry of one process. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pool: PgPool,
    current: Arc<RwLock<Arc<Snapshot>>>,
    changed: Arc<watch::Sender<u64>>,
    /// Held across a reload's read and replace, so an older read never replaces a newer.
    reloading: Arc<tokio::sync::Mutex<()>>,
}

impl Registry {
    /// Loads every registered type from the database.
    pub async fn load(pool: PgPool) -> sqlx::Result<Registry> {
        let registry = Registry {
            pool,
            current: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            reloading: Arc::default(),
        };
        registry.reload().await?;
        Ok(registry)
    }

    /// The types known now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Reads every type again.
    pub async fn reload(&self) -> sqlx::Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        let rows = resource_types::all(&self.pool).await?;
        self.replace(Snapshot::build(&rows, &self.snapshot()));
        Ok(())
    }

    /// Reads every type again; a failure is logged, and the types known are kept.
    pub async fn reload_logged(&self) {
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "cannot reload the resource types; keeping the ones known");
        }
    }

    /// Follows the registered services: how a part takes on services registered while
    /// it runs (keeping what it has done, and retrying what failed).
    pub fn follow_services(&self) -> ServiceFollower {
        ServiceFollower {
            registry: self.clone(),
            changed: self.subscribe(),
            started: false,
        }
    }

    /// Tells of every reload (the value counts them).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The type of `kind`, as known now.
    pub fn get(&self, kind: &Kind) -> Option<Arc<ResourceType>> {
        self.snapshot().get(kind).cloned()
    }

    /// The type whose URL segment is `plural`; one this process does not know yet is
    /// looked up in the database (a type registered on another replica a moment ago).
    pub async fn by_plural(&self, plural: &str) -> sqlx::Result<Option<Arc<ResourceType>>> {
        if let Some(t) = self.snapshot().by_plural(plural) {
            return Ok(Some(t.clone()));
        }
        match resource_types::by_plural(&self.pool, plural).await? {
            Some(_) => {
                self.reload().await?;
                Ok(self.snapshot().by_plural(plural).cloned())
            }
            None => Ok(None),
        }
    }

    /// The type of `kind` if the database has a newer version than `known`; `None`
    /// when `known` is current. Used when a stale copy may have refused a request.
    pub async fn fresh(&self, known: &ResourceType) -> sqlx::Result<Option<Arc<ResourceType>>> {
        let row = resource_types::get(&self.pool, known.kind().as_str()).await?;
        match row {
            Some(row) if row.version > known.version => {
                self.reload().await?;
                Ok(self.get(known.kind()))
            }
            _ => Ok(None),
        }
    }

    /// Keeps the registry fresh until `shutdown`: reloads on every notification, after
    /// the listening connection is lost, and every [`RELOAD_EVERY`].
    pub async fn listen(self, shutdown: CancellationToken) {
        let pool = self.pool.clone();
        crate::notify::follow(pool, CHANNEL, RELOAD_EVERY, shutdown, || {
            self.reload_logged()
        })
        .await;
    }
}

/// The registered services, again and again: see [`Registry::follow_services`].
pub struct ServiceFollower {
    registry: Registry,
    changed: watch::Receiver<u64>,
    started: bool,
}

impl ServiceFollower {
    /// How long a follower waits for a reload before it looks again anyway (to retry).
    pub const RECHECK: Duration = Duration::from_secs(5);

    /// The services now: at once the first time, then after the next reload (or
    /// [`Self::RECHECK`]); `None` once `shutdown` is cancelled.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<Vec<Service>> {
        if self.started {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.changed.changed() => {}
                _ = tokio::time::sleep(Self::RECHECK) => {}
            }
        }
        self.started = true;
        (!shutdown.is_cancelled()).then(|| self.registry.snapshot().services())
    }
}
