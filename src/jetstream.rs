//! JetStream set-up from the definitions in `nats/streams.json`.
//!
//! The file is embedded at build time, so the binary needs nothing beside it; it is data
//! rather than code so operators can read and review what is applied. Applying is
//! idempotent: existing streams and consumers get the changed settings.

use crate::config::NatsNames;
use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use gateway_proto::Service;
use serde::Deserialize;
use std::time::Duration;

/// The definitions file, as shipped.
pub const DEFINITIONS: &str = include_str!("../nats/streams.json");

#[derive(Debug, Deserialize)]
struct Definitions {
    ops_stream: StreamDef,
    pool_consumer: ConsumerDef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamDef {
    name: String,
    subjects: Vec<String>,
    retention: String,
    storage: String,
    discard: String,
    max_bytes: i64,
    max_message_size: i32,
    duplicate_window_seconds: u64,
    replicas: usize,
}

/// A pool consumer's settings, also needed by workers (`max_deliver`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerDef {
    durable_name: String,
    filter_subject: String,
    ack_wait_seconds: u64,
    backoff_seconds: Vec<u64>,
    /// Deliveries before JetStream gives up on a message.
    pub max_deliver: i64,
    max_ack_pending: i64,
    max_waiting: i64,
}

fn substitute(template: &str, names: &NatsNames, pool: Option<(Service, &str)>) -> String {
    let mut s = template
        .replace("${stream}", &names.stream)
        .replace("${prefix}", &names.subject_prefix);
    if let Some((service, zone)) = pool {
        s = s
            .replace("${service}", service.as_str())
            .replace("${zone}", zone);
    }
    s
}

fn definitions() -> anyhow::Result<Definitions> {
    serde_json::from_str(DEFINITIONS).context("nats/streams.json is not valid")
}

/// The pool consumer definition (shared by all pools).
pub fn consumer_def() -> anyhow::Result<ConsumerDef> {
    Ok(definitions()?.pool_consumer)
}

/// The operations stream's configuration for `names`.
pub fn ops_stream_config(names: &NatsNames) -> anyhow::Result<stream::Config> {
    let d = definitions()?.ops_stream;
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
        duplicate_window: Duration::from_secs(d.duplicate_window_seconds),
        num_replicas: d.replicas,
        ..Default::default()
    })
}

/// The pull consumer of one pool.
pub fn pool_consumer_config(
    names: &NatsNames,
    service: Service,
    zone: &str,
) -> anyhow::Result<consumer::pull::Config> {
    let d = consumer_def()?;
    let pool = Some((service, zone));
    Ok(consumer::pull::Config {
        durable_name: Some(substitute(&d.durable_name, names, pool)),
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
        ..Default::default()
    })
}

/// Creates or updates the operations stream and one consumer per service×zone.
pub async fn apply(
    js: &jetstream::Context,
    names: &NatsNames,
    zones: &[String],
) -> anyhow::Result<()> {
    let config = ops_stream_config(names)?;
    js.create_or_update_stream(config.clone())
        .await
        .with_context(|| format!("creating or updating JetStream stream {}", config.name))?;
    let stream = js.get_stream(&config.name).await?;
    for zone in zones {
        for service in Service::ALL {
            let c = pool_consumer_config(names, *service, zone)?;
            let name = c.durable_name.clone().unwrap_or_default();
            // On NATS 2.9 creating a durable that exists updates its editable settings.
            stream
                .create_consumer(c)
                .await
                .with_context(|| format!("creating or updating consumer {name}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_definitions_parse_and_substitute() {
        let names = NatsNames {
            stream: "T1".into(),
            subject_prefix: "t1.ops".into(),
        };
        let s = ops_stream_config(&names).unwrap();
        assert_eq!(s.name, "T1");
        assert_eq!(s.subjects, vec!["t1.ops.*.*".to_string()]);
        assert_eq!(s.discard, stream::DiscardPolicy::New);
        let c = pool_consumer_config(&names, Service::K8s, "zone-b").unwrap();
        assert_eq!(c.durable_name.as_deref(), Some("k8s-zone-b"));
        assert_eq!(c.filter_subject, "t1.ops.k8s.zone-b");
        assert_eq!(
            c.durable_name.unwrap(),
            gateway_proto::consumer_name(Service::K8s, "zone-b")
        );
        assert!(c.backoff.len() as i64 <= c.max_deliver);
    }

    #[test]
    fn the_duplicate_window_outlasts_the_relays_retry_gap() {
        // The relay retries a failed publish within seconds; a re-publish after a crash
        // happens as soon as another relay claims the row. 15 minutes covers both.
        let s = ops_stream_config(&NatsNames::default()).unwrap();
        assert!(s.duplicate_window >= Duration::from_secs(300));
    }
}
