//! Creating and revoking API keys: the one rule set for the API
//! (`/v1/tenants/{t}/keys`) and the admin CLI (`gateway admin create-key`,
//! `revoke-key`). Who may ask for which key is the caller's business (the API's
//! permission checks); what a key may be is decided here.

use super::txn::commit_audited;
use super::{Audit, LifecycleError};
use crate::auth;
use crate::domain::{names, Role, Service, ValidationError};
use crate::store::principals::{self, KeyRow, NewPrincipal};
use crate::store::{catalog, tenants};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Its role.
    pub role: Role,
    /// The tenant of an owner, member or reader key (and only of those).
    pub tenant: Option<String>,
    /// The service of a worker key (and only of those).
    pub service: Option<Service>,
    /// The zone of a worker key (and only of those).
    pub zone: Option<String>,
    /// A name (a DNS label), unique within its tenant or among platform keys;
    /// generated when absent.
    pub name: Option<String>,
    /// When it stops working; never when absent.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key just created: the secret, shown this once, and what is kept of it.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The key itself; only its hash is stored.
    pub key: String,
    /// The stored key.
    pub row: KeyRow,
}

fn invalid(field: &str, message: &str) -> LifecycleError {
    ValidationError::new("invalid_key", field, message).into()
}

/// Checks what a key may be: a tenant for tenant roles only, a service and zone for
/// workers only, an expiry in the future, a DNS-label name.
fn check(key: &NewKey) -> Result<(), LifecycleError> {
    let tenant_role = matches!(key.role, Role::Owner | Role::Member | Role::Reader);
    if tenant_role != key.tenant.is_some() {
        return Err(invalid(
            "tenant",
            "owner, member and reader keys belong to a tenant, other keys to none",
        ));
    }
    let worker = key.role == Role::Worker;
    if worker && (key.service.is_none() || key.zone.is_none()) {
        return Err(invalid(
            "service",
            "a worker key needs a service and a zone",
        ));
    }
    if !worker && (key.service.is_some() || key.zone.is_some()) {
        return Err(invalid(
            "service",
            "only worker keys have a service and zone",
        ));
    }
    if key.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(invalid("expires_at", "must be in the future"));
    }
    if let Some(name) = &key.name {
        names::validate_label("name", name)?;
    }
    Ok(())
}

/// Creates a key after checking its role, scope, name and expiry, and that its tenant
/// and zone exist; with the request's audit row.
pub async fn create(
    pool: &PgPool,
    key: NewKey,
    audit: Audit<'_>,
) -> Result<CreatedKey, LifecycleError> {
    check(&key)?;
    if let Some(tenant) = &key.tenant {
        if tenants::get(pool, tenant).await?.is_none() {
            return Err(LifecycleError::TenantNotFound);
        }
    }
    if let Some(zone) = &key.zone {
        if !catalog::zone_exists(pool, zone).await? {
            return Err(invalid("zone", "no such zone"));
        }
    }
    if let Some(service) = &key.service {
        let registered = crate::store::resource_types::all(pool)
            .await?
            .iter()
            .any(|t| t.service == service.as_str());
        if !registered {
            return Err(invalid(
                "service",
                "no registered resource type has this service",
            ));
        }
    }
    let name = key.name.clone().unwrap_or_else(|| {
        let owner = key.tenant.as_deref().unwrap_or("platform");
        let suffix = &Uuid::new_v4().simple().to_string()[..8];
        format!("{owner}-{}-{suffix}", key.role)
    });
    let secret = auth::generate_key();
    let mut tx = crate::store::begin(pool).await?;
    let new = NewPrincipal {
        name: &name,
        role: key.role,
        tenant: key.tenant.as_deref(),
        scope: key.service.zip(key.zone.as_deref()),
        key_hash: &auth::hash_key(&secret),
    };
    let row = principals::insert(&mut tx, &new, key.expires_at)
        .await?
        .ok_or(LifecycleError::NameTaken {
            kind: "key".into(),
            name,
            existing: None,
        })?;
    commit_audited(tx, audit).await?;
    Ok(CreatedKey { key: secret, row })
}

/// Gives the principal `name` the key `secret` with `role` and `scope`, creating it or
/// replacing its key, role and scope (and un-revoking it). For keys the system itself
/// installs: the bootstrap admin's and the in-process workers'.
pub async fn install(
    pool: &PgPool,
    name: &str,
    role: Role,
    scope: Option<(Service, &str)>,
    secret: &str,
) -> Result<Uuid, LifecycleError> {
    let mut conn = pool.acquire().await?;
    let new = NewPrincipal {
        name,
        role,
        tenant: None,
        scope,
        key_hash: &auth::hash_key(secret),
    };
    Ok(principals::upsert(&mut conn, &new).await?)
}

/// Revokes live key `id`; with `tenant`, only a key of that tenant. It stops working
/// on its next request.
pub async fn revoke(
    pool: &PgPool,
    id: Uuid,
    tenant: Option<&str>,
    audit: Audit<'_>,
) -> Result<(), LifecycleError> {
    let mut tx = crate::store::begin(pool).await?;
    if !principals::revoke(&mut tx, id, tenant).await? {
        return Err(LifecycleError::NotFound);
    }
    commit_audited(tx, audit).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role) -> NewKey {
        NewKey {
            role,
            tenant: None,
            service: None,
            zone: None,
            name: None,
            expires_at: None,
        }
    }

    fn field(e: LifecycleError) -> String {
        match e {
            LifecycleError::Invalid(v) => v.field,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn scopes_follow_the_role() {
        assert!(check(&key(Role::Admin)).is_ok());
        assert_eq!(field(check(&key(Role::Owner)).unwrap_err()), "tenant");
        assert_eq!(field(check(&key(Role::Worker)).unwrap_err()), "service");
        let worker = NewKey {
            service: Some(Service::named("vm")),
            zone: Some("zone-a".into()),
            ..key(Role::Worker)
        };
        assert!(check(&worker).is_ok());
        let owner_with_scope = NewKey {
            tenant: Some("acme".into()),
            zone: Some("zone-a".into()),
            ..key(Role::Owner)
        };
        assert_eq!(field(check(&owner_with_scope).unwrap_err()), "service");
    }

    #[test]
    fn expiry_must_be_ahead_and_names_must_be_labels() {
        let expired = NewKey {
            expires_at: Some(Utc::now() - chrono::Duration::seconds(1)),
            ..key(Role::Admin)
        };
        assert_eq!(field(check(&expired).unwrap_err()), "expires_at");
        let bad_name = NewKey {
            name: Some("Not A Label".into()),
            ..key(Role::Admin)
        };
        assert_eq!(field(check(&bad_name).unwrap_err()), "name");
    }
}
