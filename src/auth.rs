//! Principals and API keys: who is calling, and what their role lets them do.
//!
//! Keys are 256 random bits shown once; only their SHA-256 is stored. Lookup is by
//! hash, so no comparison of secret bytes happens in this process at all (the database
//! index compares hashes, which leak nothing about the key).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{Kind, Service};
use crate::registry::Snapshot;

pub use crate::domain::Role;

/// What a route needs. Every handler asks [`Principal::decide`] for one of these; the
/// table in [`Role::grants`] is the whole policy (README: "Roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read a tenant, its resources and operations.
    Read,
    /// Create, change and delete a tenant's resources; cancel its operations.
    Write,
    /// Create, list and revoke a tenant's keys; read its audit log.
    Manage,
    /// Platform-wide: create tenants, read the whole audit log, create worker keys.
    Platform,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Write,
        Permission::Manage,
        Permission::Platform,
    ];
}

/// The policy as a Markdown table (README "Roles" embeds it; a test keeps them equal).
pub fn policy_table() -> String {
    let roles = [
        Role::Admin,
        Role::Owner,
        Role::Member,
        Role::Reader,
        Role::Worker,
    ];
    let mut out = String::from("| permission |");
    for r in roles {
        out.push_str(&format!(" {} |", r.as_str()));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(roles.len()));
    for p in Permission::ALL {
        out.push_str(&format!("\n| {p:?} |"));
        for r in roles {
            out.push_str(if r.grants(p) { " yes |" } else { " — |" });
        }
    }
    out.push('\n');
    out
}

/// The answer to "may this principal do that?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Yes.
    Allow,
    /// No, and the tenant must look nonexistent to this principal (`404`).
    Hide,
    /// No, though the principal may know the tenant exists (`403`).
    Deny,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its ID, recorded on the operations it submits.
    pub id: Uuid,
    /// Its name, for logs.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The tenant of an owner, member or reader.
    pub tenant: Option<String>,
    /// The service and zone of a worker.
    pub scope: Option<(Service, String)>,
}

impl Role {
    /// The policy: whether the role grants `p` (within its tenant, for tenant roles).
    pub const fn grants(self, p: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Owner => !matches!(p, Permission::Platform),
            Role::Member => matches!(p, Permission::Read | Permission::Write),
            Role::Reader => matches!(p, Permission::Read),
            // Workers act through their own scope (`can_report`, `reads_for_work`).
            Role::Worker => false,
        }
    }
}

impl Principal {
    /// Whether it may do `p` on `tenant` (`None` for platform-wide actions).
    /// Principals of other tenants, and workers, never learn a tenant exists.
    pub fn decide(&self, p: Permission, tenant: Option<&str>) -> Decision {
        let own = match (&self.role, tenant) {
            (Role::Admin, _) => true,
            (Role::Worker, _) => false,
            (_, Some(t)) => self.tenant.as_deref() == Some(t),
            (_, None) => true,
        };
        match (own, self.role.grants(p)) {
            (true, true) => Decision::Allow,
            (false, _) if tenant.is_some() => Decision::Hide,
            _ => Decision::Deny,
        }
    }

    /// Whether it may read `tenant`'s resources and operations.
    pub fn can_read(&self, tenant: &str) -> bool {
        self.decide(Permission::Read, Some(tenant)) == Decision::Allow
    }

    /// Whether it may change `tenant`'s resources.
    pub fn can_write(&self, tenant: &str) -> bool {
        self.decide(Permission::Write, Some(tenant)) == Decision::Allow
    }

    /// Whether a worker needs to read a resource of `kind` in `zone` for its work: its
    /// service's own kinds, and the kinds those name (`x-reference`: the VMs storage
    /// workers' volumes attach to) — in its zone.
    pub fn reads_for_work(&self, kind: &Kind, zone: &str, types: &Snapshot) -> bool {
        match (&self.role, &self.scope) {
            (Role::Worker, Some((service, z))) => z == zone && types.service_reads(service, kind),
            _ => false,
        }
    }

    /// Whether it may report on operations of `service` in `zone`.
    pub fn can_report(&self, service: &Service, zone: &str) -> bool {
        match (&self.role, &self.scope) {
            (Role::Admin, _) => true,
            (Role::Worker, Some((s, z))) => s == service && z == zone,
            _ => false,
        }
    }
}

/// SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A new random key: `gw_` and 64 hex digits (256 bits).
pub fn generate_key() -> String {
    format!("gw_{}", hex::encode(rand::random::<[u8; 32]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            id: Uuid::nil(),
            name: "p".into(),
            role,
            tenant: tenant.map(str::to_owned),
            scope: None,
        }
    }

    #[test]
    fn tenant_roles_stay_in_their_tenant() {
        let member = principal(Role::Member, Some("acme"));
        assert!(member.can_write("acme"));
        assert!(!member.can_read("globex"));
        let reader = principal(Role::Reader, Some("acme"));
        assert!(reader.can_read("acme") && !reader.can_write("acme"));
        assert!(principal(Role::Admin, None).can_write("anyone"));
    }

    #[test]
    fn the_policy_table_is_monotonic_and_tenant_bound() {
        let owner = principal(Role::Owner, Some("acme"));
        assert_eq!(
            owner.decide(Permission::Manage, Some("acme")),
            Decision::Allow
        );
        assert_eq!(
            owner.decide(Permission::Manage, Some("globex")),
            Decision::Hide
        );
        assert_eq!(owner.decide(Permission::Platform, None), Decision::Deny);
        let member = principal(Role::Member, Some("acme"));
        assert_eq!(
            member.decide(Permission::Manage, Some("acme")),
            Decision::Deny
        );
        // Each role grants everything the role below it grants.
        let ladder = [Role::Reader, Role::Member, Role::Owner, Role::Admin];
        for pair in ladder.windows(2) {
            for p in Permission::ALL {
                assert!(
                    !pair[0].grants(p) || pair[1].grants(p),
                    "{:?} < {:?} on {p:?}",
                    pair[0],
                    pair[1]
                );
            }
        }
        let mut worker = principal(Role::Worker, None);
        worker.scope = Some((Service::named("vm"), "zone-a".into()));
        assert_eq!(
            worker.decide(Permission::Read, Some("acme")),
            Decision::Hide
        );
        assert_eq!(worker.decide(Permission::Platform, None), Decision::Deny);
    }

    #[test]
    fn workers_report_only_on_their_service_and_zone() {
        let mut w = principal(Role::Worker, None);
        w.scope = Some((Service::named("vm"), "zone-a".into()));
        assert!(w.can_report(&Service::named("vm"), "zone-a"));
        assert!(!w.can_report(&Service::named("vm"), "zone-b"));
        assert!(!w.can_report(&Service::named("storage"), "zone-a"));
        assert!(!w.can_read("acme"));
        // What a worker may read for its work follows the registry: the integration
        // tests (`security::`, `resource_types::`) check it against real types.
        let none = Snapshot::default();
        assert!(!w.reads_for_work(&Kind::named("vm"), "zone-a", &none));
    }

    #[test]
    fn keys_are_random_and_hash_stably() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 67);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
    }
}
