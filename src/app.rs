//! Assembling and running the processes: `migrate`, `serve`, `relay` and the all-in-one
//! `up`. Tests start the same assembly on port 0 with their own database and stream.

use crate::api::{self, AppState};
use crate::auth;
use crate::changes::Changes;
use crate::config::Config;
use crate::domain::Role;
use crate::lifecycle::{self, Engine};
use crate::metrics::Metrics;
use crate::reconciler::Reconciler;
use crate::relay::{Relay, Wake};
use crate::store::{self, catalog, principals};
use anyhow::Context as _;
use async_nats::jetstream;
use gateway_proto::Service;
use sqlx::PgPool;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Name of the principal whose key `up` and `migrate` print.
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

/// Connections to the two backing services.
#[derive(Clone)]
pub struct Backends {
    /// PostgreSQL.
    pub pool: PgPool,
    /// NATS.
    pub nats: async_nats::Client,
    /// JetStream on that connection, with the configured publish timeout.
    pub js: jetstream::Context,
}

/// Connects to PostgreSQL (creating the database if needed) and NATS.
pub async fn connect(config: &Config) -> anyhow::Result<Backends> {
    let pool = store::connect(&config.database_url, config.database_max_connections).await?;
    let nats = async_nats::ConnectOptions::new()
        .name("gateway")
        .retry_on_initial_connect()
        .connect(&config.nats_url)
        .await
        .with_context(|| format!("NATS_URL: cannot connect to {}", config.nats_url))?;
    // With retry_on_initial_connect the call returns at once; wait briefly so a wrong
    // URL is reported at start-up rather than as a silent stall.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while nats.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "NATS_URL: no NATS server answered at {} within 10 s",
                config.nats_url
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut js = jetstream::new(nats.clone());
    js.set_timeout(config.publish_timeout);
    Ok(Backends { pool, nats, js })
}

/// Applies database migrations and the JetStream definitions, and makes sure an admin
/// key exists. Returns the admin key when one was set or created now (`rotate` gives
/// the bootstrap admin a new key even if it has one).
pub async fn migrate(
    config: &Config,
    b: &Backends,
    rotate: bool,
) -> anyhow::Result<Option<String>> {
    store::migrate(&b.pool).await?;
    let zones: Vec<String> = catalog::zones(&b.pool)
        .await?
        .into_iter()
        .map(|z| z.name)
        .collect();
    crate::jetstream::apply(&b.js, &config.nats, &zones).await?;
    bootstrap_admin(&b.pool, config.admin_key.as_deref(), rotate).await
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
pub async fn worker_key(pool: &PgPool, service: Service, zone: &str) -> anyhow::Result<String> {
    let key = auth::generate_key();
    let name = format!("worker:{service}:{zone}");
    lifecycle::keys::install(pool, &name, Role::Worker, Some((service, zone)), &key).await?;
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

/// Starts `parts` on `listener` with connected `backends`.
/// `listener` serves the API when `parts.api` is set, else only `/healthz`, `/readyz`
/// and `/metrics`.
pub async fn start(
    config: &Config,
    backends: Backends,
    listener: Option<TcpListener>,
    parts: Parts,
) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let wake = Wake::with_nats(backends.nats.clone(), config.nats.wake_subject());
    let changes = Changes::new(Some((backends.nats.clone(), config.nats.changes_subject())));
    tasks.spawn(changes.clone().listen(shutdown.clone()));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    // In-process workers report into the same registry; register their families once.
    let worker_metrics = parts
        .workers
        .is_some()
        .then(|| workers::WorkerMetrics::register(&mut registry));
    let registry = std::sync::Arc::new(registry);
    let zones: Vec<String> = catalog::zones(&backends.pool)
        .await?
        .into_iter()
        .map(|z| z.name)
        .collect();
    metrics.init_series(&zones);
    let refresh = (
        metrics.clone(),
        backends.clone(),
        config.nats.stream.clone(),
        zones.clone(),
        shutdown.clone(),
    );
    let every = config.metrics_refresh;
    tasks.spawn(async move {
        let (metrics, b, stream, zones, stop) = refresh;
        let mut tick = tokio::time::interval(every);
        while tokio::select! { _ = stop.cancelled() => false, _ = tick.tick() => true } {
            metrics
                .refresh(&b.pool, Some((&b.js, stream.as_str())), &zones)
                .await;
        }
    });
    let engine = Engine {
        pool: backends.pool.clone(),
        names: config.nats.clone(),
        operation_timeout: config.operation_timeout,
        wake: wake.clone(),
        changes: changes.clone(),
        metrics: metrics.clone(),
        catalog: crate::cache::CatalogCache::new(metrics.clone()),
    };
    if let Some(listener) = listener {
        let limiter = std::sync::Arc::new(api::guard::Limiter::new(config.rate_limits));
        let idle = (limiter.clone(), shutdown.clone());
        tasks.spawn(async move {
            let (limiter, stop) = idle;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            while tokio::select! { _ = stop.cancelled() => false, _ = tick.tick() => true } {
                limiter.forget_idle();
            }
        });
        let (audit, writer) = crate::audit::AuditWriter::new(
            backends.pool.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tasks.spawn(writer);
        let state = AppState {
            audit,
            engine: engine.clone(),
            nats: backends.nats.clone(),
            limiter,
            registry: registry.clone(),
            db: store::health::DbHealth::new(backends.pool.clone()),
        };
        // A process without the API (a relay) still serves health and metrics.
        let app = if parts.api {
            api::router(state)
        } else {
            api::health::router().with_state(state)
        };
        tasks.spawn(crate::serve::serve(
            listener,
            app,
            config.header_timeout,
            shutdown.clone(),
        ));
    }
    if parts.relay {
        let relay = Relay {
            pool: backends.pool.clone(),
            js: backends.js.clone(),
            batch_size: config.relay_batch_size,
            poll_interval: config.relay_poll_interval,
            wake: wake.clone(),
            changes: changes.clone(),
            metrics: metrics.clone(),
        };
        tasks.spawn(relay.run(shutdown.clone()));
    }
    if parts.reconciler {
        let reconciler = Reconciler {
            engine: engine.clone(),
            interval: config.reconcile_interval,
            redispatch_after: config.redispatch_after,
            js: Some(backends.js.clone()),
        };
        tasks.spawn(reconciler.run(shutdown.clone()));
        // Dead letters run in every replica: the advisory consumer shares the work.
        let dead_letters = crate::deadletter::DeadLetters {
            engine: engine.clone(),
            js: backends.js.clone(),
        };
        tasks.spawn(dead_letters.run(shutdown.clone()));
    }
    let mut driver = None;
    if let Some(sim) = parts.workers {
        let sim_driver = workers::SimDriver::new(sim);
        let max_deliver = crate::jetstream::consumer_def()?.max_deliver;
        let url = match (&config.public_url, addr) {
            (Some(u), _) => u.clone(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => config.public_url(),
        };
        let worker_metrics = worker_metrics.unwrap_or_default();
        for zone in &zones {
            for service in Service::ALL {
                let pool_config = workers::PoolConfig {
                    service: *service,
                    zone: zone.clone(),
                    stream: config.nats.stream.clone(),
                    gateway_url: url.clone(),
                    gateway_key: worker_key(&backends.pool, *service, zone).await?,
                    concurrency: 16,
                    max_deliver,
                };
                let (js, d, m, stop) = (
                    backends.js.clone(),
                    sim_driver.clone(),
                    worker_metrics.clone(),
                    shutdown.clone(),
                );
                tasks.spawn(async move {
                    if let Err(e) =
                        workers::run_pool_with_metrics(js, pool_config, d, m, stop).await
                    {
                        tracing::error!(error = %e, "worker pool stopped");
                    }
                });
            }
        }
        driver = Some(sim_driver);
    }
    Ok(Running {
        addr,
        backends,
        driver,
        shutdown,
        tasks,
    })
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
