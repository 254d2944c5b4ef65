//! JetStream set-up from the definitions in `nats/streams.json`.
//!
//! The file is embedded at build time, so the binary needs nothing beside it; it is data
//! rather than code so operators can read and review what is applied. Applying is
//! idempotent and updates changed settings: streams through `STREAM.UPDATE`, consumers
//! by creating the durable again, which the server treats as an update of its editable
//! settings (ack wait, backoff, `max_deliver`, `max_ack_pending`, …).
//!
//! Four streams per deployment ([`stream_names`]):
//!
//! - the operations stream (`OPS`), a work queue with one durable pull consumer per
//!   service×zone, shared by that pool's workers;
//! - the advisory stream (`OPS-ADVISORIES`), which keeps the server's `MAX_DELIVERIES`
//!   and `MSG_TERMINATED` advisories about the operations stream until a gateway has
//!   handled them ([`crate::deadletter`]), with its durable consumer, shared by every
//!   `gateway serve`;
//! - the events stream (`OPS-EVENTS`), with the webhook dispatchers' durable consumer;
//! - the audit stream (`OPS-AUDIT`), one message: the audit chain's end as the last
//!   sealer saw it ([`crate::audit::anchor`]).

use crate::config::NatsNames;
use anyhow::Context as _;
use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::{self, consumer, stream};
use backon::{ExponentialBuilder, Retryable};
use gateway_proto::Service;
use serde::Deserialize;
use std::time::Duration;

/// The definitions file, as shipped.
pub const DEFINITIONS: &str = include_str!("../nats/streams.json");

/// Everything `nats/streams.json` defines. Fields are public so that tests (and tools)
/// can change a setting and apply the result.
#[derive(Debug, Clone, Deserialize)]
pub struct Definitions {
    /// The operations stream.
    pub ops_stream: StreamDef,
    /// The consumer of every pool (service×zone).
    pub pool_consumer: ConsumerDef,
    /// The stream that keeps dead-letter advisories.
    pub advisory_stream: StreamDef,
    /// The gateways' consumer of the advisory stream.
    pub dead_letter_consumer: ConsumerDef,
    /// The stream of events (every committed state change).
    pub events_stream: StreamDef,
    /// The webhook dispatchers' consumer of the events stream.
    pub webhook_consumer: ConsumerDef,
    /// The stream that keeps the audit chain's end ([`crate::audit::anchor`]).
    pub audit_stream: StreamDef,
}

/// The durable name of the webhook dispatchers' consumer of the events stream.
pub const WEBHOOK_CONSUMER: &str = "webhooks";

/// A stream's settings. `${stream}` and `${prefix}` are substituted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    /// Stream name.
    pub name: String,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// `workqueue`, `limits` or `interest`.
    pub retention: String,
    /// `file` or `memory`.
    pub storage: String,
    /// `new` (refuse writes when full) or `old` (drop the oldest).
    pub discard: String,
    /// Size limit.
    pub max_bytes: i64,
    /// Largest message.
    pub max_message_size: i32,
    /// Oldest message kept, 0 for no limit.
    #[serde(default)]
    pub max_age_seconds: u64,
    /// How long a `Nats-Msg-Id` is remembered for deduplication.
    pub duplicate_window_seconds: u64,
    /// Messages kept per subject, 0 for no limit.
    #[serde(default)]
    pub max_messages_per_subject: i64,
    /// Messages cannot be deleted through the API.
    #[serde(default)]
    pub deny_delete: bool,
    /// The stream cannot be purged through the API.
    #[serde(default)]
    pub deny_purge: bool,
    /// Copies in a cluster.
    pub replicas: usize,
}

/// A durable pull consumer's settings. `${service}`, `${zone}`, `${stream}` and
/// `${prefix}` are substituted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerDef {
    /// Durable name.
    pub durable_name: String,
    /// Subject filter (none: the whole stream).
    #[serde(default)]
    pub filter_subject: String,
    /// How long a delivery may go unacknowledged before it is delivered again (when
    /// `backoff_seconds` is empty).
    pub ack_wait_seconds: u64,
    /// The ack wait of the 1st, 2nd, … delivery; the last one repeats.
    #[serde(default)]
    pub backoff_seconds: Vec<u64>,
    /// Deliveries before JetStream gives up on a message (-1: never).
    pub max_deliver: i64,
    /// Deliveries awaiting acknowledgement at once, across all workers of the pool.
    pub max_ack_pending: i64,
    /// Pull requests waiting at once.
    pub max_waiting: i64,
    /// Start with the messages published after the consumer is created (else all).
    #[serde(default)]
    pub deliver_new: bool,
}

fn substitute(template: &str, names: &NatsNames, pool: Option<(Service, &str)>) -> String {
    let mut s = template
        .replace("${stream}", &names.stream)
        .replace("${prefix}", &names.subject_prefix)
        .replace("${events_prefix}", &names.events_prefix);
    if let Some((service, zone)) = pool {
        s = s
            .replace("${service}", service.as_str())
            .replace("${zone}", zone);
    }
    s
}

impl Definitions {
    /// The definitions shipped in `nats/streams.json`.
    pub fn shipped() -> anyhow::Result<Self> {
        serde_json::from_str(DEFINITIONS).context("nats/streams.json is not valid")
    }

    /// The same definitions with both streams replicated `replicas` times
    /// (`NATS_STREAM_REPLICAS`).
    pub fn with_replicas(mut self, replicas: Option<usize>) -> Self {
        if let Some(r) = replicas {
            self.ops_stream.replicas = r;
            self.advisory_stream.replicas = r;
            self.events_stream.replicas = r;
            self.audit_stream.replicas = r;
        }
        self
    }

    /// The same definitions with the events stream's retention set
    /// (`EVENTS_MAX_AGE_SECONDS`, `EVENTS_MAX_BYTES`; `None` keeps the shipped value).
    pub fn with_event_retention(
        mut self,
        max_age: Option<Duration>,
        max_bytes: Option<i64>,
    ) -> Self {
        if let Some(age) = max_age {
            self.events_stream.max_age_seconds = age.as_secs();
        }
        if let Some(bytes) = max_bytes {
            self.events_stream.max_bytes = bytes;
        }
        self
    }

    /// The operations stream's configuration for `names`.
    pub fn ops_stream_config(&self, names: &NatsNames) -> anyhow::Result<stream::Config> {
        stream_config(&self.ops_stream, names)
    }

    /// The advisory stream's configuration for `names`.
    pub fn advisory_stream_config(&self, names: &NatsNames) -> anyhow::Result<stream::Config> {
        stream_config(&self.advisory_stream, names)
    }

    /// The events stream's configuration for `names`.
    pub fn events_stream_config(&self, names: &NatsNames) -> anyhow::Result<stream::Config> {
        stream_config(&self.events_stream, names)
    }

    /// The audit stream's configuration for `names`.
    pub fn audit_stream_config(&self, names: &NatsNames) -> anyhow::Result<stream::Config> {
        stream_config(&self.audit_stream, names)
    }

    /// The pull consumer of one pool.
    pub fn pool_consumer_config(
        &self,
        names: &NatsNames,
        service: &Service,
        zone: &str,
    ) -> consumer::pull::Config {
        consumer_config(&self.pool_consumer, names, Some((service.clone(), zone)))
    }

    /// The gateways' consumer of the advisory stream.
    pub fn dead_letter_consumer_config(&self, names: &NatsNames) -> consumer::pull::Config {
        consumer_config(&self.dead_letter_consumer, names, None)
    }
}

fn stream_config(d: &StreamDef, names: &NatsNames) -> anyhow::Result<stream::Config> {
    Ok(stream::Config {
        name: substitute(&d.name, names, None),
        subjects: d
            .subjects
            .iter()
            .map(|s| substitute(s, names, None))
            .collect(),
        retention: match d.retention.as_str() {
            "workqueue" => stream::RetentionPolicy::WorkQueue,
            "limits" => stream::RetentionPolicy::Limits,
            "interest" => stream::RetentionPolicy::Interest,
            other => anyhow::bail!("nats/streams.json: unknown retention {other:?}"),
        },
        storage: match d.storage.as_str() {
            "file" => stream::StorageType::File,
            "memory" => stream::StorageType::Memory,
            other => anyhow::bail!("nats/streams.json: unknown storage {other:?}"),
        },
        discard: match d.discard.as_str() {
            "new" => stream::DiscardPolicy::New,
            "old" => stream::DiscardPolicy::Old,
            other => anyhow::bail!("nats/streams.json: unknown discard {other:?}"),
        },
        max_bytes: d.max_bytes,
        max_message_size: d.max_message_size,
        max_age: Duration::from_secs(d.max_age_seconds),
        duplicate_window: Duration::from_secs(d.duplicate_window_seconds),
        num_replicas: d.replicas,
        max_messages_per_subject: d.max_messages_per_subject,
        deny_delete: d.deny_delete,
        deny_purge: d.deny_purge,
        ..Default::default()
    })
}

fn consumer_config(
    d: &ConsumerDef,
    names: &NatsNames,
    pool: Option<(Service, &str)>,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(substitute(&d.durable_name, names, pool.clone())),
        filter_subject: substitute(&d.filter_subject, names, pool),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(d.ack_wait_seconds),
        backoff: d
            .backoff_seconds
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        max_deliver: d.max_deliver,
        max_ack_pending: d.max_ack_pending,
        max_waiting: d.max_waiting,
        deliver_policy: if d.deliver_new {
            consumer::DeliverPolicy::New
        } else {
            consumer::DeliverPolicy::All
        },
        ..Default::default()
    }
}

/// The pool consumer definition (shared by all pools), as shipped.
pub fn consumer_def() -> anyhow::Result<ConsumerDef> {
    Ok(Definitions::shipped()?.pool_consumer)
}

/// The operations stream's configuration for `names`, as shipped.
pub fn ops_stream_config(names: &NatsNames) -> anyhow::Result<stream::Config> {
    Definitions::shipped()?.ops_stream_config(names)
}

/// The pull consumer of one pool, as shipped.
pub fn pool_consumer_config(
    names: &NatsNames,
    service: &Service,
    zone: &str,
) -> anyhow::Result<consumer::pull::Config> {
    Ok(Definitions::shipped()?.pool_consumer_config(names, service, zone))
}

/// The name of the advisory stream of the deployment named `names`.
pub fn advisory_stream_name(names: &NatsNames) -> String {
    Definitions::shipped()
        .map(|d| substitute(&d.advisory_stream.name, names, None))
        .unwrap_or_else(|_| format!("{}-ADVISORIES", names.stream))
}

/// Creates or updates the shipped streams and consumers: the operations stream with one
/// consumer per service×zone, and the advisory stream with its consumer.
pub async fn apply(
    js: &jetstream::Context,
    names: &NatsNames,
    zones: &[String],
    services: &[Service],
) -> anyhow::Result<()> {
    apply_definitions(js, names, zones, services, &Definitions::shipped()?).await
}

/// Creates the pool consumers of `services` in `zones` that do not exist yet, on the
/// operations stream (which must exist): what a newly registered service needs. An
/// existing consumer is left as it is (`migrate` is what applies changed settings).
pub async fn ensure_pools(
    js: &jetstream::Context,
    names: &NatsNames,
    zones: &[String],
    services: &[Service],
) -> anyhow::Result<()> {
    let defs = Definitions::shipped()?;
    let ops = js.get_stream(&names.stream).await?;
    for zone in zones {
        for service in services {
            let config = defs.pool_consumer_config(names, service, zone);
            let name = config.durable_name.clone().unwrap_or_default();
            ops.get_or_create_consumer(&name, config)
                .await
                .with_context(|| format!("consumer {name}"))?;
        }
    }
    Ok(())
}

/// Creates or updates the streams and consumers of `defs`.
pub async fn apply_definitions(
    js: &jetstream::Context,
    names: &NatsNames,
    zones: &[String],
    services: &[Service],
    defs: &Definitions,
) -> anyhow::Result<()> {
    let ops = create_or_update_stream(js, defs.ops_stream_config(names)?).await?;
    for zone in zones {
        for service in services {
            create_or_update_consumer(&ops, defs.pool_consumer_config(names, service, zone))
                .await?;
        }
    }
    let advisories = create_or_update_stream(js, defs.advisory_stream_config(names)?).await?;
    create_or_update_consumer(&advisories, defs.dead_letter_consumer_config(names)).await?;
    let mut events = create_or_update_stream(js, defs.events_stream_config(names)?).await?;
    let mut webhooks = consumer_config(&defs.webhook_consumer, names, None);
    // A consumer made with the stream (none yet, no event yet) takes every event: the
    // stream made again beside a running relay (`keep_definitions`) may get one before
    // the consumer exists, which "new events only" would skip. Made for a stream that
    // already has events, it starts with the next one, as the definition says.
    // (The policy of a consumer that exists stays: the server cannot change it.)
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    webhooks.deliver_policy = match events.consumer_info(WEBHOOK_CONSUMER).await {
        Ok(existing) => existing.config.deliver_policy,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            if events.info().await?.state.messages == 0 {
                consumer::DeliverPolicy::All
            } else {
                webhooks.deliver_policy
            }
        }
        Err(e) => return Err(anyhow::Error::new(e).context("the webhook consumer")),
    };
    create_or_update_consumer(&events, webhooks).await?;
    create_or_update_stream(js, defs.audit_stream_config(names)?).await?;
    Ok(())
}

/// How often [`keep_definitions`] looks whether the deployment's streams still exist.
pub const MEND_EVERY: Duration = Duration::from_secs(5);

/// Whether every stream of the deployment named `names` exists; a server that does not
/// answer is an error, not a missing stream.
pub async fn streams_exist(js: &jetstream::Context, names: &NatsNames) -> anyhow::Result<bool> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    for name in stream_names(names)? {
        match js.get_stream(&name).await {
            Ok(_) => {}
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Ok(false)
                }
                _ => return Err(anyhow::Error::new(e).context(format!("stream {name}"))),
            },
        }
    }
    Ok(true)
}

/// Makes the deployment's streams and consumers again whenever one is missing (a NATS
/// server that lost its store, or a stream deleted by hand), looking every
/// [`MEND_EVERY`] until `shutdown`: without it, nothing was published (operations stayed
/// `pending`) until a `gateway migrate` or a restart of `up`. `services` answers the
/// registered services when it is needed. Messages the lost store held are the
/// reconciler's to send again (README, "Delivery guarantees").
pub async fn keep_definitions(
    js: jetstream::Context,
    names: NatsNames,
    zones: Vec<String>,
    services: impl Fn() -> Vec<Service>,
    defs: Definitions,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MEND_EVERY) => {}
        }
        if js.client().connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        match streams_exist(&js, &names).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "cannot look at the JetStream streams");
                continue;
            }
        }
        tracing::warn!("a JetStream stream of this deployment is missing (its NATS store lost?); making the streams and consumers again");
        match apply_definitions(&js, &names, &zones, &services(), &defs).await {
            Ok(()) => tracing::info!("JetStream streams and consumers made again"),
            Err(e) => {
                tracing::error!(error = %e, "cannot make the JetStream streams again; retrying")
            }
        }
    }
}

/// Every stream the shipped definitions make for the deployment named `names`: what
/// removing a deployment (a test's, a benchmark's) deletes.
pub fn stream_names(names: &NatsNames) -> anyhow::Result<Vec<String>> {
    let defs = Definitions::shipped()?;
    [
        &defs.ops_stream,
        &defs.advisory_stream,
        &defs.events_stream,
        &defs.audit_stream,
    ]
    .into_iter()
    .map(|d| Ok(stream_config(d, names)?.name))
    .collect()
}

async fn create_or_update_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<jetstream::stream::Stream> {
    let name = config.name.clone();
    (|| js.create_or_update_stream(config.clone()))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_times(STORE_RETRIES),
        )
        .when(is_store_race)
        .await
        .with_context(|| format!("creating or updating JetStream stream {name}"))?;
    Ok(js.get_stream(&name).await?)
}

/// How many times a stream creation that lost [`is_store_race`] is tried again
/// (50 ms, doubling: about 1.5 s in all).
const STORE_RETRIES: usize = 5;

/// A stream creation refused with `10049 error creating store for stream` — nats-server
/// (2.9 at least) removes an account's `streams` directory when the account's last stream
/// is deleted, and a creation racing that removal fails with `mkdir …/streams: no such
/// file or directory`. Trying again succeeds; a refusal for a bad configuration has codes
/// of its own and is not retried.
fn is_store_race(err: &CreateStreamError) -> bool {
    matches!(err.kind(), CreateStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_CREATE)
}

async fn create_or_update_consumer(
    stream: &jetstream::stream::Stream,
    config: consumer::pull::Config,
) -> anyhow::Result<()> {
    let name = config.durable_name.clone().unwrap_or_default();
    // Creating a durable that exists updates its editable settings (NATS 2.9 and later).
    stream
        .create_consumer(config)
        .await
        .with_context(|| format!("creating or updating consumer {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(json: &str) -> CreateStreamError {
        let e: jetstream::Error = serde_json::from_str(json).unwrap();
        CreateStreamError::new(CreateStreamErrorKind::JetStream(e))
    }

    #[test]
    fn only_the_store_race_is_tried_again() {
        let race = refusal(
            r#"{"code":500,"err_code":10049,"description":"error creating store for stream: mkdir /x/jetstream/$G/streams: no such file or directory"}"#,
        );
        assert!(is_store_race(&race));
        let bad_config = refusal(
            r#"{"code":400,"err_code":10058,"description":"stream name already in use with a different configuration"}"#,
        );
        assert!(!is_store_race(&bad_config));
        assert!(!is_store_race(&CreateStreamError::new(
            CreateStreamErrorKind::TimedOut
        )));
    }

    #[test]
    fn the_audit_stream_keeps_one_end_on_the_subject_only_the_gateway_writes() {
        let names = NatsNames {
            stream: "T1".into(),
            ..NatsNames::default()
        };
        let s = Definitions::shipped()
            .unwrap()
            .audit_stream_config(&names)
            .unwrap();
        assert_eq!(s.name, names.audit_stream());
        assert_eq!(s.subjects, vec![names.audit_end_subject()]);
        assert_eq!(s.max_messages_per_subject, 1);
        assert!(s.deny_delete && s.deny_purge);
        assert_eq!(
            stream_names(&names).unwrap(),
            ["T1", "T1-ADVISORIES", "T1-EVENTS", "T1-AUDIT"]
        );
    }

    #[test]
    fn stream_replicas_override_the_shipped_ones() {
        let names = NatsNames::default();
        let shipped = Definitions::shipped().unwrap();
        assert_eq!(shipped.ops_stream_config(&names).unwrap().num_replicas, 1);
        let three = shipped.with_replicas(Some(3));
        assert_eq!(three.ops_stream_config(&names).unwrap().num_replicas, 3);
        assert_eq!(
            three.advisory_stream_config(&names).unwrap().num_replicas,
            3
        );
        let same = Definitions::shipped().unwrap().with_replicas(None);
        assert_eq!(same.ops_stream_config(&names).unwrap().num_replicas, 1);
    }

    #[test]
    fn shipped_definitions_parse_and_substitute() {
        let names = NatsNames {
            region: None,
            stream: "T1".into(),
            subject_prefix: "t1.ops".into(),
            events_prefix: "t1.events".into(),
        };
        let s = ops_stream_config(&names).unwrap();
        assert_eq!(s.name, "T1");
        assert_eq!(s.subjects, vec!["t1.ops.*.*".to_string()]);
        assert_eq!(s.discard, stream::DiscardPolicy::New);
        let c = pool_consumer_config(&names, &Service::named("k8s"), "zone-b").unwrap();
        assert_eq!(c.durable_name.as_deref(), Some("k8s-zone-b"));
        assert_eq!(c.filter_subject, "t1.ops.k8s.zone-b");
        assert_eq!(
            c.durable_name.unwrap(),
            gateway_proto::consumer_name(&Service::named("k8s"), "zone-b")
        );
        assert!(c.backoff.len() as i64 <= c.max_deliver);
    }

    #[test]
    fn the_advisory_stream_keeps_only_this_deployments_dead_letters() {
        let names = NatsNames {
            region: None,
            stream: "T1".into(),
            subject_prefix: "t1.ops".into(),
            events_prefix: "t1.events".into(),
        };
        let defs = Definitions::shipped().unwrap();
        let s = defs.advisory_stream_config(&names).unwrap();
        assert_eq!(s.name, advisory_stream_name(&names));
        assert_eq!(
            s.subjects,
            vec![
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.T1.>".to_string(),
                "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.T1.>".to_string(),
            ]
        );
        assert_eq!(s.retention, stream::RetentionPolicy::WorkQueue);
        assert!(
            s.max_age > Duration::ZERO,
            "bounded even if no gateway runs"
        );
        let c = defs.dead_letter_consumer_config(&names);
        assert_eq!(c.max_deliver, -1, "an advisory is retried until handled");
        assert_eq!(c.filter_subject, "");
    }

    #[test]
    fn the_duplicate_window_outlasts_the_relays_retry_gap() {
        // The relay retries a failed publish within seconds; a re-publish after a crash
        // happens as soon as another relay claims the row. 15 minutes covers both.
        let s = ops_stream_config(&NatsNames::default()).unwrap();
        assert!(s.duplicate_window >= Duration::from_secs(300));
    }

    #[test]
    fn pools_hold_no_more_unacknowledged_messages_than_the_stream_can_redeliver() {
        // Every pool's workers pull at most their concurrency (16 per process by
        // default); max_ack_pending bounds what all of a pool's replicas hold at once.
        let c = consumer_def().unwrap();
        assert!(c.max_ack_pending >= 16);
        assert!(c.max_waiting >= c.max_ack_pending);
        // Workers send Progress well within the shortest ack wait.
        let shortest = c
            .backoff_seconds
            .iter()
            .copied()
            .min()
            .unwrap_or(c.ack_wait_seconds);
        assert!(
            Duration::from_secs(shortest) >= workers::consume::PROGRESS_INTERVAL * 3,
            "{shortest}"
        );
    }
}
