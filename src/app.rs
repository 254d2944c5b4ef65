//! Assembling and running the processes: `migrate`, `serve`, `relay` and the all-in-one
//! `up`. Tests start the same assembly on port 0 with their own database and stream.

use crate::api::{self, AppState};
use crate::auth;
use crate::broker::{PrivateBroker, RoleLogins};
use crate::changes::{Changes, Wake};
use crate::config::{Config, Secret, UpBroker};
use crate::credentials;
use crate::domain::Role;
use crate::lifecycle::{self, Engine};
use crate::metrics::Metrics;
use crate::reconciler::Reconciler;
use crate::registry::Registry;
use crate::relay::Relay;
use crate::store::{self, catalog, principals};
use anyhow::Context as _;
use async_nats::jetstream;
use gateway_proto::Service;
use sqlx::PgPool;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workers::nats::{inbox_prefix, wait_connected, worker_user};

/// Name of the principal whose key `up` and `migrate` print.
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

/// Connections to the two backing services.
#[derive(Clone)]
pub struct Backends {
    /// PostgreSQL.
    pub pool: PgPool,
    /// NATS, logged in as this process's user (`gateway` for `serve` and `up`, `relay`
    /// for `relay` and `migrate`).
    pub nats: async_nats::Client,
    /// JetStream on that connection, with the configured publish timeout.
    pub js: jetstream::Context,
    /// On `up`'s private broker, how every other user logs in: then the relay,
    /// `migrate` and each worker pool use connections of their own, with their own
    /// permissions. Otherwise every part shares `nats`.
    pub logins: Option<RoleLogins>,
}

impl Backends {
    /// JetStream as `user` (see [`Backends::logins`]), with the configured timeout.
    pub async fn jetstream_as(
        &self,
        config: &Config,
        user: &str,
    ) -> anyhow::Result<jetstream::Context> {
        match &self.logins {
            None => Ok(self.js.clone()),
            Some(logins) => Ok(jetstream_on(logins.connect(user).await?, config)),
        }
    }
}

/// A JetStream context on `client` that waits `PUBLISH_TIMEOUT` for acknowledgements.
pub fn jetstream_on(client: async_nats::Client, config: &Config) -> jetstream::Context {
    let mut js = jetstream::new(client);
    js.set_timeout(config.publish_timeout);
    js
}

/// Connects to PostgreSQL (creating the database if needed) and NATS, as the `gateway`
/// user.
pub async fn connect(config: &Config) -> anyhow::Result<Backends> {
    connect_as(config, credentials::GATEWAY).await
}

/// Connects to PostgreSQL and to NATS as `user` ([`credentials::GATEWAY`] or
/// [`credentials::RELAY`]), with the login of `NATS_*` and `user`'s reply inbox.
pub async fn connect_as(config: &Config, user: &str) -> anyhow::Result<Backends> {
    let pool = store::connect(&config.database_url, config.database_max_connections).await?;
    let inbox = inbox_prefix(&config.nats.stream, user);
    let nats = config
        .nats_login
        .connect(&config.nats_url, user, &inbox)
        .await?;
    wait_connected(&nats, &config.nats_url).await?;
    let js = jetstream_on(nats.clone(), config);
    Ok(Backends {
        pool,
        nats,
        js,
        logins: None,
    })
}

/// Connects as the `gateway` user to `up`'s private broker, every other part to log in
/// as its own user through `logins`.
pub async fn connect_private(
    config: &Config,
    pool: PgPool,
    logins: RoleLogins,
) -> anyhow::Result<Backends> {
    let nats = logins.connect(credentials::GATEWAY).await?;
    let js = jetstream_on(nats.clone(), config);
    Ok(Backends {
        pool,
        nats,
        js,
        logins: Some(logins),
    })
}

/// The backends of `up`: on the broker `NATS_URL` names, as configured; without
/// `NATS_URL`, on a private authenticated broker started now (its URL replaces
/// `config.nats_url`), every part logging in as its own user. Applies the database
/// migrations first when it starts a broker (the zones name the worker users).
pub async fn connect_for_up(
    config: &mut Config,
) -> anyhow::Result<(Backends, Option<PrivateBroker>)> {
    let UpBroker::Private { port, server } = config.up_broker.clone() else {
        return Ok((connect(config).await?, None));
    };
    let pool = store::connect(&config.database_url, config.database_max_connections).await?;
    migrate_database(config, &pool).await?;
    let zones: Vec<String> = zone_names(&pool).await?;
    let services = service_names(&pool).await?;
    let bin = crate::broker::nats_server_bin(server.as_deref())?;
    let dir = config.data_dir.join("nats");
    let broker = PrivateBroker::start(
        &dir,
        bin,
        port,
        &config.nats,
        &zones,
        &services,
        config.region.as_ref(),
    )
    .await?;
    config.nats_url = broker.url.clone();
    let backends = connect_private(config, pool, broker.logins.clone()).await?;
    Ok((backends, Some(broker)))
}

/// Applies the database migrations and, with regions, makes the database this region's
/// (claiming its zones and naming its peers; see [`store::replication::configure`]).
pub async fn migrate_database(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    store::migrate(pool).await?;
    if let Some(region) = &config.region {
        let mut conn = pool.acquire().await?;
        store::replication::configure(
            &mut conn,
            &region.name,
            &config.public_url(),
            &region.zones,
            &region.peers,
        )
        .await?;
        let tag = crate::domain::region::tag_of(&region.name);
        for (other, _) in store::replication::regions(pool).await? {
            if other != region.name && crate::domain::region::tag_of(&other) == tag {
                tracing::warn!(
                    region = %region.name, other = %other,
                    "two regions share an ID tag: a request about an ID this region does not have may be sent to the wrong one; rename one of them"
                );
            }
        }
    }
    Ok(())
}

/// The names of the zones this installation serves (one worker pool per service in
/// each): all of them, or with regions, its region's.
pub async fn zone_names(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(catalog::zones(pool)
        .await?
        .into_iter()
        .filter(|z| z.local)
        .map(|z| z.name)
        .collect())
}

/// The services of the registered resource types (one worker pool per zone each).
pub async fn service_names(pool: &PgPool) -> anyhow::Result<Vec<Service>> {
    let mut services: Vec<Service> = crate::store::resource_types::all(pool)
        .await?
        .into_iter()
        .filter_map(|r| r.service.parse().ok())
        .collect();
    services.sort();
    services.dedup();
    Ok(services)
}

/// Applies database migrations and the JetStream definitions, and makes sure an admin
/// key exists. Returns the admin key when one was set or created now (`rotate` gives
/// the bootstrap admin a new key even if it has one).
pub async fn migrate(
    config: &Config,
    b: &Backends,
    rotate: bool,
) -> anyhow::Result<Option<String>> {
    migrate_database(config, &b.pool).await?;
    let zones: Vec<String> = zone_names(&b.pool).await?;
    let js = b.jetstream_as(config, credentials::RELAY).await?;
    if let Some(region) = &config.region {
        crate::replication::ensure_streams(&js, region, config.stream_replicas).await?;
    }
    let defs = crate::jetstream::Definitions::shipped()?
        .with_replicas(config.stream_replicas)
        .with_event_retention(config.events.max_age, config.events.max_bytes);
    let services = service_names(&b.pool).await?;
    crate::jetstream::apply_definitions(&js, &config.nats, &zones, &services, &defs).await?;
    bootstrap_admin(
        &b.pool,
        config.admin_key.as_ref().map(Secret::expose),
        rotate,
    )
    .await
}

async fn bootstrap_admin(
    pool: &PgPool,
    configured: Option<&str>,
    rotate: bool,
) -> anyhow::Result<Option<String>> {
    let key = match configured {
        Some(k) => k.to_owned(),
        None if rotate || !principals::exists(pool, BOOTSTRAP_ADMIN).await? => auth::generate_key(),
        None => return Ok(None),
    };
    lifecycle::keys::install(pool, BOOTSTRAP_ADMIN, Role::Admin, None, &key).await?;
    Ok(Some(key))
}

/// Creates (or rotates) the key of the worker principal for one pool.
pub async fn worker_key(pool: &PgPool, service: &Service, zone: &str) -> anyhow::Result<String> {
    let key = auth::generate_key();
    let name = format!("worker:{service}:{zone}");
    lifecycle::keys::install(
        pool,
        &name,
        Role::Worker,
        Some((service.clone(), zone)),
        &key,
    )
    .await?;
    Ok(key)
}

/// Which parts to run in this process.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    /// The HTTP API (and the reconciler, when `reconciler` is set).
    pub api: bool,
    /// The outbox relay.
    pub relay: bool,
    /// The reconciler (single active across processes) and the dead-letter handler
    /// (in every process that has it).
    pub reconciler: bool,
    /// Simulated workers for every service×zone, reporting to this process's API.
    pub workers: Option<workers::SimConfig>,
    /// The webhook dispatcher (fan-out of events, deliveries).
    pub webhooks: bool,
}

/// A running assembly.
pub struct Running {
    /// Where the API listens (when it runs).
    pub addr: Option<SocketAddr>,
    /// The backends it uses.
    pub backends: Backends,
    /// The simulated driver, when workers run in-process (tests inspect it).
    pub driver: Option<workers::SimDriver>,
    /// Cancel to stop everything.
    pub shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops every part and waits for them to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until every part has stopped (after `shutdown` is cancelled elsewhere).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Refuses to run a process on a database of another region than its own, or of a
/// region when it has none ([`crate::domain::region::mismatch`]).
pub async fn same_region(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    let stored = store::replication::region(pool).await?;
    let mine = config.region.as_ref().map(|r| r.name.as_str());
    match crate::domain::region::mismatch(stored.as_deref(), mine) {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Starts `parts` on `listener` with connected `backends`.
/// `listener` serves the API when `parts.api` is set, else only `/healthz`, `/readyz`
/// and `/metrics`.
pub async fn start(
    config: &Config,
    backends: Backends,
    listener: Option<TcpListener>,
    parts: Parts,
) -> anyhow::Result<Running> {
    same_region(config, &backends.pool).await?;
    let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    // In-process workers report into the same registry; register their families once.
    let worker_metrics = parts
        .workers
        .is_some()
        .then(|| workers::WorkerMetrics::register(&mut registry));
    let mut a = Assembly::new(config, backends, metrics, registry).await?;
    a.spawn_metrics_refresh();
    if let Some(listener) = listener {
        a.spawn_http(listener, parts.api);
    }
    if parts.relay {
        a.spawn_relay().await?;
    }
    if parts.reconciler {
        a.spawn_repairs();
    }
    if parts.webhooks {
        a.spawn_webhooks();
    }
    let driver = match parts.workers {
        Some(sim) => Some(
            a.spawn_workers(sim, worker_metrics.unwrap_or_default(), addr)
                .await?,
        ),
        None => None,
    };
    Ok(Running {
        addr,
        backends: a.backends,
        driver,
        shutdown: a.shutdown,
        tasks: a.tasks,
    })
}

/// What the parts of one process share while they are started.
struct Assembly<'c> {
    config: &'c Config,
    backends: Backends,
    engine: Engine,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    zones: Vec<String>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl<'c> Assembly<'c> {
    /// The engine and the change listener every part needs.
    async fn new(
        config: &'c Config,
        backends: Backends,
        metrics: Metrics,
        registry: prometheus_client::registry::Registry,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let reads = crate::readcache::ReadCache::new(config.read_cache_ttl, metrics.clone());
        let changes = Changes::new(Some((backends.nats.clone(), config.nats.changes_subject())))
            .with_cache(reads);
        tasks.spawn(changes.clone().listen(shutdown.clone()));
        let zones: Vec<String> = zone_names(&backends.pool).await?;
        let types = crate::registry::Registry::load(backends.pool.clone()).await?;
        metrics.init_series(&zones, &types.snapshot());
        tasks.spawn(types.clone().listen(shutdown.clone()));
        let engine = Engine {
            pool: backends.pool.clone(),
            names: config.nats.clone(),
            operation_timeout: config.operation_timeout,
            idempotency_retention: config.idempotency_retention,
            wake: Wake::with_nats(backends.nats.clone(), config.nats.wake_subject()),
            changes,
            catalog: crate::cache::CatalogCache::new(metrics.clone()),
            metrics,
            types,
            ids: crate::domain::region::IdMaker::for_region(
                config.region.as_ref().map(|r| r.name.as_str()),
            ),
            group: std::sync::Arc::new(crate::lifecycle::group::GroupCommit::new(
                config.write_batch,
            )),
        };
        Ok(Self {
            config,
            backends,
            engine,
            registry: std::sync::Arc::new(registry),
            zones,
            shutdown,
            tasks,
        })
    }

    /// Refreshes the gauges of database and JetStream state every `METRICS_REFRESH_MS`.
    fn spawn_metrics_refresh(&mut self) {
        let (metrics, b, stop) = (
            self.engine.metrics.clone(),
            self.backends.clone(),
            self.shutdown.clone(),
        );
        let (stream, zones) = (self.config.nats.stream.clone(), self.zones.clone());
        let types = self.engine.types.clone();
        let every = self.config.metrics_refresh;
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            while tokio::select! { _ = stop.cancelled() => false, _ = tick.tick() => true } {
                let services = types.snapshot().services();
                metrics
                    .refresh(&b.pool, Some((&b.js, stream.as_str())), &zones, &services)
                    .await;
            }
        });
    }

    /// Serves the API (or, without `api`, only health and metrics) on `listener`, with
    /// its rate limiter and audit writer.
    fn spawn_http(&mut self, listener: TcpListener, api: bool) {
        let limiter = std::sync::Arc::new(api::guard::Limiter::new(self.config.rate_limits));
        let (idle, stop) = (limiter.clone(), self.shutdown.clone());
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            while tokio::select! { _ = stop.cancelled() => false, _ = tick.tick() => true } {
                idle.forget_idle();
            }
        });
        let (audit, writer) = crate::audit::AuditWriter::new(
            self.backends.pool.clone(),
            self.engine.metrics.clone(),
            self.config.audit_spool,
            self.shutdown.clone(),
        );
        self.tasks.spawn(writer);
        let sealer = crate::audit::run_sealer(
            self.backends.pool.clone(),
            self.engine.metrics.clone(),
            // Saved by the `gateway` user only: a process without the API (a relay)
            // seals, and the next API process's pass saves the end it reached.
            api.then(|| {
                crate::audit::anchor::Anchor::new(self.backends.js.clone(), &self.config.nats)
            }),
            self.shutdown.clone(),
        );
        self.tasks.spawn(sealer);
        let keys = crate::keycache::KeyCache::new(
            self.backends.pool.clone(),
            self.config.key_cache_ttl,
            self.engine.metrics.clone(),
        );
        self.tasks.spawn(keys.clone().follow(self.shutdown.clone()));
        let state = AppState::new(api::Shared {
            keys,
            audit,
            engine: self.engine.clone(),
            nats: self.backends.nats.clone(),
            limiter,
            registry: self.registry.clone(),
            db: store::health::DbHealth::new(self.backends.pool.clone()),
            events: crate::eventlog::EventLog::new(self.backends.js.clone(), &self.config.nats),
            watch_slots: Default::default(),
            watch_settings: self.config.events.clone(),
            shutdown: self.shutdown.clone(),
            webhook_policy: self.config.webhooks.policy,
            webhook_secret_grace: self.config.webhooks.secret_grace,
            admission: api::admission::Admission::new(
                self.config.admission,
                self.engine.metrics.clone(),
            ),
            webhook_secret_keys: self.config.webhooks.secret_keys.clone(),
            regions: api::regions::Directory::new(
                self.config.region.as_ref().map(|r| r.name.as_str()),
            ),
            // With regions, Locations are always absolute: clients may be elsewhere.
            public_base: match (&self.config.public_url, &self.config.region) {
                (Some(url), _) => Some(url.as_str().into()),
                (None, Some(_)) => Some(self.config.public_url().into()),
                (None, None) => None,
            },
        });
        // A process without the API (a relay) still serves health and metrics.
        let app = if api {
            api::router(state)
        } else {
            api::health::router_needing_nats().with_state(state)
        };
        let limits = crate::serve::Limits {
            header_timeout: self.config.header_timeout,
            max_connections: self.config.max_connections,
            metrics: self.engine.metrics.clone(),
        };
        self.tasks.spawn(crate::serve::serve(
            listener,
            app,
            limits,
            self.shutdown.clone(),
        ));
    }

    /// The webhook dispatcher, reading events as the `gateway` user.
    fn spawn_webhooks(&mut self) {
        let dispatcher = crate::webhooks::Dispatcher::new(
            self.engine.clone(),
            self.backends.js.clone(),
            self.config.nats.clone(),
            self.config.webhooks.clone(),
        );
        self.tasks.spawn(dispatcher.run(self.shutdown.clone()));
    }

    /// Moves the outbox to JetStream, signing every message; as the `relay` user on a
    /// private broker.
    async fn spawn_relay(&mut self) -> anyhow::Result<()> {
        let signer = self.config.dispatch_signing_key.clone().context(
            "GATEWAY_DISPATCH_SIGNING_KEY: required by the relay (make one with `gateway dispatch-key`)",
        )?;
        let js = self
            .backends
            .jetstream_as(self.config, credentials::RELAY)
            .await?;
        let relay = Relay {
            pool: self.backends.pool.clone(),
            wake: self.engine.wake.heard_through(js.client()),
            js,
            batch_size: self.config.relay_batch_size,
            concurrent_passes: self.config.relay_concurrent_passes,
            poll_interval: self.config.relay_poll_interval,
            changes: self.engine.changes.clone(),
            metrics: self.engine.metrics.clone(),
            signer,
            events_prefix: self.config.nats.events_prefix.clone(),
        };
        self.tasks.spawn(relay.run(self.shutdown.clone()));
        let js = self
            .backends
            .jetstream_as(self.config, credentials::RELAY)
            .await?;
        let (names, zones) = (self.config.nats.clone(), self.zones.clone());
        let (types, stop) = (self.engine.types.clone(), self.shutdown.clone());
        let defs = crate::jetstream::Definitions::shipped()?
            .with_replicas(self.config.stream_replicas)
            .with_event_retention(self.config.events.max_age, self.config.events.max_bytes);
        let registered = types.clone();
        self.tasks.spawn(crate::jetstream::keep_definitions(
            js.clone(),
            names.clone(),
            zones.clone(),
            move || registered.snapshot().services(),
            defs,
            stop.clone(),
        ));
        self.tasks
            .spawn(consumers_follow_registry(js, names, zones, types, stop));
        self.spawn_replication().await
    }

    /// With regions: publishes this region's changes and applies the peers'.
    async fn spawn_replication(&mut self) -> anyhow::Result<()> {
        let Some(region) = &self.config.region else {
            return Ok(());
        };
        let js = self
            .backends
            .jetstream_as(self.config, credentials::RELAY)
            .await?;
        let publisher = crate::replication::publish::Publisher {
            pool: self.backends.pool.clone(),
            js: js.clone(),
            heartbeat: region.heartbeat,
            poll: std::time::Duration::from_millis(100),
            metrics: self.engine.metrics.clone(),
            region: region.clone(),
            replicas: self.config.stream_replicas,
        };
        self.tasks.spawn(publisher.run(self.shutdown.clone()));
        let applier = crate::replication::apply::Applier {
            pool: self.backends.pool.clone(),
            js,
            metrics: self.engine.metrics.clone(),
        };
        self.tasks.spawn(applier.run(self.shutdown.clone()));
        Ok(())
    }

    /// The reconciler (one active across processes) and the dead-letter handler (in
    /// every replica: the advisory consumer shares the work).
    fn spawn_repairs(&mut self) {
        let reconciler = Reconciler {
            engine: self.engine.clone(),
            interval: self.config.reconcile_interval,
            redispatch_after: self.config.redispatch_after,
            js: Some(self.backends.js.clone()),
        };
        self.tasks.spawn(reconciler.run(self.shutdown.clone()));
        let dead_letters = crate::deadletter::DeadLetters {
            engine: self.engine.clone(),
            js: self.backends.js.clone(),
        };
        self.tasks.spawn(dead_letters.run(self.shutdown.clone()));
    }

    /// Simulated worker pools for every service and zone, each with its own worker key
    /// (and, on a private broker, its own NATS user), reporting to this process's API (at `addr`, unless `GATEWAY_PUBLIC_URL` says
    /// otherwise).
    async fn spawn_workers(
        &mut self,
        sim: workers::SimConfig,
        metrics: workers::WorkerMetrics,
        addr: Option<SocketAddr>,
    ) -> anyhow::Result<workers::SimDriver> {
        let driver = workers::SimDriver::new(sim);
        let max_deliver = crate::jetstream::consumer_def()?.max_deliver;
        let url = match (&self.config.public_url, addr) {
            (Some(u), _) => u.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => self.config.public_url(),
        };
        let pools = SimPools {
            backends: self.backends.clone(),
            stream: self.config.nats.stream.clone(),
            url,
            max_deliver,
            dispatch_keys: self.config.dispatch_public_keys(),
            report_batch: self.config.worker_report_batch,
            concurrency: self.config.worker_concurrency,
            zones: self.zones.clone(),
            driver: driver.clone(),
            metrics,
        };
        let types = self.engine.types.clone();
        self.tasks
            .spawn(pools.follow(types, self.shutdown.clone(), self.config.clone()));
        Ok(driver)
    }
}

/// Creates the pool consumers of every registered service in every zone, and of each
/// service registered later (the relay's user may create consumers): a new kind's
/// workers find their consumer without a `migrate`. Retries what failed (NATS away).
async fn consumers_follow_registry(
    js: jetstream::Context,
    names: crate::config::NatsNames,
    zones: Vec<String>,
    types: Registry,
    shutdown: CancellationToken,
) {
    let mut done = std::collections::BTreeSet::new();
    let mut services = types.follow_services();
    while let Some(now) = services.next(&shutdown).await {
        let new: Vec<Service> = now.into_iter().filter(|s| !done.contains(s)).collect();
        if new.is_empty() {
            continue;
        }
        match crate::jetstream::ensure_pools(&js, &names, &zones, &new).await {
            Ok(()) => {
                tracing::info!(services = ?new, "pool consumers ready");
                done.extend(new);
            }
            Err(e) => tracing::warn!(error = %e, "cannot create pool consumers yet; retrying"),
        }
    }
}

/// `up`'s simulated worker pools: one per registered service and zone, started for
/// the services registered at start and for each one registered while `up` runs.
struct SimPools {
    backends: Backends,
    stream: String,
    url: String,
    max_deliver: i64,
    dispatch_keys: gateway_proto::signing::TrustedKeys,
    report_batch: usize,
    concurrency: usize,
    zones: Vec<String>,
    driver: workers::SimDriver,
    metrics: workers::WorkerMetrics,
}

impl SimPools {
    /// Runs pools for every service the registry has, following it until `shutdown`.
    async fn follow(self, types: Registry, shutdown: CancellationToken, config: Config) {
        let mut running = std::collections::BTreeSet::new();
        let mut pools = JoinSet::new();
        let mut services = types.follow_services();
        while let Some(now) = services.next(&shutdown).await {
            let new: Vec<(Service, String)> = now
                .iter()
                .flat_map(|s| self.zones.iter().map(move |z| (s.clone(), z.clone())))
                .filter(|p| !running.contains(p))
                .collect();
            if new.is_empty() {
                continue;
            }
            let started = self.start(&new, &config, &shutdown, &mut pools, &mut running);
            if let Err(e) = started.await {
                tracing::error!(error = %e, "cannot start simulated workers; retrying");
            }
        }
        while pools.join_next().await.is_some() {}
    }

    /// Starts the pools `new` (service, zone), each with its own worker key (and, on a
    /// private broker, its own NATS user, added to the server first); records each one
    /// started in `running`, so a failure part way retries only the others.
    async fn start(
        &self,
        new: &[(Service, String)],
        config: &Config,
        shutdown: &CancellationToken,
        pools: &mut JoinSet<()>,
        running: &mut std::collections::BTreeSet<(Service, String)>,
    ) -> anyhow::Result<()> {
        if let Some(logins) = &self.backends.logins {
            let all = service_names(&self.backends.pool).await?;
            logins.add_pools(&self.zones, &all).await?;
        }
        for (service, zone) in new {
            let pool_config = workers::PoolConfig {
                service: service.clone(),
                zone: zone.clone(),
                stream: self.stream.clone(),
                gateway_url: self.url.clone(),
                gateway_key: worker_key(&self.backends.pool, service, zone).await?,
                concurrency: self.concurrency,
                max_deliver: self.max_deliver,
                dispatch_keys: self.dispatch_keys.clone(),
                report_batch: self.report_batch,
            };
            let js = self
                .backends
                .jetstream_as(config, &worker_user(service, zone))
                .await?;
            let (d, m, stop) = (self.driver.clone(), self.metrics.clone(), shutdown.clone());
            pools.spawn(async move {
                if let Err(e) = workers::run_pool_with_metrics(js, pool_config, d, m, stop).await {
                    tracing::error!(error = %e, "worker pool stopped");
                }
            });
            running.insert((service.clone(), zone.clone()));
        }
        Ok(())
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}
