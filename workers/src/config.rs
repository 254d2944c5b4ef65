//! Configuration: [`PoolConfig`] for one pool (what [`crate::run_pool`] needs, built by the
//! `worker` binary or by the gateway's `up`), and [`WorkerConfig`], everything the binary
//! reads from its environment. A bad value fails at start-up with a message naming the
//! variable.
//!
//! **Architecture invariant:** there is no database URL here. Workers reach the world
//! through NATS (work in) and the gateway API (everything else).

use crate::drivers::SimConfig;
use crate::nats::NatsLogin;
use anyhow::{anyhow, bail};
use gateway_proto::signing::TrustedKeys;
use gateway_proto::Service;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One pool: the workers of one service in one zone, sharing one durable consumer.
#[derive(Clone)]
pub struct PoolConfig {
    /// The service whose operations this pool carries out.
    pub service: Service,
    /// The zone it serves; with `service`, names the consumer
    /// ([`gateway_proto::consumer_name`]).
    pub zone: String,
    /// The JetStream work-queue stream, e.g. `OPS`, created by `gateway migrate`.
    pub stream: String,
    /// Base URL of the gateway API, e.g. `http://127.0.0.1:8080`, where reports go.
    pub gateway_url: String,
    /// Bearer key of a worker principal scoped to this service and zone.
    pub gateway_key: String,
    /// Most messages in flight in this process for this pool; also how many the pool
    /// pulls at once, so nothing waits in a local buffer while its AckWait runs.
    pub concurrency: usize,
    /// The consumer's `max_deliver` until the pool has read it from the consumer (it
    /// does when it binds): on that delivery a transient failure fails the operation
    /// (`retries_exhausted`) instead of handing the message back. Zero or less: the pool
    /// never judges a delivery last and keeps that (JetStream's dead letters end what
    /// it cannot finish).
    pub max_deliver: i64,
    /// The public keys of the gateway's dispatch signing keys: a message not signed by
    /// one of them is never acted on (see [`gateway_proto::signing`]).
    pub dispatch_keys: TrustedKeys,
    /// Most reports sent in one `POST /v1/reports` (see [`crate::batch`]); `1` sends
    /// each on its own.
    pub report_batch: usize,
}

/// A secret setting: shown as `***` in `Debug` output, so a logged configuration never
/// carries it. (The gateway's configuration uses it too.)
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("service", &self.service)
            .field("zone", &self.zone)
            .field("stream", &self.stream)
            .field("gateway_url", &self.gateway_url)
            .field("gateway_key", &"<redacted>")
            .field("concurrency", &self.concurrency)
            .field("max_deliver", &self.max_deliver)
            .field("dispatch_keys", &self.dispatch_keys)
            .field("report_batch", &self.report_batch)
            .finish()
    }
}

impl PoolConfig {
    /// Default of [`PoolConfig::max_deliver`].
    pub const DEFAULT_MAX_DELIVER: i64 = 5;
    /// Default of [`PoolConfig::concurrency`] in the `worker` binary.
    pub const DEFAULT_CONCURRENCY: usize = 16;
    /// Most of [`PoolConfig::concurrency`] (`WORKER_CONCURRENCY`).
    pub const MAX_CONCURRENCY: usize = 1024;
    /// Default of [`PoolConfig::report_batch`].
    pub const DEFAULT_REPORT_BATCH: usize = 64;

    /// Checks what [`crate::run_pool`] relies on; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        token("zone", &self.zone)?;
        token("stream", &self.stream)?;
        http_url("gateway_url", &self.gateway_url)?;
        if self.gateway_key.trim().is_empty() {
            bail!("gateway_key: must not be empty");
        }
        if self.concurrency == 0 {
            bail!("concurrency: must be at least 1");
        }
        if !(1..=gateway_proto::MAX_BATCH_REPORTS).contains(&self.report_batch) {
            bail!(
                "report_batch: must be between 1 and {}",
                gateway_proto::MAX_BATCH_REPORTS
            );
        }
        if self.dispatch_keys.is_empty() {
            bail!("dispatch_keys: at least one public key is needed, or every message is refused");
        }
        Ok(())
    }
}

/// Which driver the `worker` binary runs.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverConfig {
    /// `WORKER_DRIVER=sim`: the simulated driver.
    Sim {
        /// Latency and failure rates (`SIM_*`).
        config: SimConfig,
        /// `SIM_CAPACITY_PER_ZONE`: live resources a zone holds; unset for unlimited.
        capacity_per_zone: Option<u32>,
    },
    /// `WORKER_DRIVER=exec`: an external program per operation.
    Exec {
        /// First word of `WORKER_EXEC_COMMAND`.
        program: PathBuf,
        /// The other words.
        args: Vec<String>,
    },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything the `worker` binary needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `NATS_URL` (default `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// `NATS_CREDS`, `NATS_NKEY_SEED[_FILE]`, `NATS_USER`/`NATS_PASSWORD[_FILE]`,
    /// `NATS_TLS_*`, `NATS_INBOX_PREFIX` (see [`crate::nats`]).
    pub nats: NatsLogin,
    /// The pool to run: `--service`/`WORKER_SERVICE`, `--zone`/`WORKER_ZONE`,
    /// `OPS_STREAM` (default `OPS`), `GATEWAY_URL` (default `http://127.0.0.1:8080`),
    /// `GATEWAY_KEY` (required), `WORKER_CONCURRENCY` (default 16),
    /// `WORKER_DISPATCH_PUBLIC_KEYS` (or
    /// `WORKER_DISPATCH_PUBLIC_KEYS_FILE`; required).
    pub pool: PoolConfig,
    /// `WORKER_DRIVER` (`sim` default, or `exec` with `WORKER_EXEC_COMMAND`), and for the
    /// simulator `SIM_MIN_LATENCY_MS` (200), `SIM_MAX_LATENCY_MS` (1500),
    /// `SIM_FAILURE_RATE` (0), `SIM_TRANSIENT_FAILURE_RATE` (0), `SIM_CAPACITY_PER_ZONE`.
    pub driver: DriverConfig,
    /// `LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `WORKER_LISTEN` (default `127.0.0.1:9464`): the address of the worker's own
    /// `GET /metrics`, `/healthz` and `/readyz` ([`crate::http`]); `0.0.0.0:9464` to be
    /// scraped from other hosts.
    pub listen: SocketAddr,
}

impl WorkerConfig {
    /// Default of [`WorkerConfig::listen`].
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:9464";
}

impl WorkerConfig {
    /// Reads the configuration for the pool of `service` in `zone` from the process
    /// environment.
    pub fn from_env(service: Service, zone: String) -> anyhow::Result<Self> {
        Self::from_lookup(service, zone, |name| {
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    }

    /// Reads the configuration from `lookup` (a variable's value, `None` when unset);
    /// empty values count as unset.
    pub fn from_lookup(
        service: Service,
        zone: String,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let env = Env(&lookup);
        let zone = token("WORKER_ZONE (--zone)", &zone)?.to_owned();
        let nats_url = env.string("NATS_URL", "nats://127.0.0.1:4222");
        let nats = NatsLogin::from_lookup(&lookup)?;
        let pool = env.pool(service, zone)?;
        let driver = env.driver()?;
        let log_format = env.log_format()?;
        let listen = env.listen()?;
        Ok(Self {
            nats_url,
            nats,
            pool,
            driver,
            log_format,
            listen,
        })
    }
}

/// Typed access to the variables, each error naming its variable.
struct Env<'a, F>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T: FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| anyhow!("{name}: invalid value '{v}': {e}")),
        }
    }

    /// A probability: a number between 0 and 1, default 0.
    fn rate(&self, name: &str) -> anyhow::Result<f64> {
        match self.get(name) {
            None => Ok(0.0),
            Some(v) => match v.parse::<f64>() {
                Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
                _ => Err(anyhow!(
                    "{name}: must be a number between 0 and 1, got '{v}'"
                )),
            },
        }
    }
}

/// The parts of a [`WorkerConfig`], each read from its variables.
impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    /// [`WorkerConfig::pool`] for `service` in `zone` (already checked).
    fn pool(&self, service: Service, zone: String) -> anyhow::Result<PoolConfig> {
        let gateway_url = self.string("GATEWAY_URL", "http://127.0.0.1:8080");
        http_url("GATEWAY_URL", &gateway_url)?;
        let gateway_key = self.get("GATEWAY_KEY").ok_or_else(|| {
            anyhow!("GATEWAY_KEY: required: the bearer key of a worker principal for {service} in {zone}")
        })?;
        let stream = self.string("OPS_STREAM", "OPS");
        token("OPS_STREAM", &stream)?;
        let concurrency: usize =
            self.parse("WORKER_CONCURRENCY", PoolConfig::DEFAULT_CONCURRENCY)?;
        if !(1..=PoolConfig::MAX_CONCURRENCY).contains(&concurrency) {
            bail!(
                "WORKER_CONCURRENCY: must be between 1 and {}, got {concurrency}",
                PoolConfig::MAX_CONCURRENCY
            );
        }
        let report_batch: usize =
            self.parse("WORKER_REPORT_BATCH", PoolConfig::DEFAULT_REPORT_BATCH)?;
        if !(1..=gateway_proto::MAX_BATCH_REPORTS).contains(&report_batch) {
            bail!(
                "WORKER_REPORT_BATCH: must be between 1 and {}, got {report_batch}",
                gateway_proto::MAX_BATCH_REPORTS
            );
        }
        Ok(PoolConfig {
            service,
            zone,
            stream,
            gateway_url,
            gateway_key,
            concurrency,
            // Read from the consumer at bind; this default covers only the moments before.
            max_deliver: PoolConfig::DEFAULT_MAX_DELIVER,
            dispatch_keys: self.dispatch_keys()?,
            report_batch,
        })
    }

    /// [`PoolConfig::dispatch_keys`], from `WORKER_DISPATCH_PUBLIC_KEYS` or the file
    /// `WORKER_DISPATCH_PUBLIC_KEYS_FILE` names.
    fn dispatch_keys(&self) -> anyhow::Result<TrustedKeys> {
        const VAR: &str = "WORKER_DISPATCH_PUBLIC_KEYS";
        let text = match (self.get(VAR), self.get("WORKER_DISPATCH_PUBLIC_KEYS_FILE")) {
            (Some(keys), None) => keys,
            (None, Some(path)) => std::fs::read_to_string(&path).map_err(|e| {
                anyhow!("WORKER_DISPATCH_PUBLIC_KEYS_FILE: cannot read {path}: {e}")
            })?,
            (Some(_), Some(_)) => bail!("{VAR}: set either {VAR} or {VAR}_FILE, not both"),
            (None, None) => bail!(
                "{VAR}: required: the public keys (dpk_…) of the gateway's dispatch signing keys"
            ),
        };
        TrustedKeys::from_text(&text).map_err(|e| anyhow!("{VAR}: {e}"))
    }

    /// [`WorkerConfig::driver`].
    fn driver(&self) -> anyhow::Result<DriverConfig> {
        match self.string("WORKER_DRIVER", "sim").as_str() {
            "sim" => self.sim(),
            "exec" => {
                let command = self.get("WORKER_EXEC_COMMAND").ok_or_else(|| {
                    anyhow!("WORKER_EXEC_COMMAND: required when WORKER_DRIVER=exec (a program and its arguments, split on whitespace)")
                })?;
                let mut words = command.split_whitespace().map(str::to_owned);
                let program = words.next().map(PathBuf::from).unwrap_or_default();
                Ok(DriverConfig::Exec {
                    program,
                    args: words.collect(),
                })
            }
            other => bail!("WORKER_DRIVER: must be 'sim' or 'exec', got '{other}'"),
        }
    }

    /// [`DriverConfig::Sim`], from the `SIM_*` variables.
    fn sim(&self) -> anyhow::Result<DriverConfig> {
        let min = self.parse("SIM_MIN_LATENCY_MS", 200u64)?;
        let max = self.parse("SIM_MAX_LATENCY_MS", 1500u64)?;
        if min > max {
            bail!("SIM_MIN_LATENCY_MS: must not exceed SIM_MAX_LATENCY_MS ({max}), got {min}");
        }
        Ok(DriverConfig::Sim {
            config: SimConfig {
                min_latency: Duration::from_millis(min),
                max_latency: Duration::from_millis(max),
                failure_rate: self.rate("SIM_FAILURE_RATE")?,
                transient_failure_rate: self.rate("SIM_TRANSIENT_FAILURE_RATE")?,
            },
            capacity_per_zone: self
                .get("SIM_CAPACITY_PER_ZONE")
                .map(|_| self.parse("SIM_CAPACITY_PER_ZONE", 0u32))
                .transpose()?,
        })
    }

    /// [`WorkerConfig::log_format`].
    fn log_format(&self) -> anyhow::Result<LogFormat> {
        match self.string("LOG_FORMAT", "text").as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => bail!("LOG_FORMAT: must be 'text' or 'json', got '{other}'"),
        }
    }

    /// [`WorkerConfig::listen`].
    fn listen(&self) -> anyhow::Result<SocketAddr> {
        let listen = self.string("WORKER_LISTEN", WorkerConfig::DEFAULT_LISTEN);
        listen.parse().map_err(|e| {
            anyhow!("WORKER_LISTEN: must be an address and port such as 0.0.0.0:9464, got '{listen}': {e}")
        })
    }
}

/// A JetStream name or subject token (see [`gateway_proto::names::check_token`]).
fn token<'a>(name: &str, value: &'a str) -> anyhow::Result<&'a str> {
    gateway_proto::names::check_token(name, value, false).map_err(|e| anyhow!(e))?;
    Ok(value)
}

/// The worker speaks plain HTTP only (no TLS in this build): refuse anything else now
/// rather than retry a request that can never succeed.
fn http_url(name: &str, value: &str) -> anyhow::Result<()> {
    match value.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(anyhow!(
            "{name}: must be an http:// URL (this worker is built without TLS), got '{value}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The public key of a fixed test signing key.
    fn public_key() -> String {
        gateway_proto::signing::SigningKey::from_seed([5; 32])
            .public_key()
            .to_text()
    }

    /// The configuration from `vars`, with a dispatch public key unless `vars` sets
    /// `WORKER_DISPATCH_PUBLIC_KEYS` (blank: unset).
    fn config(vars: &[(&str, &str)]) -> anyhow::Result<WorkerConfig> {
        let mut vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.entry("WORKER_DISPATCH_PUBLIC_KEYS".into())
            .or_insert_with(public_key);
        WorkerConfig::from_lookup(Service::named("vm"), "zone-a".into(), |k| {
            vars.get(k).cloned()
        })
    }

    fn error(vars: &[(&str, &str)]) -> String {
        format!("{:#}", config(vars).unwrap_err())
    }

    #[test]
    fn defaults_need_only_the_gateway_key() {
        let c = config(&[("GATEWAY_KEY", "wk_123")]).unwrap();
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.pool.gateway_url, "http://127.0.0.1:8080");
        assert_eq!(c.pool.gateway_key, "wk_123");
        assert_eq!(c.pool.stream, "OPS");
        assert_eq!(c.pool.concurrency, 16);
        assert_eq!(c.pool.max_deliver, 5);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(
            c.driver,
            DriverConfig::Sim {
                config: SimConfig::default(),
                capacity_per_zone: None
            }
        );
        assert_eq!(c.pool.dispatch_keys.to_text(), public_key());
        assert_eq!(c.nats, NatsLogin::default());
        c.pool.validate().unwrap();
        assert!(
            !format!("{:?}", c.pool).contains("wk_123"),
            "the key is redacted"
        );
    }

    #[test]
    fn values_are_read_from_their_variables() {
        let c = config(&[
            ("GATEWAY_KEY", "k"),
            ("GATEWAY_URL", "http://gw:9000/"),
            ("OPS_STREAM", "OPS_TEST"),
            ("WORKER_CONCURRENCY", "4"),
            ("SIM_MIN_LATENCY_MS", "0"),
            ("SIM_MAX_LATENCY_MS", "10"),
            ("SIM_FAILURE_RATE", "0.25"),
            ("SIM_TRANSIENT_FAILURE_RATE", "1"),
            ("SIM_CAPACITY_PER_ZONE", "7"),
            ("LOG_FORMAT", "json"),
            ("WORKER_LISTEN", "0.0.0.0:19464"),
        ])
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:19464".parse().unwrap());
        assert_eq!(c.pool.concurrency, 4);
        // max_deliver is the consumer's, read when the pool binds; no variable sets it.
        assert_eq!(c.pool.max_deliver, PoolConfig::DEFAULT_MAX_DELIVER);
        assert_eq!(c.pool.stream, "OPS_TEST");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.driver,
            DriverConfig::Sim {
                config: SimConfig {
                    min_latency: Duration::ZERO,
                    max_latency: Duration::from_millis(10),
                    failure_rate: 0.25,
                    transient_failure_rate: 1.0,
                },
                capacity_per_zone: Some(7),
            }
        );

        let c = config(&[
            ("GATEWAY_KEY", "k"),
            ("WORKER_DRIVER", "exec"),
            ("WORKER_EXEC_COMMAND", "/opt/provision --zone a"),
        ])
        .unwrap();
        assert_eq!(
            c.driver,
            DriverConfig::Exec {
                program: "/opt/provision".into(),
                args: vec!["--zone".into(), "a".into()]
            }
        );
    }

    #[test]
    fn bad_values_fail_with_a_message_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "GATEWAY_KEY: required"),
            (&[("GATEWAY_KEY", "   ")], "GATEWAY_KEY: required"),
            (
                &[("GATEWAY_KEY", "k"), ("SIM_FAILURE_RATE", "x")],
                "SIM_FAILURE_RATE: must be a number between 0 and 1, got 'x'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("SIM_TRANSIENT_FAILURE_RATE", "1.5")],
                "SIM_TRANSIENT_FAILURE_RATE: must be a number between 0 and 1, got '1.5'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_CONCURRENCY", "many")],
                "WORKER_CONCURRENCY: invalid value 'many'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_CONCURRENCY", "0")],
                "WORKER_CONCURRENCY: must be between 1",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("SIM_MAX_LATENCY_MS", "-1")],
                "SIM_MAX_LATENCY_MS: invalid value '-1'",
            ),
            (
                &[
                    ("GATEWAY_KEY", "k"),
                    ("SIM_MIN_LATENCY_MS", "50"),
                    ("SIM_MAX_LATENCY_MS", "10"),
                ],
                "SIM_MIN_LATENCY_MS: must not exceed SIM_MAX_LATENCY_MS",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("SIM_CAPACITY_PER_ZONE", "lots")],
                "SIM_CAPACITY_PER_ZONE: invalid value",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_DRIVER", "docker")],
                "WORKER_DRIVER: must be 'sim' or 'exec', got 'docker'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_DRIVER", "exec")],
                "WORKER_EXEC_COMMAND: required",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("LOG_FORMAT", "xml")],
                "LOG_FORMAT: must be 'text' or 'json'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("GATEWAY_URL", "https://gw")],
                "GATEWAY_URL: must be an http:// URL",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("OPS_STREAM", "OPS.x")],
                "OPS_STREAM: may hold only",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_LISTEN", "9464")],
                "WORKER_LISTEN: must be an address and port such as 0.0.0.0:9464, got '9464'",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_LISTEN", "localhost:9464")],
                "WORKER_LISTEN: must be an address and port",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("WORKER_DISPATCH_PUBLIC_KEYS", " ")],
                "WORKER_DISPATCH_PUBLIC_KEYS: required",
            ),
            (
                &[
                    ("GATEWAY_KEY", "k"),
                    ("WORKER_DISPATCH_PUBLIC_KEYS", "dsk_x"),
                ],
                "WORKER_DISPATCH_PUBLIC_KEYS: a dispatch public key must start with",
            ),
            (
                &[("GATEWAY_KEY", "k"), ("NATS_USER", "worker")],
                "NATS_PASSWORD: required with NATS_USER",
            ),
        ];
        for (vars, expected) in cases {
            let message = error(vars);
            assert!(
                message.starts_with(expected),
                "{vars:?}: got {message:?}, want {expected:?}"
            );
        }
    }

    #[test]
    fn a_zone_that_cannot_name_a_consumer_is_refused() {
        let err =
            WorkerConfig::from_lookup(Service::named("vm"), "zone.a".into(), |_| Some("k".into()))
                .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("WORKER_ZONE (--zone): may hold only"));
    }

    #[test]
    fn pool_configs_are_checked_before_running() {
        let pool = config(&[("GATEWAY_KEY", "k")]).unwrap().pool;
        assert!(PoolConfig {
            concurrency: 0,
            ..pool.clone()
        }
        .validate()
        .is_err());
        assert!(PoolConfig {
            gateway_key: String::new(),
            ..pool.clone()
        }
        .validate()
        .is_err());
        assert!(PoolConfig {
            dispatch_keys: Default::default(),
            ..pool.clone()
        }
        .validate()
        .is_err());
        assert!(PoolConfig {
            report_batch: 0,
            ..pool.clone()
        }
        .validate()
        .is_err());
        assert!(PoolConfig {
            zone: "a b".into(),
            ..pool
        }
        .validate()
        .is_err());
    }
}
