//! Credentials of a deployment: the broker's users and their permissions, their NKEY
//! seeds, and the dispatch signing key.
//!
//! Each role logs in to NATS as a user of its own, allowed only what it needs
//! ([`nats/permissions.json`](../nats/permissions.json), embedded as data like the stream
//! definitions): `gateway` (`serve`), `relay` (`relay`, `migrate`), one
//! `worker-{service}-{zone}` per pool, and `events-reader`. [`write()`] makes (or keeps)
//! one NKEY per user in a directory — `{user}.nk`, the seed, readable by its owner only —
//! and writes `auth.conf`, the server's `authorization` block naming every user by its
//! public key with its permissions. `gateway nats-config` runs it for an operator; `up`
//! runs it for its private broker ([`crate::broker`]).
//!
//! A user is rotated by making it a new NKEY ([`write()`] with the user in `rotate`),
//! reloading the server (`nats-server --signal reload`) and restarting that user's
//! processes with the new seed.

use crate::config::NatsNames;
use anyhow::Context as _;
use gateway_proto::signing::SigningKey;
use gateway_proto::Service;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use workers::nats::{inbox_prefix, worker_user, NatsLogin};

/// The permissions file, as shipped.
pub const PERMISSIONS: &str = include_str!("../nats/permissions.json");

/// The user of `gateway serve`.
pub const GATEWAY: &str = "gateway";
/// The user of `gateway relay` and `gateway migrate`.
pub const RELAY: &str = "relay";
/// The user of readers of the events stream.
pub const EVENTS_READER: &str = "events-reader";

/// The name of the server-configuration file [`write()`] produces.
pub const AUTH_CONF: &str = "auth.conf";

/// The file of the dispatch signing key, in a credentials directory.
pub const DISPATCH_KEY_FILE: &str = "dispatch-signing.key";

/// The file of the dispatch signing key's public half (for the workers).
pub const DISPATCH_PUBLIC_KEY_FILE: &str = "dispatch-public.key";

#[derive(Debug, Deserialize)]
struct Permissions {
    roles: BTreeMap<String, RoleDef>,
}

#[derive(Debug, Deserialize)]
struct RoleDef {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// One NATS user of a deployment, with what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name: `gateway`, `relay`, `events-reader` or `worker-{service}-{zone}`.
    pub name: String,
    /// Subjects it may publish to (JetStream API calls are publishes too).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// Every user of the deployment named `names` with pools of `services` in `zones`, its
/// permissions substituted from `nats/permissions.json`.
pub fn users(
    names: &NatsNames,
    zones: &[String],
    services: &[Service],
) -> anyhow::Result<Vec<User>> {
    let defs: Permissions =
        serde_json::from_str(PERMISSIONS).context("nats/permissions.json is not valid")?;
    let role = |name: &str| {
        defs.roles
            .get(name)
            .with_context(|| format!("nats/permissions.json: no role {name:?}"))
    };
    let streams = crate::jetstream::Definitions::shipped()?;
    let dead_letters = streams
        .dead_letter_consumer_config(names)
        .durable_name
        .unwrap_or_default();
    let base = [
        ("${stream}", names.stream.clone()),
        ("${prefix}", names.subject_prefix.clone()),
        (
            "${advisories}",
            crate::jetstream::advisory_stream_name(names),
        ),
        ("${dead_letters}", dead_letters),
        ("${events}", names.events_stream()),
        ("${audit}", names.audit_stream()),
        ("${events_prefix}", names.events_prefix.clone()),
    ];
    let user = |name: String, def: &RoleDef, consumer: Option<String>| {
        let mut vars = base.to_vec();
        vars.push(("${inbox}", inbox_prefix(&names.stream, &name)));
        vars.extend(consumer.map(|c| ("${consumer}", c)));
        let fill = |subjects: &[String]| -> Vec<String> {
            subjects
                .iter()
                .map(|s| vars.iter().fold(s.clone(), |s, (k, v)| s.replace(k, v)))
                .collect()
        };
        User {
            publish: fill(&def.publish),
            subscribe: fill(&def.subscribe),
            name,
        }
    };
    let mut relay = user(RELAY.into(), role(RELAY)?, None);
    if let Some(region) = &names.region {
        let extra = user(RELAY.into(), role("replication")?, None);
        let fill = |s: &String| s.replace("${region}", region);
        relay.publish.extend(extra.publish.iter().map(fill));
        relay.subscribe.extend(extra.subscribe.iter().map(fill));
    }
    let mut users = vec![
        user(GATEWAY.into(), role(GATEWAY)?, None),
        relay,
        user(EVENTS_READER.into(), role(EVENTS_READER)?, None),
    ];
    for zone in zones {
        for service in services {
            let consumer = gateway_proto::consumer_name(service, zone);
            users.push(user(
                worker_user(service, zone),
                role("worker")?,
                Some(consumer),
            ));
        }
    }
    if let Some(left) = users
        .iter()
        .flat_map(|u| u.publish.iter().chain(&u.subscribe))
        .find(|s| s.contains("${"))
    {
        anyhow::bail!("nats/permissions.json: unknown placeholder in {left:?}");
    }
    Ok(users)
}

/// The seed file of `user` in the credentials directory `dir`.
pub fn seed_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("{user}.nk"))
}

/// How `user` logs in with the seed kept in `dir`.
pub fn login(dir: &Path, user: &str) -> anyhow::Result<NatsLogin> {
    let path = seed_path(dir, user);
    let seed = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the NATS seed {}", path.display()))?;
    Ok(NatsLogin::nkey(seed.trim()))
}

/// Writes `text` to `path`, readable and writable by its owner only.
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What [`write()`] did.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Users given a new NKEY (new users, and those rotated).
    pub created: Vec<String>,
    /// Users whose existing NKEY was kept.
    pub kept: Vec<String>,
}

/// Makes sure `dir` holds an NKEY seed for every user of the deployment (making one for
/// a user that has none, and a new one for each user named in `rotate`), then writes
/// [`AUTH_CONF`] for exactly these users: one worker user per service of `services` in
/// each zone of `zones`.
pub fn write(
    dir: &Path,
    names: &NatsNames,
    zones: &[String],
    services: &[Service],
    rotate: &[String],
) -> anyhow::Result<Written> {
    let users = users(names, zones, services)?;
    if let Some(unknown) = rotate.iter().find(|r| !users.iter().any(|u| &u.name == *r)) {
        anyhow::bail!("--rotate {unknown}: no such user (users: gateway, relay, events-reader, worker-<service>-<zone>)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Written::default();
    let mut keyed = Vec::with_capacity(users.len());
    for user in users {
        let path = seed_path(dir, &user.name);
        let existing = match std::fs::read_to_string(&path) {
            Ok(seed) if !rotate.contains(&user.name) => Some(seed),
            _ => None,
        };
        let pair = match existing {
            Some(seed) => {
                written.kept.push(user.name.clone());
                nkeys::KeyPair::from_seed(seed.trim())
                    .map_err(|e| anyhow::anyhow!("{}: not an NKEY seed: {e}", path.display()))?
            }
            None => {
                let pair = nkeys::KeyPair::new_user();
                let seed = pair.seed().map_err(|e| anyhow::anyhow!("{e}"))?;
                write_secret(&path, &format!("{seed}\n"))?;
                written.created.push(user.name.clone());
                pair
            }
        };
        keyed.push((user, pair.public_key()));
    }
    let conf = auth_conf(names, zones, &keyed);
    std::fs::write(dir.join(AUTH_CONF), conf)
        .with_context(|| format!("cannot write {}", dir.join(AUTH_CONF).display()))?;
    Ok(written)
}

/// The `authorization` block naming each user by its public NKEY.
fn auth_conf(names: &NatsNames, zones: &[String], users: &[(User, String)]) -> String {
    let quoted = |subjects: &[String]| -> String {
        let list: Vec<String> = subjects.iter().map(|s| format!("\"{s}\"")).collect();
        list.join(", ")
    };
    let mut out = format!(
        "# Generated by `gateway nats-config` for the stream {stream} (subjects {prefix}.*.*)\n\
         # and the zones {zones}. Include it in the server's configuration\n\
         # (`include \"auth.conf\"`). Each user logs in with the NKEY seed in `<user>.nk`\n\
         # beside this file; give each process only its own seed. After a change (a new\n\
         # zone, a rotated user): `nats-server --signal reload`, then restart the processes\n\
         # of the changed users. Permissions come from nats/permissions.json.\n\
         authorization {{\n  users = [\n",
        stream = names.stream,
        prefix = names.subject_prefix,
        zones = zones.join(", "),
    );
    for (user, public_key) in users {
        let _ = write!(
            out,
            "    # {name}\n    {{\n      nkey: \"{public_key}\"\n      permissions: {{\n        \
             publish: {{ allow: [{publish}] }}\n        \
             subscribe: {{ allow: [{subscribe}] }}\n      }}\n    }}\n",
            name = user.name,
            publish = quoted(&user.publish),
            subscribe = quoted(&user.subscribe),
        );
    }
    out.push_str("  ]\n}\n");
    out
}

/// Reads the dispatch signing key from `dir`, making one (and its public half) if there
/// is none, or a new one with `rotate`.
pub fn dispatch_key(dir: &Path, rotate: bool) -> anyhow::Result<(SigningKey, bool)> {
    let path = dir.join(DISPATCH_KEY_FILE);
    if !rotate {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let key = SigningKey::from_text(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            return Ok((key, false));
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = SigningKey::from_seed(rand::random());
    write_secret(&path, &format!("{}\n", key.to_text()))?;
    let public = dir.join(DISPATCH_PUBLIC_KEY_FILE);
    std::fs::write(&public, format!("{}\n", key.public_key()))
        .with_context(|| format!("cannot write {}", public.display()))?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in kinds' services.
    fn services() -> Vec<Service> {
        ["bm", "k8s", "storage", "vm"].map(Service::named).to_vec()
    }

    fn names() -> NatsNames {
        NatsNames {
            region: None,
            stream: "T1".into(),
            subject_prefix: "t1.ops".into(),
            events_prefix: "t1.events".into(),
        }
    }

    fn zones() -> Vec<String> {
        vec!["zone-a".into(), "zone-b".into()]
    }

    fn user(name: &str) -> User {
        users(&names(), &zones(), &services())
            .unwrap()
            .into_iter()
            .find(|u| u.name == name)
            .unwrap()
    }

    #[test]
    fn every_role_and_every_pool_has_a_user() {
        let all: Vec<String> = users(&names(), &zones(), &services())
            .unwrap()
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(all.len(), 3 + 2 * services().len());
        for name in [
            "gateway",
            "relay",
            "events-reader",
            "worker-vm-zone-a",
            "worker-storage-zone-b",
        ] {
            assert!(all.contains(&name.to_owned()), "{all:?}");
        }
    }

    #[test]
    fn a_worker_may_only_pull_from_and_acknowledge_its_own_consumer() {
        let w = user("worker-vm-zone-a");
        assert_eq!(
            w.publish,
            [
                "$JS.API.CONSUMER.INFO.T1.vm-zone-a",
                "$JS.API.CONSUMER.MSG.NEXT.T1.vm-zone-a",
                "$JS.ACK.T1.vm-zone-a.>"
            ]
        );
        assert_eq!(w.subscribe, ["_INBOX.T1.worker-vm-zone-a.>"]);
    }

    #[test]
    fn only_the_relay_publishes_operations_and_no_one_deletes_or_purges_streams() {
        // Without regions; with them, see the next test.
        for u in users(&names(), &zones(), &services()).unwrap() {
            let publishes_ops = u.publish.iter().any(|s| s.starts_with("t1.ops."));
            assert_eq!(publishes_ops, u.name == "relay", "{u:?}");
            for s in &u.publish {
                assert!(
                    !s.contains("STREAM.DELETE") && !s.contains("STREAM.PURGE"),
                    "{s}"
                );
                assert!(!s.ends_with("$JS.API.>") && s != ">", "{s}");
            }
            // Each user reads replies only in its own inbox.
            let inboxes: Vec<&String> = u
                .subscribe
                .iter()
                .filter(|s| s.starts_with("_INBOX"))
                .collect();
            assert_eq!(inboxes, [&format!("_INBOX.T1.{}.>", u.name)], "{u:?}");
        }
        let relay = user("relay");
        assert!(relay.publish.contains(&"t1.ops.*.*".to_owned()));
        assert!(relay
            .publish
            .contains(&"$JS.API.STREAM.UPDATE.T1-ADVISORIES".to_owned()));
        let gateway = user("gateway");
        assert!(gateway
            .publish
            .contains(&"$JS.API.CONSUMER.MSG.NEXT.T1-ADVISORIES.gateway-dead-letters".to_owned()));
        assert!(user("events-reader")
            .publish
            .iter()
            .all(|s| s.contains("T1-EVENTS")));
    }

    /// In a region, the relay may also purge its own replication stream (to move the
    /// first sequence of one made anew past the old one), and nothing else: it can
    /// already publish any change there, so the purge gives it no more power; the
    /// operations, events, advisories and audit streams stay unpurgeable by anyone.
    #[test]
    fn in_a_region_the_relay_purges_only_its_own_replication_stream() {
        let names = NatsNames {
            region: Some("r1".into()),
            ..names()
        };
        for u in users(&names, &zones(), &services()).unwrap() {
            let purges: Vec<&String> = u
                .publish
                .iter()
                .filter(|s| s.contains("STREAM.PURGE") || s.contains("STREAM.DELETE"))
                .collect();
            if u.name == "relay" {
                assert_eq!(purges, ["$JS.API.STREAM.PURGE.REPLICATION-r1"], "{u:?}");
            } else {
                assert!(purges.is_empty(), "{u:?}");
            }
        }
    }

    #[test]
    fn seeds_are_kept_unless_rotated_and_the_server_config_names_every_user() {
        let dir = std::env::temp_dir().join(format!("gw-creds-{}", uuid::Uuid::new_v4()));
        let first = write(&dir, &names(), &zones(), &services(), &[]).unwrap();
        assert_eq!(first.created.len(), 11);
        let seed = std::fs::read_to_string(seed_path(&dir, "relay")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(seed_path(&dir, "relay"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "seeds are private");
        }
        let second = write(&dir, &names(), &zones(), &services(), &["relay".into()]).unwrap();
        assert_eq!(second.created, ["relay"]);
        assert_eq!(second.kept.len(), 10);
        let rotated = std::fs::read_to_string(seed_path(&dir, "relay")).unwrap();
        assert_ne!(seed, rotated);
        let conf = std::fs::read_to_string(dir.join(AUTH_CONF)).unwrap();
        let public = nkeys::KeyPair::from_seed(rotated.trim())
            .unwrap()
            .public_key();
        assert!(conf.contains(&public), "{conf}");
        assert_eq!(conf.matches("nkey: \"U").count(), 11);
        assert!(conf.contains("\"$JS.ACK.T1.bm-zone-b.>\""));
        assert!(write(&dir, &names(), &zones(), &services(), &["nobody".into()]).is_err());
        let login = login(&dir, "gateway").unwrap();
        assert!(matches!(login.auth, workers::nats::NatsAuth::Nkey(_)));

        let (key, made) = dispatch_key(&dir, false).unwrap();
        assert!(made);
        let (again, made) = dispatch_key(&dir, false).unwrap();
        assert!(!made);
        assert_eq!(again.public_key(), key.public_key());
        let public = std::fs::read_to_string(dir.join(DISPATCH_PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(public.trim(), key.public_key().to_text());
        let (rotated, made) = dispatch_key(&dir, true).unwrap();
        assert!(made && rotated.public_key() != key.public_key());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
