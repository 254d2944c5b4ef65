//! Replication of global data between regions, through NATS JetStream.
//!
//! Each region's relay publishes the region's own changes ([`publish`]: the
//! `replication_log` the database triggers fill, in clock order) to the region's stream
//! `REPLICATION-{region}`, one subject per row (`replication.{region}.{table}.{row}`)
//! with one message kept per subject, so the stream is a compacted copy of everything
//! the region ever wrote — a region added later gets it all. Each region's NATS servers
//! are linked to the others' as a NATS leaf node, each in its own JetStream domain (the
//! region's name), and its stream `REPLICATION-IN` *sources* every peer's stream through
//! that peer's domain: NATS moves the messages between sites, buffers them while the
//! link is down and catches up when it returns. The relay applies what arrives
//! ([`apply`]) with last-writer-wins by hybrid logical clock (migration 0015).

pub mod apply;
pub mod publish;

use crate::config::RegionSettings;
use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use std::time::Duration;

/// The subject prefix of replicated changes.
pub const SUBJECT_PREFIX: &str = "replication";
/// The stream every peer's changes are sourced into.
pub const INBOUND_STREAM: &str = "REPLICATION-IN";

/// The stream of region `region`'s own changes.
pub fn outbound_stream(region: &str) -> String {
    format!("REPLICATION-{region}")
}

/// The subject of one change of `region`.
pub fn subject(region: &str, table: &str, row_token: &str) -> String {
    format!("{SUBJECT_PREFIX}.{region}.{table}.{row_token}")
}

/// Creates (or updates) this region's outbound stream and the inbound stream sourcing
/// every peer's (the applier reads it with consumers of its own, from where the database
/// says it got to).
pub async fn ensure_streams(
    js: &jetstream::Context,
    region: &RegionSettings,
    replicas: Option<usize>,
) -> anyhow::Result<()> {
    let replicas = replicas.unwrap_or(1);
    let outbound = stream::Config {
        name: outbound_stream(&region.name),
        subjects: vec![format!("{SUBJECT_PREFIX}.{}.>", region.name)],
        max_messages_per_subject: 1,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        ..Default::default()
    };
    let sources = region
        .peers
        .iter()
        .map(|peer| stream::Source {
            name: outbound_stream(peer),
            domain: Some(peer.clone()),
            ..Default::default()
        })
        .collect();
    let inbound = stream::Config {
        name: INBOUND_STREAM.into(),
        sources: Some(sources),
        max_messages_per_subject: 1,
        num_replicas: replicas,
        ..Default::default()
    };
    for config in [outbound, inbound] {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .with_context(|| format!("creating or updating JetStream stream {name}"))?;
    }
    Ok(())
}
