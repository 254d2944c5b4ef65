//! `gateway admin …`: administration straight on the database, for bootstrapping and
//! break-glass work. The writes are the API's own ([`crate::lifecycle::tenants`],
//! [`crate::lifecycle::keys`]), with the same rules; only the permission checks are
//! skipped, since whoever can run this can reach the database. Each command prints
//! what it did; errors name what was wrong.

use crate::audit::anchor::{compare, Anchor, Comparison};
use crate::audit::{self, Verdict};
use crate::config::{Config, UpBroker};
use crate::credentials;
use crate::domain::{Role, Service};
use crate::lifecycle::{self, keys::NewKey};
use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// An admin command (`gateway admin <command>`).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Create a tenant.
    CreateTenant {
        /// Its ID (a DNS label).
        id: String,
        /// Free text for humans.
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Create an API key and print it (once).
    CreateKey {
        /// admin, owner, member, reader or worker.
        #[arg(long)]
        role: Role,
        /// The tenant of an owner, member or reader key.
        #[arg(long)]
        tenant: Option<String>,
        /// The service of a worker key (vm, bm, k8s, storage).
        #[arg(long)]
        service: Option<Service>,
        /// The zone of a worker key.
        #[arg(long)]
        zone: Option<String>,
        /// A unique name; generated when absent.
        #[arg(long)]
        name: Option<String>,
        /// Expiry (RFC 3339).
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// Revoke an API key by ID.
    RevokeKey {
        /// The key's ID.
        id: Uuid,
    },
    /// Check the audit log's hash chain; exits non-zero at the first broken row.
    VerifyAudit,
}

/// How long `verify-audit` tries to reach the broker.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The second half of `verify-audit`: the chain's end saved on the broker must still
/// be in the chain, which shows the newest rows and links removed (what the chain
/// alone cannot). Only with `NATS_URL` set (the deployment's broker, logged in as the
/// `gateway` user with the `NATS_*` credentials): `up`'s private broker has no fixed
/// address.
async fn compare_saved_end(config: &Config, pool: &PgPool) -> anyhow::Result<()> {
    if config.up_broker != UpBroker::Given {
        println!(
            "not compared with the chain's end saved on the broker: NATS_URL is not set \
             (set it, with the gateway's NATS_* credentials, to compare)"
        );
        return Ok(());
    }
    let inbox = workers::nats::inbox_prefix(&config.nats.stream, credentials::GATEWAY);
    let reached = tokio::time::timeout(BROKER_TIMEOUT, async {
        let nats = config
            .nats_login
            .connect(&config.nats_url, credentials::GATEWAY, &inbox)
            .await?;
        workers::nats::wait_connected(&nats, &config.nats_url).await?;
        let anchor = Anchor::new(crate::app::jetstream_on(nats, config), &config.nats);
        compare(&anchor, pool).await
    })
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {BROKER_TIMEOUT:?}")));
    match reached.context("comparing with the chain's end saved on the broker")? {
        Comparison::NothingSaved => {
            println!("no chain's end saved on the broker yet (no sealer has saved one)")
        }
        Comparison::Found(seq) => {
            println!("the chain's end saved on the broker (link {seq}) is in the chain, unchanged")
        }
        Comparison::Missing { chain_seq, how } => bail!(
            "audit log rewritten: the chain's end saved on the broker (link {chain_seq}) is \
             {how}: the newest rows and their links were removed or replaced since a \
             sealer saved it"
        ),
    }
    Ok(())
}

/// Runs `command`, printing its result.
pub async fn run(config: &Config, pool: &PgPool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::CreateTenant { id, display_name } => {
            let t = lifecycle::tenants::create(pool, &id, &display_name, None).await?;
            println!("created tenant {}", t.id);
        }
        Command::CreateKey {
            role,
            tenant,
            service,
            zone,
            name,
            expires_at,
        } => {
            let new = NewKey {
                role,
                tenant,
                service,
                zone,
                name,
                expires_at,
            };
            let created = lifecycle::keys::create(pool, new, None).await?;
            let row = created.row;
            let p = row.principal;
            println!("created {} key {} ({})", p.role, p.name, p.id);
            println!("key: {}", created.key);
        }
        Command::RevokeKey { id } => match lifecycle::keys::revoke(pool, id, None, None).await {
            Ok(()) => println!("revoked key {id}"),
            Err(lifecycle::LifecycleError::NotFound) => bail!("no live key with ID {id}"),
            Err(e) => return Err(e.into()),
        },
        Command::VerifyAudit => {
            match audit::verify(pool).await? {
                Verdict::Intact(n) => println!("audit log intact: {n} entries checked"),
                Verdict::Broken { id, reason } => {
                    bail!("audit log broken at entry {id}: {reason}")
                }
            }
            compare_saved_end(config, pool).await?;
        }
    }
    Ok(())
}
