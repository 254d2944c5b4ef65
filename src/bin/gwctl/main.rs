//! `gwctl`: the gateway for people, on the typed client (`gateway-client`).
//!
//! Exit codes: 0 succeeded; 1 the operation failed or was cancelled (its error code is
//! printed); 2 usage error; 3 API error (its code is printed; also a gateway that cannot
//! be reached); 4 timed out.

mod config;
mod output;

use clap::{Args, CommandFactory, Parser, Subcommand};
use gateway_client::{
    Action, AuditQuery, Client, Error, EventQuery, Kind, NewKeyRequest, NewResource, NewWebhook,
    Operation, OperationQuery, OperationState, QuotaLimit, ResourcePatch, ResourceQuery, Role,
    Service, WebhookPatch,
};
use output::Format;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use uuid::Uuid;

const EXAMPLES: &str = "\
Examples:
  export GWCTL_URL=http://127.0.0.1:8080 GWCTL_KEY=<key>
  gwctl tenants create acme
  gwctl -t acme vms create web-1 --zone zone-a \\
      --spec '{\"flavor\": \"m1.small\", \"image\": \"debian-12\"}' --wait
  gwctl -t acme vms list --label env=prod -o json
  gwctl -t acme vms patch <id> --spec '{\"flavor\": \"m1.large\"}' --label team- --wait
  gwctl -t acme vms action <id> stop --wait
  gwctl -t acme volumes action <id> attach --input '{\"vm_id\": \"<vm id>\"}'
  gwctl ops wait <operation id> --timeout 5m
  gwctl -t acme watch
  gwctl completion bash > /etc/bash_completion.d/gwctl

Configuration: --url/--key, else GWCTL_URL/GWCTL_KEY (or GW/KEY), else the file
$GWCTL_CONFIG or ~/.config/gwctl/config with `url = …`, `key = …`, `tenant = …` lines.

Exit codes: 0 succeeded, 1 the operation failed or was cancelled, 2 usage error,
3 API error (code printed), 4 timed out.";

const VMS_HELP: &str = r#"Actions: start, stop, reboot, resize {"flavor"}

Examples:
  gwctl -t acme vms create web-1 --zone zone-a \
      --spec '{"flavor": "m1.small", "image": "debian-12"}' --wait
  gwctl -t acme vms action <id> resize --input '{"flavor": "m1.large"}' --wait"#;

const BARE_METAL_HELP: &str = r#"Actions: power_on, power_off, reprovision {"image"?}

Examples:
  gwctl -t acme bare-metal create db-1 --zone zone-a \
      --spec '{"machine_class": "bm.standard", "image": "debian-12"}' --wait
  gwctl -t acme bare-metal action <id> power_off"#;

const CLUSTERS_HELP: &str = r#"Actions: scale {"node_count"}, upgrade {"version"}

Examples:
  gwctl -t acme clusters create k1 --zone zone-b \
      --spec '{"version": "1.31", "node_count": 3, "node_flavor": "m1.large"}'
  gwctl -t acme clusters action <id> scale --input '{"node_count": 5}' --wait"#;

const VOLUMES_HELP: &str = r#"Actions: resize {"size_gb"}, attach {"vm_id"}, detach

Examples:
  gwctl -t acme volumes create data --zone zone-a --spec '{"size_gb": 20, "class": "ssd"}'
  gwctl -t acme volumes action <id> attach --input '{"vm_id": "<vm id>"}' --wait"#;

const KEYS_HELP: &str = "\
Examples:
  gwctl -t acme keys create --role member --name ci
  gwctl -t acme keys create --role worker --service vm --zone zone-a   # admins
  gwctl -t acme keys list
  gwctl -t acme keys revoke <key id>
  gwctl keys list --platform                                           # admins
  gwctl keys revoke <key id> --platform";

const OPS_HELP: &str = "\
Examples:
  gwctl ops get <operation id>
  gwctl -t acme ops list --state running --kind vm
  gwctl ops wait <operation id> --timeout 5m
  gwctl ops cancel <operation id> --wait";

const WATCH_HELP: &str = "\
Examples:
  gwctl -t acme watch
  gwctl -t acme watch -o json --timeout 10m | jq -c 'select(.state == \"failed\")'";

const QUOTAS_HELP: &str = "\
Examples:
  gwctl -t acme quotas get
  gwctl -t acme quotas set vcpus=64 count:vm=10 storage_gb:volume:zone-a=500
  gwctl -t acme quotas set --clear";

const EVENTS_HELP: &str = "\
Examples:
  gwctl -t acme events                       # every event kept, oldest first
  gwctl -t acme events --type operation.failed --type operation.cancelled -o json
  gwctl -t acme events --resource <id> --follow
  gwctl -t acme events --after <cursor> -f   # from where an earlier run stopped

With -o json, one JSON object (a CloudEvent) per line.";

const WEBHOOKS_HELP: &str = "\
Examples:
  gwctl -t acme webhooks create https://<your endpoint> --type operation.failed
  gwctl -t acme webhooks list
  gwctl -t acme webhooks deliveries <id>
  gwctl -t acme webhooks retry <id> <delivery id>
  gwctl -t acme webhooks rotate-secret <id>";

const TENANTS_HELP: &str = "\
Examples:
  gwctl tenants create acme --display-name 'Acme Corp'   # admins
  gwctl tenants list
  gwctl tenants get acme -o yaml";

const RESOURCES_HELP: &str = r#"Examples:
  gwctl types list                                # the plurals
  gwctl -t acme resources load-balancers create front --zone zone-a \
      --spec '{"vm": "<vm id>", "port": 443}' --wait
  gwctl -t acme resources load-balancers list -o json"#;

const TYPES_HELP: &str = "\
Examples:
  gwctl types list
  gwctl types get vm -o json
  gwctl types apply -f examples/resource-types/loadbalancer.json   # admins
  gwctl types delete loadbalancer";

const ZONES_HELP: &str = "\
Examples:
  gwctl zones
  gwctl zones -o json";

const CATALOG_HELP: &str = "\
Examples:
  gwctl catalog flavor
  gwctl catalog image -o json";

const AUDIT_HELP: &str = "\
Examples:
  gwctl audit --since 2026-01-01T00:00:00Z
  gwctl -t acme audit --outcome denied -o json
  gwctl audit --principal <key id> --limit 50";

const COMPLETION_HELP: &str = "\
Examples:
  gwctl completion bash > /etc/bash_completion.d/gwctl
  gwctl completion zsh > ~/.zfunc/_gwctl";

/// The gateway's command-line client.
#[derive(Debug, Parser)]
#[command(name = "gwctl", version, after_help = EXAMPLES)]
struct Cli {
    /// The gateway's URL [default: http://127.0.0.1:8080].
    #[arg(long, global = true, env = "GWCTL_URL")]
    url: Option<String>,
    /// The API key.
    #[arg(long, global = true, env = "GWCTL_KEY", hide_env_values = true)]
    key: Option<String>,
    /// The tenant resource commands act on.
    #[arg(short, long, global = true, env = "GWCTL_TENANT")]
    tenant: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tenants: create (admins), list, get.
    #[command(subcommand, after_help = TENANTS_HELP)]
    Tenants(TenantCmd),
    /// API keys of a tenant, or (with --platform) admin and worker keys.
    #[command(subcommand, after_help = KEYS_HELP)]
    Keys(KeyCmd),
    /// Virtual machines.
    #[command(
        subcommand,
        after_help = VMS_HELP
    )]
    Vms(ResourceCmd),
    /// Bare-metal servers.
    #[command(
        subcommand,
        name = "bare-metal",
        after_help = BARE_METAL_HELP
    )]
    BareMetal(ResourceCmd),
    /// Kubernetes clusters.
    #[command(
        subcommand,
        after_help = CLUSTERS_HELP
    )]
    Clusters(ResourceCmd),
    /// Storage volumes.
    #[command(
        subcommand,
        after_help = VOLUMES_HELP
    )]
    Volumes(ResourceCmd),
    /// Resources of any registered kind, by its plural: `gwctl resources load-balancers list`.
    #[command(after_help = RESOURCES_HELP)]
    Resources {
        /// The kind's plural (`gwctl types list` shows them).
        plural: String,
        #[command(subcommand)]
        cmd: ResourceCmd,
    },
    /// Resource types: list, get, apply (register or change), delete.
    #[command(subcommand, after_help = TYPES_HELP)]
    Types(TypesCmd),
    /// Operations: get, list, wait, cancel.
    #[command(subcommand, after_help = OPS_HELP)]
    Ops(OpsCmd),
    /// A live view of the tenant's operations as they change (-o json: a line each).
    #[command(after_help = WATCH_HELP)]
    Watch(WatchArgs),
    /// A tenant's quota limits and usage.
    #[command(subcommand, after_help = QUOTAS_HELP)]
    Quotas(QuotaCmd),
    /// The zones.
    #[command(after_help = ZONES_HELP)]
    Zones,
    /// A catalog category: flavor, image, machine_class, k8s_version, storage_class.
    #[command(after_help = CATALOG_HELP)]
    Catalog {
        /// The category.
        category: String,
    },
    /// The audit log (admins; owners see their tenant's).
    #[command(after_help = AUDIT_HELP)]
    Audit(AuditArgs),
    /// The tenant's events (CloudEvents), oldest first; --follow keeps printing new ones.
    #[command(after_help = EVENTS_HELP)]
    Events(EventArgs),
    /// The tenant's webhook endpoints and their delivery logs (owners).
    #[command(subcommand, after_help = WEBHOOKS_HELP)]
    Webhooks(WebhookCmd),
    /// Prints a shell completion script.
    #[command(after_help = COMPLETION_HELP)]
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    /// Creates a tenant.
    Create {
        /// Its ID, a DNS label.
        id: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Lists the tenants this key may read.
    List,
    /// Shows a tenant.
    Get {
        /// Its ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Creates a key of the tenant (-t); prints its secret once.
    Create {
        /// owner, member, reader, or (admins) worker.
        #[arg(long)]
        role: Role,
        /// A name, unique per tenant.
        #[arg(long)]
        name: Option<String>,
        /// A worker key's service: vm, bm, k8s, storage.
        #[arg(long)]
        service: Option<Service>,
        /// A worker key's zone.
        #[arg(long)]
        zone: Option<String>,
        /// When it stops working (RFC 3339).
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Lists the tenant's keys, or the platform's with --platform.
    List {
        /// Admin and worker keys (admins).
        #[arg(long)]
        platform: bool,
    },
    /// Revokes a key of the tenant, or any key with --platform (admins).
    Revoke {
        /// Its ID.
        id: Uuid,
        /// Through `/v1/keys/{id}`.
        #[arg(long)]
        platform: bool,
    },
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Follow the operation until it ends; print the resulting resource.
    #[arg(short, long)]
    wait: bool,
    /// How long --wait waits: 500ms, 30s, 5m, 1h (at most 8760h); with --wait only.
    #[arg(long, default_value = "10m", value_parser = parse_duration, requires = "wait")]
    timeout: Duration,
}

impl WaitArgs {
    /// Runs `write`; with `--wait`, within `--timeout`, which is the whole command's (a
    /// gateway that takes the request and never answers must not hold it for the HTTP
    /// client's 90 s), and leaves what remains of it for the wait.
    async fn bounded<T>(
        &mut self,
        write: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        if !self.wait {
            return write.await;
        }
        let started = Instant::now();
        let done = tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| Error::TimedOut)?;
        self.timeout = self.timeout.saturating_sub(started.elapsed());
        done
    }
}

#[derive(Debug, Subcommand)]
enum ResourceCmd {
    /// Creates one; prints the operation.
    Create {
        /// Its name, a DNS label.
        name: String,
        /// The zone.
        #[arg(long)]
        zone: String,
        /// The spec as JSON, or @file.
        #[arg(long, value_parser = parse_json)]
        spec: Value,
        /// A label key=value (repeatable).
        #[arg(short, long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Shows one.
    ///
    /// With -o json or -o yaml it has an `etag` field the API's body does not have: the
    /// ETag header's value, for --if-match.
    Get {
        /// Its ID.
        id: Uuid,
    },
    /// Lists them, newest first.
    List {
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only this phase: provisioning, ready, updating, deleting, failed.
        #[arg(long)]
        phase: Option<gateway_client::Phase>,
        /// A label selector: k=v,k2=v2.
        #[arg(short, long)]
        label: Option<String>,
        /// Only those created at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Changes its spec (JSON merge patch) and/or labels.
    Patch {
        /// Its ID.
        id: Uuid,
        /// A merge patch of the spec as JSON, or @file.
        #[arg(long, value_parser = parse_json)]
        spec: Option<Value>,
        /// key=value sets a label, key- removes it (repeatable).
        #[arg(short, long = "label", value_parser = parse_label_change)]
        labels: Vec<(String, Option<String>)>,
        /// Only if the resource's ETag is still this (`get -o json` shows it as `etag`).
        #[arg(long)]
        if_match: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Deletes it; prints the operation.
    Delete {
        /// Its ID.
        id: Uuid,
        /// Only if the resource's ETag is still this (`get -o json` shows it as `etag`).
        #[arg(long)]
        if_match: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Runs an action (see the kind's help for its actions).
    Action {
        /// Its ID.
        id: Uuid,
        /// The action.
        action: Action,
        /// The action's input as JSON, or @file.
        #[arg(long, value_parser = parse_json)]
        input: Option<Value>,
        /// Only if the resource's ETag is still this (`get -o json` shows it as `etag`).
        #[arg(long)]
        if_match: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
struct Paging {
    /// Page size (1–500).
    #[arg(long)]
    limit: Option<u32>,
    /// The previous page's next cursor.
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Debug, Subcommand)]
enum TypesCmd {
    /// Every registered kind.
    List,
    /// One kind's definition.
    Get {
        /// The kind, e.g. `vm`.
        kind: String,
    },
    /// Register a kind, or change it, from a JSON file (admins).
    Apply {
        /// The definition: kind, plural, service, spec_schema, actions, ….
        #[arg(short = 'f', long)]
        file: std::path::PathBuf,
    },
    /// Remove a kind that no live resource has (admins).
    Delete {
        /// The kind.
        kind: String,
    },
}

#[derive(Debug, Subcommand)]
enum OpsCmd {
    /// Shows an operation.
    Get {
        /// Its ID.
        id: Uuid,
    },
    /// Lists the tenant's operations, newest first.
    List {
        /// Only this state.
        #[arg(long)]
        state: Option<OperationState>,
        /// Only this kind: vm, bm, cluster, volume.
        #[arg(long)]
        kind: Option<Kind>,
        /// Only this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only this resource's.
        #[arg(long)]
        resource: Option<Uuid>,
        /// Only those submitted at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Follows an operation until it ends; exits 0 if it succeeded, 1 if not.
    Wait {
        /// Its ID.
        id: Uuid,
        /// How long to wait: 500ms, 30s, 5m, 1h (at most 8760h).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Cancels an operation; with --wait, exits 0 only if it ended cancelled.
    ///
    /// With --wait, follows the operation until it ends: exit 0 if it ended cancelled,
    /// 1 if it succeeded first (the cancel came too late) or failed.
    Cancel {
        /// Its ID.
        id: Uuid,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// How often to look for new operations.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Stop after this long, at most 8760h (default: until interrupted).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct EventArgs {
    /// Only this kind (vm, bm, cluster, volume).
    #[arg(long)]
    kind: Option<Kind>,
    /// Only this zone.
    #[arg(long)]
    zone: Option<String>,
    /// Only events of this resource.
    #[arg(long)]
    resource: Option<Uuid>,
    /// Only events of this operation.
    #[arg(long)]
    operation: Option<Uuid>,
    /// Only these types (repeat it), e.g. operation.succeeded.
    #[arg(long = "type")]
    types: Vec<String>,
    /// After this cursor (default: the oldest event kept).
    #[arg(long)]
    after: Option<String>,
    /// Keep printing new events (polling every --interval) until interrupted; without
    /// it, every event after --after is printed, page after page, and gwctl ends.
    #[arg(long, short = 'f')]
    follow: bool,
    /// How often --follow looks for new events.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
}

#[derive(Debug, Subcommand)]
enum WebhookCmd {
    /// Registers an endpoint; prints its signing secret (shown once).
    Create {
        /// Its URL (https). (Not `url`: that is the gateway's, a global option.)
        #[arg(value_name = "URL")]
        endpoint: String,
        /// Event types to receive (repeat it; none: all).
        #[arg(long = "type")]
        types: Vec<String>,
        /// A description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Lists the tenant's endpoints.
    List,
    /// Shows one endpoint.
    Get {
        /// Its ID.
        id: Uuid,
    },
    /// Re-enables an endpoint (clearing its failure streak).
    Enable {
        /// Its ID.
        id: Uuid,
    },
    /// Pauses an endpoint.
    Disable {
        /// Its ID.
        id: Uuid,
    },
    /// Gives an endpoint a new signing secret (the old one signs too for a grace period).
    RotateSecret {
        /// Its ID.
        id: Uuid,
    },
    /// Deletes an endpoint and its delivery log.
    Delete {
        /// Its ID.
        id: Uuid,
    },
    /// An endpoint's deliveries, newest first.
    Deliveries {
        /// The endpoint's ID.
        id: Uuid,
        #[command(flatten)]
        paging: Paging,
    },
    /// Sends a delivery again now.
    Retry {
        /// The endpoint's ID.
        id: Uuid,
        /// The delivery's ID.
        delivery: Uuid,
    },
}

#[derive(Debug, Subcommand)]
enum QuotaCmd {
    /// Shows the tenant's limits and usage.
    Get,
    /// Replaces the tenant's limits (admins): `DIMENSION[:KIND[:ZONE]]=LIMIT`, `*` for any.
    ///
    /// Limits not given are removed; --clear (instead of limits) removes them all.
    #[command(group(clap::ArgGroup::new("new_limits").required(true).args(["limits", "clear"])))]
    Set {
        /// For example vcpus=64, count:vm=10, storage_gb:volume:zone-a=500.
        #[arg(value_parser = parse_limit)]
        limits: Vec<QuotaLimit>,
        /// Remove every limit (the tenant is then limited by nothing).
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Only this key.
    #[arg(long)]
    principal: Option<Uuid>,
    /// Only this outcome.
    #[arg(long)]
    outcome: Option<String>,
    /// Only entries at or after this instant (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    paging: Paging,
}

/// Why `gwctl` stops early: the exit code and what to say.
struct Fail(u8, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        match e {
            Error::TimedOut => Fail(4, "error: timed out".into()),
            Error::Api {
                code,
                message,
                details,
                ..
            } => {
                // The details say where (a field) or what (the resource that has the
                // name): compact JSON on a line of their own.
                let details = details.map_or(String::new(), |d| format!("\n  details: {d}"));
                Fail(3, format!("error: {code}: {message}{details}"))
            }
            Error::Transport(e) => {
                // reqwest keeps the telling part (connection refused, …) in the sources.
                let mut message = format!("error: cannot reach the gateway: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                Fail(3, message)
            }
            other => Fail(3, format!("error: {other}")),
        }
    }
}

type Outcome = Result<(), Fail>;

fn usage(message: impl Into<String>) -> Fail {
    Fail(2, format!("error: {}", message.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, message)) => {
            eprintln!("{message}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Completion { shell } = cli.command {
        // Into memory first: `generate` panics when it cannot write.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "gwctl", &mut script);
        output::emit(script);
        return Ok(());
    }
    let settings = config::Settings::resolve(cli.url, cli.key, cli.tenant).map_err(usage)?;
    let gw = Client::new(&settings.url, &settings.key);
    let ctx = Ctx {
        gw,
        tenant: settings.tenant,
        format: cli.output,
    };
    match cli.command {
        Command::Tenants(cmd) => ctx.tenants(cmd).await,
        Command::Keys(cmd) => ctx.keys(cmd).await,
        Command::Vms(cmd) => ctx.resources("vms", cmd).await,
        Command::BareMetal(cmd) => ctx.resources("bare-metal", cmd).await,
        Command::Clusters(cmd) => ctx.resources("clusters", cmd).await,
        Command::Volumes(cmd) => ctx.resources("volumes", cmd).await,
        Command::Resources { plural, cmd } => ctx.resources(&plural, cmd).await,
        Command::Types(cmd) => ctx.types(cmd).await,
        Command::Ops(cmd) => ctx.ops(cmd).await,
        Command::Watch(args) => ctx.watch(args).await,
        Command::Quotas(cmd) => ctx.quotas(cmd).await,
        Command::Zones => {
            output::many(&ctx.gw.zones().await?, ctx.format);
            Ok(())
        }
        Command::Catalog { category } => {
            output::many(&ctx.gw.catalog(&category).await?, ctx.format);
            Ok(())
        }
        Command::Audit(args) => ctx.audit(args).await,
        Command::Events(args) => ctx.events(args).await,
        Command::Webhooks(cmd) => ctx.webhooks(cmd).await,
        Command::Completion { .. } => unreachable!("handled above"),
    }
}

struct Ctx {
    gw: Client,
    tenant: Option<String>,
    format: Format,
}

impl Ctx {
    fn tenant(&self) -> Result<&str, Fail> {
        self.tenant
            .as_deref()
            .ok_or_else(|| usage("this command needs a tenant: -t/--tenant, GWCTL_TENANT or `tenant =` in the config file"))
    }

    async fn tenants(&self, cmd: TenantCmd) -> Outcome {
        match cmd {
            TenantCmd::Create { id, display_name } => output::one(
                &self.gw.create_tenant(&id, &display_name).await?,
                self.format,
            ),
            TenantCmd::List => output::many(&self.gw.list_tenants().await?, self.format),
            TenantCmd::Get { id } => output::one(&self.gw.get_tenant(&id).await?, self.format),
        }
        Ok(())
    }

    async fn keys(&self, cmd: KeyCmd) -> Outcome {
        match cmd {
            KeyCmd::Create {
                role,
                name,
                service,
                zone,
                expires_at,
            } => {
                let req = NewKeyRequest {
                    role,
                    service,
                    zone,
                    name,
                    expires_at,
                };
                let key = self.gw.create_key(self.tenant()?, &req).await?;
                output::one(&key, self.format);
            }
            KeyCmd::List { platform: true } => {
                output::many(&self.gw.list_platform_keys().await?, self.format)
            }
            KeyCmd::List { platform: false } => {
                output::many(&self.gw.list_keys(self.tenant()?).await?, self.format)
            }
            KeyCmd::Revoke { id, platform: true } => self.gw.revoke_any_key(id).await?,
            KeyCmd::Revoke {
                id,
                platform: false,
            } => self.gw.revoke_key(self.tenant()?, id).await?,
        }
        Ok(())
    }

    async fn types(&self, cmd: TypesCmd) -> Outcome {
        let gw = &self.gw;
        match cmd {
            TypesCmd::List => output::many(&gw.resource_types().await?, self.format),
            TypesCmd::Get { kind } => output::one(&gw.resource_type(&kind).await?, self.format),
            TypesCmd::Apply { file } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| usage(format!("{}: {e}", file.display())))?;
                let def: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| usage(format!("{}: not JSON: {e}", file.display())))?;
                check_definition(&def).map_err(|e| usage(format!("{}: {e}", file.display())))?;
                output::one(&gw.put_resource_type(&def).await?, self.format);
            }
            TypesCmd::Delete { kind } => gw.delete_resource_type(&kind).await?,
        }
        Ok(())
    }

    async fn resources(&self, kind: &str, cmd: ResourceCmd) -> Outcome {
        let t = self.tenant()?;
        let gw = &self.gw;
        let (op, wait) = match cmd {
            ResourceCmd::Get { id } => {
                output::one(&gw.get_resource(t, kind, id).await?, self.format);
                return Ok(());
            }
            ResourceCmd::List {
                zone,
                phase,
                label,
                since,
                paging,
            } => {
                let q = ResourceQuery {
                    zone,
                    phase,
                    since,
                    label,
                    limit: paging.limit,
                    cursor: paging.cursor,
                };
                output::page(&gw.list_resources(t, kind, &q).await?, self.format);
                return Ok(());
            }
            write => self.write(t, kind, write).await?,
        };
        self.submitted(op, wait, kind).await
    }

    /// A write of a resource (create, patch, delete, action): its operation, and how to
    /// wait for it (`--timeout` bounding the request too).
    async fn write(
        &self,
        t: &str,
        kind: &str,
        cmd: ResourceCmd,
    ) -> Result<(Operation, WaitArgs), Fail> {
        let gw = &self.gw;
        Ok(match cmd {
            ResourceCmd::Get { .. } | ResourceCmd::List { .. } => return Err(usage("not a write")),
            ResourceCmd::Create {
                name,
                zone,
                spec,
                labels,
                mut wait,
            } => {
                let new = NewResource {
                    name,
                    zone,
                    spec,
                    labels: labels.into_iter().collect(),
                };
                (wait.bounded(gw.create_resource(t, kind, &new)).await?, wait)
            }
            ResourceCmd::Patch {
                id,
                spec,
                labels,
                if_match,
                mut wait,
            } => {
                if spec.is_none() && labels.is_empty() {
                    return Err(usage("patch needs --spec, --label or both"));
                }
                let patch = ResourcePatch {
                    spec,
                    labels: (!labels.is_empty()).then(|| labels.into_iter().collect()),
                };
                let op = wait
                    .bounded(gw.patch_resource(t, kind, id, &patch, if_match.as_deref()))
                    .await?;
                (op, wait)
            }
            ResourceCmd::Delete {
                id,
                if_match,
                mut wait,
            } => (
                wait.bounded(gw.delete_resource(t, kind, id, if_match.as_deref()))
                    .await?,
                wait,
            ),
            ResourceCmd::Action {
                id,
                action,
                input,
                if_match,
                mut wait,
            } => {
                let input = input.unwrap_or_else(|| serde_json::json!({}));
                let op = wait
                    .bounded(gw.action(t, kind, id, action, &input, if_match.as_deref()))
                    .await?;
                (op, wait)
            }
        })
    }

    /// After a write: print the operation, or with --wait follow it and print the
    /// resource it left (the operation itself for deletes and failures).
    async fn submitted(&self, op: Operation, wait: WaitArgs, plural: &str) -> Outcome {
        if !wait.wait {
            output::one(&op, self.format);
            return Ok(());
        }
        let done = self.follow(op.id, wait.timeout).await?;
        if done.state == OperationState::Succeeded && !done.action.is_delete() {
            let resource = self
                .gw
                .get_resource(&done.tenant, plural, done.resource_id)
                .await?;
            output::one(&resource, self.format);
            return Ok(());
        }
        self.finished(done)
    }

    /// Prints a finished operation; exit 1 unless it succeeded.
    fn finished(&self, op: Operation) -> Outcome {
        output::one(&op, self.format);
        verdict(&op)
    }

    /// Waits for an operation, showing progress on stderr: one line rewritten in place
    /// on a terminal, a line per change when piped.
    async fn follow(&self, id: Uuid, timeout: Duration) -> Result<Operation, Fail> {
        let start = Instant::now();
        let live = std::io::stderr().is_terminal();
        // The latest answer, which the terminal's ticker redraws with the time elapsed.
        let last = std::sync::Mutex::new(None::<Operation>);
        let progress = |op: &Operation| {
            let mut last = last.lock().expect("not poisoned");
            let changed = last
                .as_ref()
                .is_none_or(|l| (l.state, l.attempt) != (op.state, op.attempt));
            if live {
                eprint!("\r\x1b[K{}", progress_line(op, start.elapsed()));
                if op.done {
                    eprintln!();
                }
            } else if changed {
                eprintln!("{}", progress_line(op, start.elapsed()));
            }
            *last = Some(op.clone());
        };
        let waiting = self.gw.wait_with(id, timeout, &progress);
        if !live {
            return Ok(waiting.await?);
        }
        tokio::pin!(waiting);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                done = &mut waiting => {
                    if done.is_err() {
                        eprintln!();
                    }
                    return Ok(done?);
                }
                _ = tick.tick() => {
                    if let Some(op) = last.lock().expect("not poisoned").as_ref() {
                        eprint!("\r\x1b[K{}", progress_line(op, start.elapsed()));
                    }
                }
            }
        }
    }

    async fn ops(&self, cmd: OpsCmd) -> Outcome {
        match cmd {
            OpsCmd::Get { id } => output::one(&self.gw.get_operation(id).await?, self.format),
            OpsCmd::List {
                state,
                kind,
                zone,
                resource,
                since,
                paging,
            } => {
                let q = OperationQuery {
                    state,
                    kind,
                    zone,
                    resource_id: resource,
                    since,
                    limit: paging.limit,
                    cursor: paging.cursor,
                };
                let page = self.gw.list_operations(self.tenant()?, &q).await?;
                output::page(&page, self.format);
            }
            OpsCmd::Wait { id, timeout } => {
                let done = self.follow(id, timeout).await?;
                return self.finished(done);
            }
            OpsCmd::Cancel { id, mut wait } => {
                let op = wait.bounded(self.gw.cancel_operation(id)).await?;
                if !wait.wait {
                    output::one(&op, self.format);
                    return Ok(());
                }
                let done = self.follow(op.id, wait.timeout).await?;
                output::one(&done, self.format);
                return cancel_verdict(&done);
            }
        }
        Ok(())
    }

    async fn quotas(&self, cmd: QuotaCmd) -> Outcome {
        let t = self.tenant()?;
        let q = match cmd {
            QuotaCmd::Get => self.gw.get_quotas(t).await?,
            QuotaCmd::Set { limits, .. } => self.gw.set_quotas(t, &limits).await?,
        };
        output::one(&q, self.format);
        Ok(())
    }

    /// Prints the tenant's events, page after page until the cursor stops moving (the
    /// newest event read); with `--follow`, then polls for new ones with the cursor.
    async fn events(&self, args: EventArgs) -> Outcome {
        let t = self.tenant()?.to_owned();
        let mut query = EventQuery {
            kind: args.kind,
            zone: args.zone,
            resource: args.resource,
            operation: args.operation,
            types: args.types,
            after: args.after,
            limit: Some(500),
        };
        // Types, resource and operation are filtered from what the gateway read.
        let filtered = !query.types.is_empty() || query.resource.is_some();
        let filtered = filtered || query.operation.is_some();
        let mut header = self.format == Format::Table;
        loop {
            let page = self.gw.events(&t, &query).await?;
            if header {
                output::emit_line(&output::table_header::<gateway_client::CloudEvent>());
                header = false;
            }
            for e in &page.items {
                output::line(e, self.format);
            }
            let moved = query.after.as_deref() != Some(page.next_cursor.as_str());
            let empty = page.items.is_empty();
            query.after = Some(page.next_cursor);
            match after_page(moved, empty, filtered, args.follow) {
                Next::Page => {}
                Next::Wait => tokio::time::sleep(args.interval).await,
                Next::Stop => return Ok(()),
            }
        }
    }

    async fn webhooks(&self, cmd: WebhookCmd) -> Outcome {
        let t = self.tenant()?;
        let enabled = |id, on| {
            let patch = WebhookPatch {
                enabled: Some(on),
                ..Default::default()
            };
            (id, patch)
        };
        match cmd {
            WebhookCmd::Create {
                endpoint,
                types,
                description,
            } => {
                let hook = NewWebhook {
                    url: endpoint,
                    types,
                    description,
                };
                output::one(&self.gw.create_webhook(t, &hook).await?, self.format);
            }
            WebhookCmd::List => output::many(&self.gw.list_webhooks(t).await?, self.format),
            WebhookCmd::Get { id } => output::one(&self.gw.get_webhook(t, id).await?, self.format),
            WebhookCmd::Enable { id } => {
                let (id, patch) = enabled(id, true);
                output::one(&self.gw.update_webhook(t, id, &patch).await?, self.format);
            }
            WebhookCmd::Disable { id } => {
                let (id, patch) = enabled(id, false);
                output::one(&self.gw.update_webhook(t, id, &patch).await?, self.format);
            }
            WebhookCmd::RotateSecret { id } => {
                output::one(&self.gw.rotate_webhook_secret(t, id).await?, self.format);
            }
            WebhookCmd::Delete { id } => self.gw.delete_webhook(t, id).await?,
            WebhookCmd::Deliveries { id, paging } => {
                let page = self
                    .gw
                    .list_deliveries(t, id, paging.limit, paging.cursor.as_deref())
                    .await?;
                output::page(&page, self.format);
            }
            WebhookCmd::Retry { id, delivery } => {
                output::one(&self.gw.retry_delivery(t, id, delivery).await?, self.format);
            }
        }
        Ok(())
    }

    async fn audit(&self, args: AuditArgs) -> Outcome {
        let q = AuditQuery {
            tenant: self.tenant.clone(),
            principal_id: args.principal,
            outcome: args.outcome,
            since: args.since,
            limit: args.paging.limit,
            cursor: args.paging.cursor,
        };
        output::page(&self.gw.audit(&q).await?, self.format);
        Ok(())
    }

    /// Prints each change of the tenant's operations as a line (a JSON line with
    /// `-o json`): operations submitted since the watch began, and those unfinished
    /// when it began. Between looks it long-polls an unfinished operation, so changes
    /// show at once; with none it sleeps `interval`. With `--timeout` it ends then
    /// (exit 0), even in the middle of a request the gateway does not answer.
    async fn watch(&self, args: WatchArgs) -> Outcome {
        let t = self.tenant()?.to_owned();
        let watching = self.watch_changes(&t, args.interval);
        match args.timeout {
            Some(timeout) => tokio::time::timeout(timeout, watching)
                .await
                .unwrap_or(Ok(())),
            None => watching.await,
        }
    }

    /// [`Ctx::watch`]'s loop: it ends only on an error.
    async fn watch_changes(&self, t: &str, interval: Duration) -> Outcome {
        let started = chrono::Utc::now();
        let mut seen: HashMap<Uuid, (OperationState, i32)> = HashMap::new();
        let mut tracked: BTreeSet<Uuid> = BTreeSet::new();
        // The first look lists the unfinished operations of before the watch.
        let mut first = true;
        if self.format == Format::Table {
            output::emit_line(&watch_header());
        }
        loop {
            let mut ops = Vec::new();
            let query = OperationQuery {
                since: (!first).then_some(started - chrono::Duration::seconds(1)),
                limit: Some(500),
                ..Default::default()
            };
            let page = self.gw.list_operations(t, &query).await?;
            ops.extend(page.items.into_iter().filter(|o| !first || !o.done));
            for id in &tracked {
                if !ops.iter().any(|o| o.id == *id) {
                    ops.push(self.gw.get_operation(*id).await?);
                }
            }
            first = false;
            ops.sort_by_key(|o| o.updated_at);
            for op in ops {
                let now = (op.state, op.attempt);
                if seen.insert(op.id, now) != Some(now) {
                    self.watch_line(&op);
                }
                if op.done {
                    tracked.remove(&op.id);
                } else if op.created_at < started {
                    tracked.insert(op.id);
                }
            }
            let unfinished = seen
                .iter()
                .find(|(_, (state, _))| !state.is_terminal())
                .map(|(id, _)| *id);
            match unfinished {
                Some(id) => {
                    self.gw.poll_operation(id, interval).await?;
                }
                None => tokio::time::sleep(interval).await,
            }
        }
    }

    fn watch_line(&self, op: &Operation) {
        match self.format {
            Format::Table => output::emit_line(&watch_row(op)),
            _ => output::line(op, self.format),
        }
    }
}

/// What `events` does after a page.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Asks for the next page at once.
    Page,
    /// Asks again after `--interval`.
    Wait,
    /// Ends: every event is printed.
    Stop,
}

/// What `events` does after a page: whether the cursor `moved`, the page was `empty`,
/// the events read were `filtered` (by type, resource or operation) and it `follow`s.
///
/// A page may be short, even empty, while the cursor moves on: filters drop events of
/// a full page. So the end is a cursor that stays put, or an empty page where nothing
/// was filtered out (its cursor may still move past other tenants' events, and on a
/// busy gateway never stop). Following, an empty page waits too, not to spin there.
fn after_page(moved: bool, empty: bool, filtered: bool, follow: bool) -> Next {
    let end = !moved || (empty && !filtered);
    match follow {
        false if end => Next::Stop,
        true if !moved || empty => Next::Wait,
        _ => Next::Page,
    }
}

/// A finished operation's exit: 0 if it succeeded, else 1 with its error.
fn verdict(op: &Operation) -> Outcome {
    match op.state {
        OperationState::Succeeded => Ok(()),
        state => {
            let (code, message) = op
                .error
                .as_ref()
                .map(|e| (e.code.clone(), e.message.clone()))
                .unwrap_or_else(|| (state.to_string(), String::new()));
            Err(Fail(1, format!("operation {state}: {code}: {message}")))
        }
    }
}

/// A cancelled operation's exit, once it has ended: 0 if it ended cancelled (what was
/// asked for), else 1: too late if it succeeded, its error if it failed.
fn cancel_verdict(op: &Operation) -> Outcome {
    match op.state {
        OperationState::Cancelled => Ok(()),
        OperationState::Failed => verdict(op),
        state => Err(Fail(
            1,
            format!("operation {state}: the cancel came too late"),
        )),
    }
}

/// Columns of `watch` (fixed widths: rows print as they come).
const WATCH_COLUMNS: [(&str, usize); 8] = [
    ("TIME", 8),
    ("KIND", 7),
    ("ACTION", 11),
    ("STATE", 10),
    ("ATTEMPT", 7),
    ("OPERATION", 36),
    ("RESOURCE", 36),
    ("ERROR", 0),
];

fn watch_header() -> String {
    let cells = WATCH_COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    watch_cells(cells)
}

fn watch_row(op: &Operation) -> String {
    watch_cells(vec![
        op.updated_at.format("%H:%M:%S").to_string(),
        op.kind.to_string(),
        op.action.to_string(),
        op.state.to_string(),
        op.attempt.to_string(),
        op.id.to_string(),
        op.resource_id.to_string(),
        op.error.as_ref().map_or("-".into(), |e| e.code.clone()),
    ])
}

fn watch_cells(cells: Vec<String>) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(WATCH_COLUMNS)
        .map(|(c, (_, w))| format!("{c:<w$}"))
        .collect();
    padded.join("  ").trim_end().to_owned()
}

fn progress_line(op: &Operation, elapsed: Duration) -> String {
    let mut line = format!(
        "operation {} {} {}: {} (attempt {}, {:.1}s)",
        op.id,
        op.action,
        op.kind,
        op.state,
        op.attempt,
        elapsed.as_secs_f64()
    );
    if let Some(e) = &op.error {
        line.push_str(&format!(" {}: {}", e.code, e.message));
    }
    line
}

/// The longest duration a flag takes: a year (8760h).
const LONGEST: Duration = Duration::from_secs(8760 * 3600);

/// A duration flag: a whole number and a unit (`ms`, `s` or none, `m`, `h`), a year
/// (8760h) at most.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 30s, 5m)"))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("unknown unit {unit:?} (ms, s, m, h)")),
    };
    let duration = n
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|d| *d <= LONGEST);
    duration.ok_or_else(|| format!("longer than a year: {text:?} (at most 8760h)"))
}

/// Whether a resource type's definition names its kind (a non-empty string), which
/// goes in the URL it is sent to.
fn check_definition(def: &Value) -> Result<(), String> {
    if !def.is_object() {
        return Err("the definition must be a JSON object".into());
    }
    match def.get("kind") {
        Some(Value::String(kind)) if !kind.is_empty() => Ok(()),
        None => Err("the definition has no `kind` field".into()),
        Some(_) => Err("`kind` must be a non-empty string, such as \"load_balancer\"".into()),
    }
}

fn parse_json(text: &str) -> Result<Value, String> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => text.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {text:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_label_change(text: &str) -> Result<(String, Option<String>), String> {
    match text.strip_suffix('-') {
        Some(k) if !text.contains('=') => Ok((k.to_owned(), None)),
        _ => parse_label(text).map(|(k, v)| (k, Some(v))),
    }
}

/// A quota limit flag: `DIMENSION[:KIND[:ZONE]]=LIMIT`, `*` (or nothing) for any kind
/// or zone.
fn parse_limit(text: &str) -> Result<QuotaLimit, String> {
    let expected = || format!("expected DIMENSION[:KIND[:ZONE]]=LIMIT, got {text:?}");
    let (scope, limit) = text.split_once('=').ok_or_else(expected)?;
    let limit = limit
        .parse()
        .map_err(|_| format!("not a number: {limit:?}"))?;
    let parts: Vec<&str> = scope.split(':').collect();
    if parts.len() > 3 || parts[0].is_empty() {
        return Err(expected());
    }
    let any = |i: usize| {
        parts
            .get(i)
            .filter(|p| **p != "*" && !p.is_empty())
            .map(|p| p.to_string())
    };
    let dimension = parts[0].to_owned();
    let kind = any(1)
        .map(|k| k.parse::<Kind>().map_err(|e| e.to_string()))
        .transpose()?;
    let zone = any(2);
    Ok(QuotaLimit {
        dimension,
        kind,
        zone,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_duration("8760h"), Ok(LONGEST));
        assert_eq!(parse_duration("525600m"), Ok(LONGEST));
        for huge in [
            "8761h",
            "31536000001ms",
            "307445734561825861m",
            "18446744073709551615s",
            "9999999999999h",
        ] {
            let err = parse_duration(huge).unwrap_err();
            assert!(err.contains("longer than a year"), "{huge}: {err}");
        }
        assert!(parse_duration("18446744073709551616s").is_err(), "past u64");
        assert_eq!(parse_label_change("team-"), Ok(("team".into(), None)));
        assert_eq!(
            parse_label_change("env=a-"),
            Ok(("env".into(), Some("a-".into())))
        );
        let l = parse_limit("storage_gb:volume:zone-a=500").unwrap();
        assert_eq!(
            (l.dimension.as_str(), l.kind, l.zone.as_deref(), l.limit),
            (
                "storage_gb",
                Some(Kind::named("volume")),
                Some("zone-a"),
                500
            )
        );
        let l = parse_limit("vcpus:*:zone-b=8").unwrap();
        assert_eq!((l.kind, l.zone.as_deref()), (None, Some("zone-b")));
        for wrong in ["count:vm:zone-a:typo=5", "=5", ":vm=5", "count", "count=x"] {
            assert!(parse_limit(wrong).is_err(), "{wrong}");
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn events_page_on_until_the_end() {
        // Without --follow: on past short and empty pages while the cursor moves, if a
        // filter may have emptied them.
        assert_eq!(after_page(true, false, false, false), Next::Page);
        assert_eq!(after_page(true, false, true, false), Next::Page);
        assert_eq!(after_page(true, true, true, false), Next::Page);
        assert_eq!(after_page(true, true, false, false), Next::Stop);
        assert_eq!(after_page(false, true, true, false), Next::Stop);
        assert_eq!(after_page(false, false, false, false), Next::Stop);
        // With --follow: never stops; waits at the end and after an empty page.
        assert_eq!(after_page(true, false, true, true), Next::Page);
        assert_eq!(after_page(true, true, true, true), Next::Wait);
        assert_eq!(after_page(true, true, false, true), Next::Wait);
        assert_eq!(after_page(false, false, false, true), Next::Wait);
    }

    /// Whether `args` (after `gwctl`) are refused as a usage error (exit 2).
    fn refused(args: &[&str]) -> bool {
        let args = std::iter::once("gwctl").chain(args.iter().copied());
        Cli::try_parse_from(args).is_err_and(|e| e.exit_code() == 2)
    }

    #[test]
    fn usage_errors_are_caught_by_the_parser() {
        assert!(refused(&["quotas", "set"]), "no limits and no --clear");
        assert!(refused(&["quotas", "set", "--clear", "vcpus=1"]));
        assert!(refused(&["quotas", "set", "count:vm:zone-a:typo=5"]));
        assert!(!refused(&["quotas", "set", "--clear"]));
        assert!(!refused(&["quotas", "set", "vcpus=1", "count:vm=2"]));
        let id = Uuid::nil().to_string();
        assert!(refused(&[
            "ops",
            "wait",
            &id,
            "--timeout",
            "307445734561825861m"
        ]));
        assert!(refused(&[
            "ops",
            "wait",
            &id,
            "--timeout",
            "18446744073709551615s"
        ]));
        assert!(refused(&["watch", "--timeout", "9999999999999h"]));
        assert!(!refused(&["ops", "wait", &id, "--timeout", "8760h"]));
        // A write's --timeout bounds its --wait: alone it would be ignored.
        assert!(refused(&["vms", "delete", &id, "--timeout", "2s"]));
        assert!(refused(&["ops", "cancel", &id, "--timeout", "2s"]));
        assert!(!refused(&[
            "vms",
            "delete",
            &id,
            "--wait",
            "--timeout",
            "2s"
        ]));
        assert!(!refused(&["vms", "delete", &id]));
    }

    /// The example commands of a help text: lines that start with `gwctl` (joined over
    /// `\` line ends), placeholders filled in, split as a shell would (single quotes),
    /// up to a pipe, a redirection or a comment.
    fn examples(help: &str) -> Vec<Vec<String>> {
        help.replace("\\\n", " ")
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("gwctl "))
            .map(|l| shell_words(&fill(l)))
            .collect()
    }

    /// `line` with each `<placeholder>` replaced by a value of its kind.
    fn fill(line: &str) -> String {
        let mut out = String::new();
        let mut rest = line;
        while let Some(start) = rest.find('<') {
            let end = start + rest[start..].find('>').expect("a closed placeholder");
            let value = match &rest[start + 1..end] {
                "cursor" => "1".to_owned(),
                "your endpoint" => "hooks.example/gw".to_owned(),
                name if name.ends_with("id") => Uuid::nil().to_string(),
                name => panic!("an unknown placeholder <{name}> in {line:?}"),
            };
            out.push_str(&rest[..start]);
            out.push_str(&value);
            rest = &rest[end + 1..];
        }
        out + rest
    }

    /// `line`'s words, as a shell splits them (single quotes only), up to `|`, `>` or `#`.
    fn shell_words(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word: Option<String> = None;
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    word.get_or_insert_with(String::new);
                }
                _ if quoted => word.get_or_insert_with(String::new).push(c),
                '|' | '>' | '#' if word.is_none() => break,
                c if c.is_whitespace() => words.extend(word.take()),
                c => word.get_or_insert_with(String::new).push(c),
            }
        }
        words.extend(word);
        words
    }

    #[test]
    fn every_example_in_the_help_parses() {
        let helps = [
            EXAMPLES,
            VMS_HELP,
            BARE_METAL_HELP,
            CLUSTERS_HELP,
            VOLUMES_HELP,
            KEYS_HELP,
            OPS_HELP,
            WATCH_HELP,
            QUOTAS_HELP,
            EVENTS_HELP,
            WEBHOOKS_HELP,
            TENANTS_HELP,
            RESOURCES_HELP,
            TYPES_HELP,
            ZONES_HELP,
            CATALOG_HELP,
            AUDIT_HELP,
            COMPLETION_HELP,
        ];
        for help in helps {
            let commands = examples(help);
            assert!(!commands.is_empty(), "no examples in {help}");
            for args in commands {
                if let Err(e) = Cli::try_parse_from(&args) {
                    panic!("{args:?}: {e}");
                }
            }
        }
        let jq = shell_words("gwctl watch -o json | jq -c 'select(.a == \"b\")'");
        assert_eq!(jq, ["gwctl", "watch", "-o", "json"]);
        let spec = shell_words("gwctl x --spec '{\"a\": 1}' # note");
        assert_eq!(spec, ["gwctl", "x", "--spec", "{\"a\": 1}"]);
    }

    #[test]
    fn every_command_has_examples() {
        for command in Cli::command().get_subcommands() {
            if command.get_name() == "help" {
                continue;
            }
            let help = command.get_after_help().map(|h| h.to_string());
            assert!(
                help.is_some_and(|h| h.contains("Examples:")),
                "gwctl {} has no examples in its help",
                command.get_name()
            );
        }
    }

    /// An operation that ended in `state`.
    fn ended(state: &str, error: Option<&str>) -> Operation {
        let at = "2026-01-01T00:00:00Z";
        let error = error.map(|code| serde_json::json!({"code": code, "message": "m"}));
        serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "tenant": "acme", "resource_id": Uuid::nil(), "kind": "vm",
            "zone": "zone-a", "action": "create", "state": state, "done": true,
            "attempt": 1, "target_generation": 1, "cancel_requested": true,
            "request_id": "r", "created_at": at, "updated_at": at, "deadline": at,
            "error": error,
        }))
        .expect("an operation")
    }

    #[test]
    fn a_cancel_succeeds_only_if_the_operation_ended_cancelled() {
        assert!(cancel_verdict(&ended("cancelled", None)).is_ok());
        let Err(Fail(code, message)) = cancel_verdict(&ended("succeeded", None)) else {
            panic!("a cancel that came too late is no success");
        };
        assert_eq!(code, 1);
        assert_eq!(message, "operation succeeded: the cancel came too late");
        let Err(Fail(code, message)) = cancel_verdict(&ended("failed", Some("boom"))) else {
            panic!("a failed operation is no success");
        };
        assert_eq!((code, message.as_str()), (1, "operation failed: boom: m"));
    }

    #[test]
    fn a_type_definition_must_name_its_kind() {
        assert!(check_definition(&serde_json::json!({"kind": "lb", "plural": "lbs"})).is_ok());
        for def in [
            serde_json::json!({"plural": "x"}),
            serde_json::json!({"kind": "", "plural": "x"}),
            serde_json::json!({"kind": 3}),
            serde_json::json!({"kind": null}),
            serde_json::json!(["kind"]),
        ] {
            let err = check_definition(&def).unwrap_err();
            assert!(
                err.contains("kind") || err.contains("object"),
                "{def}: {err}"
            );
        }
    }
}
