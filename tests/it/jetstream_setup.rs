//! Setting up JetStream (`gateway::jetstream::apply`, what `migrate` and `up` run) on a
//! server where other deployments create and delete streams at the same time.

use crate::common::Nats;
use async_nats::jetstream::{self, stream};
use gateway::config::NatsNames;
use gateway_proto::Service;

fn names(i: usize) -> NatsNames {
    NatsNames {
        region: None,
        stream: format!("SETUP{i}"),
        subject_prefix: format!("setup{i}.ops"),
        events_prefix: format!("setup{i}.events"),
    }
}

/// nats-server (2.9) removes an account's stream directory when the account's last
/// stream is deleted, and a stream created at that moment is refused (`10049 error
/// creating store for stream … no such file or directory`). Deployments that share a
/// server and its account (test runs, a staging gateway beside CI) create and delete
/// streams all the time: the set-up must not fail because of that.
#[tokio::test]
async fn setting_up_streams_survives_other_deployments_deleting_theirs() {
    let nats = Nats::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // Another deployment, whose only stream comes and goes: each deletion may leave
    // the account with no stream at all, and its directory is removed.
    let mut churn = tokio::task::JoinSet::new();
    for c in 0..4 {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        churn.spawn(async move {
            loop {
                let config = stream::Config {
                    name: format!("CHURN{c}"),
                    subjects: vec![format!("churn{c}")],
                    ..Default::default()
                };
                let _ = js.create_stream(config).await;
                let _ = js.delete_stream(format!("CHURN{c}")).await;
            }
        });
    }
    let (zones, services) = (["zone-a".to_string()], [Service::named("vm")]);
    for i in 0..120 {
        let names = names(i);
        gateway::jetstream::apply(&js, &names, &zones, &services)
            .await
            .unwrap_or_else(|e| panic!("set-up {i}: {e:#}"));
        // Torn down again, so that the account keeps running out of streams.
        for s in gateway::jetstream::stream_names(&names).unwrap() {
            js.delete_stream(&s).await.unwrap();
        }
    }
    churn.abort_all();
}

/// The webhook dispatchers' consumer made with its (empty) events stream takes every
/// event, so one published between the two (the streams made again beside a running
/// relay, after a NATS server lost its store) is not skipped; made for a stream that
/// already has events, it starts with the next one; and one that exists keeps its policy
/// (the server cannot change it).
#[tokio::test]
async fn the_webhook_consumer_made_with_its_stream_misses_no_event() {
    use async_nats::jetstream::consumer::DeliverPolicy;
    let nats = Nats::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (zones, services) = (["zone-a".to_string()], [Service::named("vm")]);
    let names = names(0);
    let policy = || {
        let js = js.clone();
        let stream = names.events_stream();
        async move {
            js.get_stream(stream)
                .await
                .unwrap()
                .consumer_info(gateway::jetstream::WEBHOOK_CONSUMER)
                .await
                .unwrap()
                .config
                .deliver_policy
        }
    };
    gateway::jetstream::apply(&js, &names, &zones, &services)
        .await
        .unwrap();
    assert_eq!(policy().await, DeliverPolicy::All);
    gateway::jetstream::apply(&js, &names, &zones, &services)
        .await
        .unwrap();
    assert_eq!(policy().await, DeliverPolicy::All, "kept");
    // A stream with events and no consumer (one added to a running deployment).
    let events = js.get_stream(names.events_stream()).await.unwrap();
    events
        .delete_consumer(gateway::jetstream::WEBHOOK_CONSUMER)
        .await
        .unwrap();
    js.publish(format!("{}.t.vm.zone-a", names.events_prefix), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    gateway::jetstream::apply(&js, &names, &zones, &services)
        .await
        .unwrap();
    assert_eq!(policy().await, DeliverPolicy::New);
}
