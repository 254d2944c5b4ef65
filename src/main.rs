//! The `gateway` binary: parse the command, load the configuration, run it.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::app::{self, Parts};
use gateway::config::Config;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Control-plane gateway for private clouds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: migrations, streams, API, relay, reconciler and
    /// simulated workers for every service and zone. Prints a ready admin key.
    Up {
        /// Shortest simulated driver latency, in milliseconds.
        #[arg(long, env = "SIM_MIN_LATENCY_MS", default_value_t = 200)]
        sim_min_latency_ms: u64,
        /// Longest simulated driver latency, in milliseconds.
        #[arg(long, env = "SIM_MAX_LATENCY_MS", default_value_t = 1500)]
        sim_max_latency_ms: u64,
        /// Probability (0–1) that a simulated operation fails.
        #[arg(long, env = "SIM_FAILURE_RATE", default_value_t = 0.0)]
        sim_failure_rate: f64,
    },
    /// The HTTP API and the reconciler.
    Serve,
    /// The outbox relay.
    Relay,
    /// Apply database migrations and JetStream definitions; create the admin key.
    Migrate,
    /// Administration straight on the database (tenants, keys, the audit chain).
    Admin {
        #[command(subcommand)]
        command: gateway::admin::Command,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    gateway::telemetry::init(config.log_json);
    if let Command::Admin { command } = cli.command {
        let pool = gateway::store::connect(&config.database_url, 2).await?;
        gateway::store::migrate(&pool).await?;
        return gateway::admin::run(&pool, command).await;
    }
    let backends = app::connect(&config).await?;
    match cli.command {
        Command::Migrate => {
            match app::migrate(&config, &backends, false).await? {
                Some(key) => println!("admin key: {key}"),
                None => println!("migrations and streams applied; the admin key is unchanged"),
            }
            Ok(())
        }
        Command::Serve => {
            run(
                &config,
                backends,
                Parts {
                    api: true,
                    reconciler: true,
                    ..Default::default()
                },
            )
            .await
        }
        Command::Relay => {
            run(
                &config,
                backends,
                Parts {
                    relay: true,
                    ..Default::default()
                },
            )
            .await
        }
        Command::Admin { .. } => unreachable!("handled above"),
        Command::Up {
            sim_min_latency_ms,
            sim_max_latency_ms,
            sim_failure_rate,
        } => {
            if !(0.0..=1.0).contains(&sim_failure_rate) {
                anyhow::bail!("SIM_FAILURE_RATE: must be between 0 and 1, got {sim_failure_rate}");
            }
            if sim_min_latency_ms > sim_max_latency_ms {
                anyhow::bail!("SIM_MIN_LATENCY_MS: must not exceed SIM_MAX_LATENCY_MS");
            }
            let key = app::migrate(&config, &backends, true)
                .await?
                .expect("rotate always yields a key");
            let sim = workers::SimConfig {
                min_latency: Duration::from_millis(sim_min_latency_ms),
                max_latency: Duration::from_millis(sim_max_latency_ms),
                failure_rate: sim_failure_rate,
                transient_failure_rate: 0.0,
            };
            let parts = Parts {
                api: true,
                relay: true,
                reconciler: true,
                workers: Some(sim),
            };
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("GATEWAY_LISTEN: cannot listen on {}", config.listen))?;
            let running = app::start(&config, backends, Some(listener), parts).await?;
            // A key the operator supplied is theirs: it is never printed.
            let shown = config.admin_key.is_none().then_some(key.as_str());
            print_welcome(&config.public_url(), shown);
            app::cancel_on_signal(running.shutdown.clone());
            running.wait().await;
            Ok(())
        }
    }
}

async fn run(config: &Config, backends: app::Backends, parts: Parts) -> anyhow::Result<()> {
    let parts_api = parts.api;
    // The relay serves only health and metrics on it.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("GATEWAY_LISTEN: cannot listen on {}", config.listen))?;
    let listener = Some(listener);
    let running = app::start(config, backends, listener, parts).await?;
    if let Some(addr) = running.addr {
        tracing::info!(%addr, api = parts_api, "gateway running");
    }
    app::cancel_on_signal(running.shutdown.clone());
    running.wait().await;
    Ok(())
}

/// What `up` prints once everything runs: the URL, the admin key when `up` made it
/// (never one the operator supplied), and first commands.
fn print_welcome(url: &str, generated_key: Option<&str>) {
    let key_lines = match generated_key {
        Some(key) => format!(
            "  Admin key (shown once; set GATEWAY_ADMIN_KEY to fix it):\n    export GW={url} KEY={key}"
        ),
        None => format!(
            "  Admin key: the one in GATEWAY_ADMIN_KEY (not shown).\n    export GW={url} KEY=\"$GATEWAY_ADMIN_KEY\""
        ),
    };
    println!(
        r#"
Gateway is up at {url}
  API, relay, reconciler and simulated workers for every service and zone are running.

{key_lines}

  Try it:
    curl -s -X POST $GW/v1/tenants -H "Authorization: Bearer $KEY" \
         -H 'Content-Type: application/json' -d '{{"id": "acme"}}'
    curl -s -X POST $GW/v1/tenants/acme/vms -H "Authorization: Bearer $KEY" \
         -H 'Content-Type: application/json' \
         -d '{{"name": "web-1", "zone": "zone-a", "spec": {{"flavor": "m1.small", "image": "debian-12"}}}}'
    curl -s $GW/v1/operations/<id from the answer> -H "Authorization: Bearer $KEY"

  OpenAPI: {url}/v1/openapi.json    Stop: Ctrl-C
"#
    );
}
