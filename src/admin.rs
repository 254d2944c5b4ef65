//! `gateway admin …`: administration straight on the database, for bootstrapping and
//! break-glass work. Each command prints what it did; errors name what was wrong.

use crate::audit::{self, Verdict};
use crate::auth::{self, Role};
use crate::domain::{names, Service};
use crate::store::{principals, tenants};
use anyhow::{anyhow, bail};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// An admin command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create a tenant.
    CreateTenant {
        /// Its ID.
        id: String,
        /// Free text.
        display_name: String,
    },
    /// Create a key.
    CreateKey {
        /// Role name.
        role: String,
        /// Tenant of a tenant role.
        tenant: Option<String>,
        /// Service of a worker.
        service: Option<String>,
        /// Zone of a worker.
        zone: Option<String>,
        /// Unique name.
        name: Option<String>,
        /// Expiry.
        expires_at: Option<DateTime<Utc>>,
    },
    /// Revoke a key.
    RevokeKey {
        /// Its ID.
        id: Uuid,
    },
    /// Check the audit chain.
    VerifyAudit,
}

/// Runs `command`, printing its result.
pub async fn run(pool: &PgPool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::CreateTenant { id, display_name } => {
            names::validate_label("id", &id)?;
            let mut conn = pool.acquire().await?;
            match tenants::insert(&mut conn, &id, &display_name).await? {
                Some(t) => println!("created tenant {}", t.id),
                None => bail!("tenant {id:?} already exists"),
            }
        }
        Command::CreateKey {
            role,
            tenant,
            service,
            zone,
            name,
            expires_at,
        } => {
            let role: Role = role.parse()?;
            let needs_tenant = matches!(role, Role::Owner | Role::Member | Role::Reader);
            if needs_tenant != tenant.is_some() {
                bail!("--tenant is required for owner, member and reader keys, and only for them");
            }
            if (role == Role::Worker) != (service.is_some() && zone.is_some()) {
                bail!("--service and --zone are required for worker keys, and only for them");
            }
            if let Some(s) = &service {
                s.parse::<Service>()
                    .map_err(|e| anyhow!("--service: {e}"))?;
            }
            let name = name.unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    role.as_str(),
                    &Uuid::new_v4().simple().to_string()[..8]
                )
            });
            names::validate_label("name", &name)?;
            let key = auth::generate_key();
            let mut conn = pool.acquire().await?;
            let row = principals::insert(
                &mut conn,
                &principals::NewPrincipal {
                    name: &name,
                    role: role.as_str(),
                    tenant: tenant.as_deref(),
                    service: service.as_deref(),
                    zone: zone.as_deref(),
                    key_hash: &auth::hash_key(&key),
                },
                expires_at,
            )
            .await?
            .ok_or_else(|| anyhow!("a key named {name:?} already exists"))?;
            println!("created {} key {} ({})", row.role, row.name, row.id);
            println!("key: {key}");
        }
        Command::RevokeKey { id } => {
            let mut conn = pool.acquire().await?;
            if principals::revoke(&mut conn, id, None).await? {
                println!("revoked key {id}");
            } else {
                bail!("no live key with ID {id}");
            }
        }
        Command::VerifyAudit => match audit::verify(pool).await? {
            Verdict::Intact(n) => println!("audit log intact: {n} entries checked"),
            Verdict::Broken { id, reason } => bail!("audit log broken at entry {id}: {reason}"),
        },
    }
    Ok(())
}
