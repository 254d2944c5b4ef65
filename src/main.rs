//! The `gateway` binary: parse the command, load the configuration, run it.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::app::{self, Parts};
use gateway::config::Config;
use gateway::credentials;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// mimalloc rather than the system's allocator: the gateway allocates per request
/// (headers, JSON, rows), and glibc's `malloc`, `free` and their consolidation were 7 %
/// of its CPU at a steady rate; see the changelog for what the change bought.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The webhook dispatcher: fans events out to the tenants' endpoints and delivers
    /// them (run as many as needed; they share the work).
    Webhooks,
    /// Apply database migrations and JetStream definitions; create the admin key.
    Migrate,
    /// Administration straight on the database (tenants, keys, the audit chain).
    Admin {
        #[command(subcommand)]
        command: gateway::admin::Command,
    },
    /// Write the broker's users for this deployment: one NKEY seed per user
    /// (`<user>.nk`: gateway, relay, events-reader, worker-<service>-<zone>) and
    /// `auth.conf`, the `authorization` block to include in the NATS server's
    /// configuration. Existing seeds are kept.
    NatsConfig {
        /// The directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// A zone to make worker users for (repeat it); default: the database's zones.
        #[arg(long = "zone")]
        zones: Vec<String>,
        /// A service to make worker users for (repeat it); default: the services of the
        /// database's registered resource types. Run it again after registering a type
        /// with a new service, then reload the server.
        #[arg(long = "service")]
        services: Vec<String>,
        /// Give this user a new NKEY (repeat it); then reload the server and restart
        /// that user's processes.
        #[arg(long)]
        rotate: Vec<String>,
    },
    /// Write a dispatch signing key (`dispatch-signing.key`, for the relay:
    /// GATEWAY_DISPATCH_SIGNING_KEY_FILE) and its public half (`dispatch-public.key`, for
    /// the workers: WORKER_DISPATCH_PUBLIC_KEYS). An existing key is kept unless
    /// --rotate.
    DispatchKey {
        /// The directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Make a new key even if one exists.
        #[arg(long)]
        rotate: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    gateway::telemetry::init(config.log_json);
    let cli_command = match cli.command {
        Command::Admin { command } => {
            let pool = gateway::store::connect(&config.database_url, 2).await?;
            app::migrate_database(&config, &pool).await?;
            return gateway::admin::run(&config, &pool, command).await;
        }
        Command::NatsConfig {
            out,
            zones,
            services,
            rotate,
        } => return nats_config(&config, &out, zones, services, &rotate).await,
        Command::DispatchKey { out, rotate } => return dispatch_key(&out, rotate),
        Command::Up {
            sim_min_latency_ms,
            sim_max_latency_ms,
            sim_failure_rate,
        } => {
            let sim = sim_config(sim_min_latency_ms, sim_max_latency_ms, sim_failure_rate)?;
            return up(config, sim).await;
        }
        other => other,
    };
    let user = match cli_command {
        Command::Serve | Command::Webhooks => credentials::GATEWAY,
        _ => credentials::RELAY,
    };
    let backends = app::connect_as(&config, user).await?;
    match cli_command {
        Command::Migrate => migrate(&config, &backends).await,
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
        Command::Webhooks => {
            run(
                &config,
                backends,
                Parts {
                    webhooks: true,
                    ..Default::default()
                },
            )
            .await
        }
        _ => unreachable!("handled above"),
    }
}

/// `migrate`: says where the admin key is, never printing one the operator supplied
/// (it would land in logs).
async fn migrate(config: &Config, backends: &app::Backends) -> anyhow::Result<()> {
    match app::migrate(config, backends, false).await? {
        Some(_) if config.admin_key.is_some() => {
            println!("migrations and streams applied; the admin key is GATEWAY_ADMIN_KEY")
        }
        Some(key) => println!("admin key: {key}"),
        None => println!("migrations and streams applied; the admin key is unchanged"),
    }
    Ok(())
}

/// The simulated driver of `up`'s workers.
fn sim_config(min_ms: u64, max_ms: u64, failure_rate: f64) -> anyhow::Result<workers::SimConfig> {
    if !(0.0..=1.0).contains(&failure_rate) {
        anyhow::bail!("SIM_FAILURE_RATE: must be between 0 and 1, got {failure_rate}");
    }
    if min_ms > max_ms {
        anyhow::bail!("SIM_MIN_LATENCY_MS: must not exceed SIM_MAX_LATENCY_MS");
    }
    Ok(workers::SimConfig {
        min_latency: Duration::from_millis(min_ms),
        max_latency: Duration::from_millis(max_ms),
        failure_rate,
        transient_failure_rate: 0.0,
    })
}

/// `up`: everything in one process, on a private authenticated broker unless `NATS_URL`
/// names one; stops that broker when it stops. Ctrl-C and SIGTERM are heard from the
/// start, so a stop while starting still stops the broker.
async fn up(mut config: Config, sim: workers::SimConfig) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    app::cancel_on_signal(stop.clone());
    let (backends, mut broker) = app::connect_for_up(&mut config).await?;
    if config.dispatch_signing_key.is_none() {
        let (key, _) = credentials::dispatch_key(&config.data_dir, false)?;
        config.dispatch_signing_key = Some(key);
    }
    let url = broker.as_ref().map(|b| b.url.clone());
    let running = run_up(&config, backends, sim, url.as_deref(), stop);
    tokio::pin!(running);
    // A broker that dies meanwhile is said so at once (and reaped); `up` goes on.
    let ran = match broker.as_mut() {
        Some(b) => tokio::select! {
            ran = &mut running => ran,
            () = b.watch() => running.await,
        },
        None => running.await,
    };
    if let Some(broker) = broker {
        broker.stop().await;
    }
    ran
}

/// Migrates, starts every part, and runs until `stop`.
async fn run_up(
    config: &Config,
    backends: app::Backends,
    sim: workers::SimConfig,
    broker: Option<&str>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let key = app::migrate(config, &backends, true)
        .await?
        .expect("rotate always yields a key");
    let parts = Parts {
        api: true,
        relay: true,
        reconciler: true,
        workers: Some(sim),
        webhooks: true,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("GATEWAY_LISTEN: cannot listen on {}", config.listen))?;
    let running = app::start(config, backends, Some(listener), parts).await?;
    // A key the operator supplied is theirs: it is never printed.
    let shown = config.admin_key.is_none().then_some(key.as_str());
    print_welcome(&config.public_url(), shown, broker, config);
    stop.cancelled().await;
    running.stop().await;
    Ok(())
}

/// `nats-config`: the broker's users, for the zones given or the database's.
async fn nats_config(
    config: &Config,
    out: &Path,
    mut zones: Vec<String>,
    services: Vec<String>,
    rotate: &[String],
) -> anyhow::Result<()> {
    let mut services = services
        .iter()
        .map(|s| s.parse().map_err(|e| anyhow::anyhow!("--service: {e}")))
        .collect::<anyhow::Result<Vec<gateway_proto::Service>>>()?;
    if zones.is_empty() || services.is_empty() {
        let pool = gateway::store::connect(&config.database_url, 2).await?;
        app::migrate_database(config, &pool).await?;
        if zones.is_empty() {
            zones = app::zone_names(&pool).await?;
        }
        if services.is_empty() {
            services = app::service_names(&pool).await?;
        }
    }
    for zone in &zones {
        gateway_proto::names::check_token("--zone", zone, false).map_err(anyhow::Error::msg)?;
    }
    let written = credentials::write(out, &config.nats, &zones, &services, rotate)?;
    println!(
        "wrote {} (users of stream {}, zones {})\n  new NKEYs: {}\n  kept: {}\n\
         include it in the server's configuration, reload the server (nats-server --signal reload),\n\
         and give each process its own seed: NATS_NKEY_SEED_FILE={}/<user>.nk",
        out.join(credentials::AUTH_CONF).display(),
        config.nats.stream,
        zones.join(", "),
        list(&written.created),
        list(&written.kept),
        out.display(),
    );
    Ok(())
}

fn list(users: &[String]) -> String {
    if users.is_empty() {
        "none".into()
    } else {
        users.join(", ")
    }
}

/// `dispatch-key`: the relay's signing key and the workers' public key, as files.
fn dispatch_key(out: &Path, rotate: bool) -> anyhow::Result<()> {
    let (key, made) = credentials::dispatch_key(out, rotate)?;
    let private = out.join(credentials::DISPATCH_KEY_FILE);
    println!(
        "{} {}\n  relay:   GATEWAY_DISPATCH_SIGNING_KEY_FILE={}\n  \
         workers: WORKER_DISPATCH_PUBLIC_KEYS={} (also in {})\n\
         To rotate: give the workers the old and the new public key (comma-separated), restart them,\n\
         then switch the relays to the new key, and drop the old public key once the stream holds no\n\
         message signed with it.",
        if made { "wrote" } else { "kept" },
        private.display(),
        private.display(),
        key.public_key(),
        out.join(credentials::DISPATCH_PUBLIC_KEY_FILE).display(),
    );
    Ok(())
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

/// What `up` prints once everything runs: the URL, the broker, the admin key when `up`
/// made it (never one the operator supplied), and first commands.
fn print_welcome(url: &str, generated_key: Option<&str>, broker: Option<&str>, config: &Config) {
    let key_lines = match generated_key {
        Some(key) => format!(
            "  Admin key (shown once; set GATEWAY_ADMIN_KEY to fix it):\n    export GW={url} KEY={key}"
        ),
        None => format!(
            "  Admin key: the one in GATEWAY_ADMIN_KEY (not shown).\n    export GW={url} KEY=\"$GATEWAY_ADMIN_KEY\""
        ),
    };
    let nats = match broker {
        Some(nats) => format!(
            "a private NATS at {nats} (authentication on; users and seeds in {})",
            config.data_dir.join("nats").display()
        ),
        None => format!("NATS at {}", gateway::config::redact_url(&config.nats_url)),
    };
    let scope = match &config.region {
        Some(r) => format!(
            "in its zones ({}) as region {}, replicating with {}",
            r.zones.join(", "),
            r.name,
            r.peers.join(", ")
        ),
        None => "and zone".to_owned(),
    };
    // A region's example uses a zone of its own (another's would answer `307`).
    let zone = config
        .region
        .as_ref()
        .and_then(|r| r.zones.first())
        .map_or("zone-a", String::as_str);
    println!(
        r#"
Gateway is up at {url}
  API, relay, reconciler, webhook dispatcher and simulated workers for every service
  {scope} are running, on {nats}.

{key_lines}

  Try it:
    curl -s -X POST $GW/v1/tenants -H "Authorization: Bearer $KEY" \
         -H 'Content-Type: application/json' -d '{{"id": "acme"}}'
    curl -s -X POST $GW/v1/tenants/acme/vms -H "Authorization: Bearer $KEY" \
         -H 'Content-Type: application/json' \
         -d '{{"name": "web-1", "zone": "{zone}", "spec": {{"flavor": "m1.small", "image": "debian-12"}}}}'
    curl -s $GW/v1/operations/<id from the answer> -H "Authorization: Bearer $KEY"
    curl -sN $GW/v1/tenants/acme/events -H "Authorization: Bearer $KEY" -H 'Accept: text/event-stream'

  OpenAPI: {url}/v1/openapi.json    Stop: Ctrl-C
"#
    );
}
