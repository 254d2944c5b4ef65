//! `worker --service S --zone Z`: one pool of a zone worker. Reads its configuration from
//! the environment (see [`workers::config::WorkerConfig`]), serves `/metrics`, `/healthz`
//! and `/readyz` on `WORKER_LISTEN`, runs until Ctrl-C or SIGTERM, then shuts down
//! gracefully.

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use workers::config::{DriverConfig, LogFormat, WorkerConfig};
use workers::http::HttpState;
use workers::{run_pool_with_metrics, ExecDriver, Service, SimDriver, WorkerMetrics};

/// Zone worker: carries out operations for one service in one zone.
///
/// Other settings come from the environment: NATS_URL, GATEWAY_URL, GATEWAY_KEY
/// (required), WORKER_DISPATCH_PUBLIC_KEYS or WORKER_DISPATCH_PUBLIC_KEYS_FILE
/// (required), NATS_CREDS, NATS_NKEY_SEED or NATS_NKEY_SEED_FILE, NATS_USER and
/// NATS_PASSWORD, NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY, NATS_TLS_REQUIRED,
/// NATS_INBOX_PREFIX, OPS_STREAM, WORKER_CONCURRENCY, WORKER_DRIVER
/// (sim|exec), WORKER_EXEC_COMMAND, SIM_MIN_LATENCY_MS, SIM_MAX_LATENCY_MS,
/// SIM_FAILURE_RATE, SIM_TRANSIENT_FAILURE_RATE, SIM_CAPACITY_PER_ZONE, LOG_FORMAT
/// (text|json), RUST_LOG, WORKER_LISTEN (address of /metrics, /healthz and /readyz;
/// default 127.0.0.1:9464).
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Args {
    /// The service to serve: a registered service, e.g. vm, bm, k8s or storage.
    #[arg(long, env = "WORKER_SERVICE", value_parser = parse_service)]
    service: Service,
    /// The zone to serve, e.g. zone-a.
    #[arg(long, env = "WORKER_ZONE")]
    zone: String,
}

fn parse_service(s: &str) -> Result<Service, String> {
    s.parse().map_err(|_| {
        "must be a registered service: 1 to 32 of a-z, 0-9 and _, starting with a letter (vm, bm, k8s, storage, …)".to_owned()
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match WorkerConfig::from_env(args.service, args.zone) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let WorkerConfig {
        nats_url,
        nats,
        pool,
        driver,
        listen,
        ..
    } = config;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("WORKER_LISTEN: cannot listen on {listen}"))?;
    // Keep trying in the background if NATS is not up yet: the pool logs and waits, and
    // /readyz says so.
    let user = workers::nats::worker_user(&pool.service, &pool.zone);
    let inbox = workers::nats::inbox_prefix(&pool.stream, &user);
    let client = nats.connect(&nats_url, &user, &inbox).await?;

    let mut registry = Registry::default();
    let metrics = WorkerMetrics::register(&mut registry);
    let http_state = HttpState::new(
        Arc::new(registry),
        client.clone(),
        &pool.gateway_url,
        &pool.gateway_key,
    )?;
    let js = async_nats::jetstream::new(client);

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            shutdown.cancel();
        }
    });

    tracing::info!(address = %listen, "serving /metrics, /healthz and /readyz");
    let http = tokio::spawn(workers::http::serve(listener, http_state, shutdown.clone()));

    let ran = match driver {
        DriverConfig::Sim {
            config,
            capacity_per_zone,
        } => {
            let driver = match capacity_per_zone {
                Some(per_zone) => SimDriver::with_capacity(config, per_zone),
                None => SimDriver::new(config),
            };
            run_pool_with_metrics(js, pool, driver, metrics, shutdown.clone()).await
        }
        DriverConfig::Exec { program, args } => {
            let driver = ExecDriver::new(program, args);
            run_pool_with_metrics(js, pool, driver, metrics, shutdown.clone()).await
        }
    };
    // The pool is done (or could not start): stop serving too.
    shutdown.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the metrics and health endpoints failed"),
        Err(e) => tracing::error!(error = %e, "the metrics and health endpoints panicked"),
    }
    ran
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
