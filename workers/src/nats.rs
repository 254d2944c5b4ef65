//! How a process logs in to NATS: credentials, TLS and its reply inbox, read from the
//! environment and turned into `async_nats::ConnectOptions`. Shared by the `worker`
//! binary and the gateway's processes (which depend on this crate), so both read the
//! same variables the same way:
//!
//! | variable | meaning |
//! |---|---|
//! | `NATS_CREDS` | a `.creds` file (user JWT and NKEY seed; accounts set up with `nsc`) |
//! | `NATS_NKEY_SEED`, `NATS_NKEY_SEED_FILE` | an NKEY user's seed (`SU…`), or a file holding it (what `gateway nats-config` writes) |
//! | `NATS_USER`, `NATS_PASSWORD` (or `NATS_PASSWORD_FILE`) | a user with a password |
//! | `NATS_TLS_CA` | PEM file of the CA that signed the server's certificate |
//! | `NATS_TLS_CERT`, `NATS_TLS_KEY` | PEM client certificate and key (mutual TLS) |
//! | `NATS_TLS_REQUIRED` | `true` to refuse a connection without TLS; default `true` when a TLS file is given |
//! | `NATS_INBOX_PREFIX` | where replies come back; default `_INBOX.{stream}.{user}` ([`inbox_prefix`]) |
//!
//! At most one kind of credentials may be given. Each user may subscribe only to its own
//! inbox prefix, so one client cannot read the replies (JetStream API answers, pulled
//! messages) meant for another.

use crate::config::Secret;
use anyhow::{anyhow, bail, Context as _};
use async_nats::ConnectOptions;
use gateway_proto::Service;
use std::path::PathBuf;

/// The credentials a process presents to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// None: the server allows anonymous clients (a development server).
    #[default]
    Anonymous,
    /// `NATS_CREDS`: a credentials file (JWT and seed).
    Creds(PathBuf),
    /// `NATS_NKEY_SEED` or `NATS_NKEY_SEED_FILE`: an NKEY user.
    Nkey(Secret),
    /// `NATS_USER` and `NATS_PASSWORD`.
    Password {
        /// The user name.
        user: String,
        /// Its password.
        password: Secret,
    },
}

/// TLS settings of the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// `NATS_TLS_CA`: the CA to trust for the server's certificate (else the system's).
    pub ca: Option<PathBuf>,
    /// `NATS_TLS_CERT` and `NATS_TLS_KEY`: a client certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
    /// `NATS_TLS_REQUIRED`: refuse to talk to the server without TLS.
    pub required: bool,
}

/// Everything about logging in to NATS except the URL and the role's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsLogin {
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS.
    pub tls: NatsTls,
    /// `NATS_INBOX_PREFIX`: overrides the role's [`inbox_prefix`].
    pub inbox_prefix: Option<String>,
}

/// The NATS user name of the workers of one pool: `worker-{service}-{zone}`.
pub fn worker_user(service: &Service, zone: &str) -> String {
    format!("worker-{}", gateway_proto::consumer_name(service, zone))
}

/// The reply-inbox prefix of `user` in the deployment whose stream is `stream`; the
/// broker lets that user subscribe only below it.
pub fn inbox_prefix(stream: &str, user: &str) -> String {
    format!("_INBOX.{stream}.{user}")
}

impl NatsLogin {
    /// An NKEY user with the seed `seed`, nothing else set.
    pub fn nkey(seed: impl Into<String>) -> Self {
        Self {
            auth: NatsAuth::Nkey(Secret::new(seed)),
            ..Self::default()
        }
    }

    /// Reads the `NATS_*` login variables through `lookup` (unset or blank: not given).
    /// Reads seed and password files now, so a bad path fails at start-up.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let auth = auth(&get)?;
        let tls = tls(&get)?;
        let inbox_prefix = get("NATS_INBOX_PREFIX");
        if let Some(prefix) = &inbox_prefix {
            if prefix
                .split('.')
                .any(|t| gateway_proto::names::check_token("NATS_INBOX_PREFIX", t, false).is_err())
            {
                bail!("NATS_INBOX_PREFIX: must be dot-separated subject tokens, got {prefix:?}");
            }
        }
        Ok(Self {
            auth,
            tls,
            inbox_prefix,
        })
    }

    /// Connect options for `name` (shown in the server's connection list), with replies
    /// under `inbox` unless `NATS_INBOX_PREFIX` says otherwise. Retries the first
    /// connection in the background.
    pub async fn options(&self, name: &str, inbox: &str) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .custom_inbox_prefix(self.inbox_prefix.as_deref().unwrap_or(inbox));
        options = match &self.auth {
            NatsAuth::Anonymous => options,
            NatsAuth::Creds(path) => options
                .credentials_file(path)
                .await
                .with_context(|| format!("NATS_CREDS: cannot read {}", path.display()))?,
            NatsAuth::Nkey(seed) => options.nkey(seed.expose().to_owned()),
            NatsAuth::Password { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
        };
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.tls.required))
    }

    /// Connects to `url` as [`NatsLogin::options`] says; returns at once, the first
    /// connection being retried in the background.
    pub async fn connect(
        &self,
        url: &str,
        name: &str,
        inbox: &str,
    ) -> anyhow::Result<async_nats::Client> {
        self.options(name, inbox)
            .await?
            .connect(url)
            .await
            .with_context(|| format!("NATS_URL: cannot connect to {url}"))
    }
}

/// Waits until `client` is connected to `url`: the first connection is retried in the
/// background, so a wrong URL or refused credentials are reported at start-up rather
/// than as a silent stall. Fails after 10 s.
pub async fn wait_connected(client: &async_nats::Client, url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            bail!("NATS_URL: could not connect to {} within 10 s (is it up? are the NATS_* credentials right?)", redact_url(url));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `url` without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// A file's content, trimmed, or an error naming `var`.
fn read_file(var: &str, path: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{var}: cannot read {path}"))?;
    Ok(text.trim().to_owned())
}

/// `name`'s value, or the content of the file `name_FILE` names.
fn value_or_file(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let file = format!("{name}_FILE");
    match (get(name), get(&file)) {
        (Some(_), Some(_)) => bail!("{name}: set either {name} or {file}, not both"),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_file(&file, &path).map(Some),
        (None, None) => Ok(None),
    }
}

fn auth(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<NatsAuth> {
    let creds = get("NATS_CREDS");
    let seed = value_or_file(get, "NATS_NKEY_SEED")?;
    let user = get("NATS_USER");
    let password = value_or_file(get, "NATS_PASSWORD")?;
    let given = [creds.is_some(), seed.is_some(), user.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        bail!("NATS_CREDS, NATS_NKEY_SEED and NATS_USER: give one kind of NATS credentials, not several");
    }
    Ok(match (creds, seed, user, password) {
        (Some(path), ..) => {
            if !std::path::Path::new(&path).is_file() {
                bail!("NATS_CREDS: no such file {path}");
            }
            NatsAuth::Creds(path.into())
        }
        (_, Some(seed), ..) => {
            nkeys::KeyPair::from_seed(&seed)
                .map_err(|e| anyhow!("NATS_NKEY_SEED: not an NKEY seed: {e}"))?;
            NatsAuth::Nkey(Secret::new(seed))
        }
        (_, _, Some(user), Some(password)) => NatsAuth::Password {
            user,
            password: Secret::new(password),
        },
        (_, _, Some(_), None) => bail!("NATS_PASSWORD: required with NATS_USER"),
        (_, _, None, Some(_)) => bail!("NATS_USER: required with NATS_PASSWORD"),
        (None, None, None, None) => NatsAuth::Anonymous,
    })
}

fn tls(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<NatsTls> {
    let file = |name: &str| -> anyhow::Result<Option<PathBuf>> {
        match get(name) {
            Some(path) if std::path::Path::new(&path).is_file() => Ok(Some(path.into())),
            Some(path) => bail!("{name}: no such file {path}"),
            None => Ok(None),
        }
    };
    let ca = file("NATS_TLS_CA")?;
    let client = match (file("NATS_TLS_CERT")?, file("NATS_TLS_KEY")?) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => bail!("NATS_TLS_KEY: required with NATS_TLS_CERT"),
        (None, Some(_)) => bail!("NATS_TLS_CERT: required with NATS_TLS_KEY"),
    };
    let required = match get("NATS_TLS_REQUIRED").as_deref() {
        None => ca.is_some() || client.is_some(),
        Some("true" | "1" | "yes") => true,
        Some("false" | "0" | "no") => false,
        Some(other) => bail!("NATS_TLS_REQUIRED: must be true or false, got {other:?}"),
    };
    Ok(NatsTls {
        ca,
        client,
        required,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn login(vars: &[(&str, &str)]) -> anyhow::Result<NatsLogin> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NatsLogin::from_lookup(|k| vars.get(k).cloned())
    }

    fn error(vars: &[(&str, &str)]) -> String {
        format!("{:#}", login(vars).unwrap_err())
    }

    /// A file in the temporary directory holding `text`, removed on drop.
    struct File(PathBuf);

    impl File {
        fn new(text: &str) -> Self {
            let path = std::env::temp_dir().join(format!("nats-login-{}", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn no_variable_means_an_anonymous_plain_connection() {
        assert_eq!(login(&[]).unwrap(), NatsLogin::default());
    }

    #[test]
    fn each_kind_of_credentials_is_read_from_its_variables() {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let seed_file = File::new(&format!("{seed}\n"));
        let creds = File::new("-----BEGIN NATS USER JWT-----");
        assert_eq!(
            login(&[("NATS_NKEY_SEED", &seed)]).unwrap().auth,
            NatsAuth::Nkey(Secret::new(seed.clone()))
        );
        assert_eq!(
            login(&[("NATS_NKEY_SEED_FILE", seed_file.path())])
                .unwrap()
                .auth,
            NatsAuth::Nkey(Secret::new(seed.clone()))
        );
        assert_eq!(
            login(&[("NATS_CREDS", creds.path())]).unwrap().auth,
            NatsAuth::Creds(creds.path().into())
        );
        let password = login(&[("NATS_USER", "relay"), ("NATS_PASSWORD", "pw-secret")]).unwrap();
        assert_eq!(
            password.auth,
            NatsAuth::Password {
                user: "relay".into(),
                password: Secret::new("pw-secret")
            }
        );
        let shown = format!(
            "{password:?}{:?}",
            login(&[("NATS_NKEY_SEED", &seed)]).unwrap()
        );
        assert!(
            !shown.contains("pw-secret") && !shown.contains(&seed),
            "{shown}"
        );
    }

    #[test]
    fn tls_files_turn_tls_on_unless_told_otherwise() {
        let (ca, cert, key) = (File::new("ca"), File::new("cert"), File::new("key"));
        let l = login(&[
            ("NATS_TLS_CA", ca.path()),
            ("NATS_TLS_CERT", cert.path()),
            ("NATS_TLS_KEY", key.path()),
            ("NATS_INBOX_PREFIX", "_INBOX.custom"),
        ])
        .unwrap();
        assert_eq!(l.tls.ca.as_deref(), Some(ca.0.as_path()));
        assert_eq!(l.tls.client, Some((cert.0.clone(), key.0.clone())));
        assert!(l.tls.required);
        assert_eq!(l.inbox_prefix.as_deref(), Some("_INBOX.custom"));
        let l = login(&[("NATS_TLS_CA", ca.path()), ("NATS_TLS_REQUIRED", "false")]).unwrap();
        assert!(!l.tls.required);
        assert!(
            login(&[("NATS_TLS_REQUIRED", "true")])
                .unwrap()
                .tls
                .required
        );
    }

    #[test]
    fn bad_login_settings_fail_with_a_message_naming_the_variable() {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let cert = File::new("cert");
        for (vars, expected) in [
            (
                &[("NATS_NKEY_SEED", seed.as_str()), ("NATS_USER", "u")][..],
                "NATS_CREDS, NATS_NKEY_SEED and NATS_USER: give one kind",
            ),
            (
                &[("NATS_NKEY_SEED", "SUnotaseed")][..],
                "NATS_NKEY_SEED: not an NKEY seed",
            ),
            (
                &[
                    ("NATS_NKEY_SEED", seed.as_str()),
                    ("NATS_NKEY_SEED_FILE", "/x"),
                ][..],
                "NATS_NKEY_SEED: set either",
            ),
            (
                &[("NATS_NKEY_SEED_FILE", "/nonexistent/seed")][..],
                "NATS_NKEY_SEED_FILE: cannot read",
            ),
            (
                &[("NATS_CREDS", "/nonexistent.creds")][..],
                "NATS_CREDS: no such file",
            ),
            (&[("NATS_USER", "u")][..], "NATS_PASSWORD: required"),
            (&[("NATS_PASSWORD", "p")][..], "NATS_USER: required"),
            (
                &[("NATS_TLS_CA", "/nonexistent.pem")][..],
                "NATS_TLS_CA: no such file",
            ),
            (
                &[("NATS_TLS_CERT", cert.path())][..],
                "NATS_TLS_KEY: required",
            ),
            (
                &[("NATS_TLS_REQUIRED", "maybe")][..],
                "NATS_TLS_REQUIRED: must be",
            ),
            (
                &[("NATS_INBOX_PREFIX", "_INBOX.>")][..],
                "NATS_INBOX_PREFIX:",
            ),
        ] {
            let message = error(vars);
            assert!(message.starts_with(expected), "{vars:?}: got {message:?}");
        }
    }

    #[test]
    fn names_of_users_and_inboxes_are_derived_from_the_deployment() {
        assert_eq!(
            worker_user(&Service::named("k8s"), "zone-b"),
            "worker-k8s-zone-b"
        );
        assert_eq!(inbox_prefix("OPS", "relay"), "_INBOX.OPS.relay");
    }
}
