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
        // The peer's JetStream domain as its API prefix (`external`), not `domain`: the
        // client turns `domain` into that prefix when it creates a stream, but sends it
        // as it is when it updates one, and the server then looks for the peer's stream
        // in this region (`stream not found`), so adding a peer to a running region broke
        // its sourcing for good.
        .map(|peer| stream::Source {
            name: outbound_stream(peer),
            external: Some(stream::External {
                api_prefix: format!("$JS.{peer}.API"),
                delivery_prefix: None,
            }),
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
        // An unchanged stream is left alone: on the nats-server this project tests with
        // (2.9), updating `REPLICATION-IN`, even to the same configuration, could leave
        // its sourcing stalled (lag 0, no longer active), so a restarted region stopped
        // receiving its peers' changes (`regions::a_region_that_crashes_mid_replication_loses_nothing`).
        if let Ok(mut existing) = js.get_stream(&name).await {
            if existing
                .info()
                .await
                .is_ok_and(|i| unchanged(&i.config, &config))
            {
                continue;
            }
        }
        js.create_or_update_stream(config)
            .await
            .with_context(|| format!("creating or updating JetStream stream {name}"))?;
    }
    Ok(())
}

/// Whether `existing` already has everything [`ensure_streams`] sets in `wanted` (the
/// server fills in the rest, and names a source's domain by its API prefix).
fn unchanged(existing: &stream::Config, wanted: &stream::Config) -> bool {
    let sources = |c: &stream::Config| {
        let mut named: Vec<(String, Option<String>)> = c
            .sources
            .iter()
            .flatten()
            .map(|s| {
                let domain = s.domain.clone().or_else(|| {
                    s.external.as_ref().map(|e| {
                        let api = e.api_prefix.trim_start_matches("$JS.");
                        api.trim_end_matches(".API").to_owned()
                    })
                });
                (s.name.clone(), domain)
            })
            .collect();
        named.sort();
        named
    };
    existing.subjects == wanted.subjects
        && existing.max_messages_per_subject == wanted.max_messages_per_subject
        && existing.num_replicas == wanted.num_replicas
        && (wanted.duplicate_window.is_zero()
            || existing.duplicate_window == wanted.duplicate_window)
        && sources(existing) == sources(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_as_the_server_reports_it_is_unchanged_until_a_peer_changes() {
        let wanted = stream::Config {
            name: INBOUND_STREAM.into(),
            sources: Some(vec![stream::Source {
                name: outbound_stream("r1"),
                domain: Some("r1".into()),
                ..Default::default()
            }]),
            max_messages_per_subject: 1,
            num_replicas: 1,
            ..Default::default()
        };
        // The server names the domain by its API prefix and fills in defaults.
        let mut reported = wanted.clone();
        reported.sources = Some(vec![stream::Source {
            name: outbound_stream("r1"),
            external: Some(stream::External {
                api_prefix: "$JS.r1.API".into(),
                delivery_prefix: None,
            }),
            ..Default::default()
        }]);
        reported.duplicate_window = Duration::from_secs(120);
        assert!(unchanged(&reported, &wanted));
        let mut more = wanted.clone();
        more.sources.as_mut().unwrap().push(stream::Source {
            name: outbound_stream("r3"),
            domain: Some("r3".into()),
            ..Default::default()
        });
        assert!(!unchanged(&reported, &more));
    }
}
