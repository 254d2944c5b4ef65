//! Events written with their change (issue 10, part 1): a trigger records each change's
//! event in its transaction, the relay publishes them in commit order per resource,
//! deduplicated by event ID.

use crate::common::{self, example_spec, id_of, spawn_app, spawn_with, Options, TestApp};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use gateway_proto::events::CloudEvent;
use serde_json::{json, Value};
use std::time::Duration;

/// Every event of `tenant` in the events stream, in stream order, once `n` are there
/// (waits up to 20 s), with their stream sequences.
async fn events_of(app: &TestApp, tenant: &str, n: usize) -> Vec<(u64, CloudEvent)> {
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let stream = js
        .get_stream(app.config.nats.events_stream())
        .await
        .unwrap();
    let filter = format!("{}.{tenant}.>", app.config.nats.events_prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending as usize;
        let mut out = Vec::new();
        if pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(pending)
                .messages()
                .await
                .unwrap();
            while let Some(m) = batch.next().await {
                let m = m.unwrap();
                let seq = m.info().unwrap().stream_sequence;
                out.push((seq, serde_json::from_slice(&m.payload).unwrap()));
            }
        }
        if out.len() >= n {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} events: {:?}",
            out.len(),
            out.iter().map(|(_, e)| e.event_type).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn types(events: &[(u64, CloudEvent)]) -> Vec<&'static str> {
    events.iter().map(|(_, e)| e.event_type.as_str()).collect()
}

#[tokio::test]
async fn every_change_of_an_operation_and_its_resource_is_published_in_order_as_cloudevents() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let done = app.wait_done(&id_of(&op).to_string()).await;
    assert_eq!(done["state"], "succeeded");
    let resource_id = done["resource_id"].as_str().unwrap().to_owned();
    let events = events_of(&app, &tenant, 7).await;
    let ops: Vec<_> = types(&events)
        .into_iter()
        .filter(|t| t.starts_with("operation."))
        .collect();
    assert_eq!(
        ops,
        [
            "operation.created",
            "operation.pending",
            "operation.dispatched",
            "operation.running",
            "operation.succeeded"
        ],
        "each state transition once, in order"
    );
    assert_eq!(
        types(&events)[0],
        "resource.created",
        "{:?}",
        types(&events)
    );
    let last_resource = events
        .iter()
        .rev()
        .find(|(_, e)| !e.event_type.is_operation())
        .unwrap();
    assert_eq!(
        last_resource.1.event_type.as_str(),
        "resource.status_changed"
    );
    assert_eq!(last_resource.1.data["phase"], "ready");
    // Stream order is commit order: sequences grow.
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
    // The CloudEvents attributes, and data exactly as the API shows it.
    let (_, succeeded) = events
        .iter()
        .find(|(_, e)| e.event_type.as_str() == "operation.succeeded")
        .unwrap();
    assert_eq!(succeeded.specversion, "1.0");
    assert_eq!(succeeded.source, format!("/v1/tenants/{tenant}"));
    assert_eq!(succeeded.subject, format!("operations/{}", id_of(&op)));
    assert_eq!(succeeded.tenant, tenant);
    assert_eq!(succeeded.zone, "zone-a");
    assert_eq!(succeeded.resourceid.to_string(), resource_id);
    assert_eq!(succeeded.operationid, Some(id_of(&op)));
    assert_eq!(succeeded.requestid.as_deref(), done["request_id"].as_str());
    assert_eq!(succeeded.generation, 1);
    assert!(
        succeeded.cursor.is_none(),
        "the cursor is added when served"
    );
    assert_eq!(
        succeeded.data, done,
        "data is the operation as GET shows it"
    );
    let resource = app
        .get(&format!("/v1/tenants/{tenant}/vms/{resource_id}"))
        .await;
    assert_eq!(last_resource.1.data, resource.body);
    assert_eq!(last_resource.1.subject, format!("vms/{resource_id}"));
    let created = &events[0].1;
    assert_eq!(
        created.operationid,
        Some(id_of(&op)),
        "a resource event names the operation whose transaction changed it"
    );
    // One row stands for `operation.created` and `operation.pending` (migration 0020):
    // two events as before, the first with the operation as created.
    let of_type = |t: &str| {
        &events
            .iter()
            .find(|(_, e)| e.event_type.as_str() == t)
            .unwrap()
            .1
    };
    let (created, pending) = (of_type("operation.created"), of_type("operation.pending"));
    assert_ne!(created.id, pending.id);
    assert_eq!(created.data["state"], "queued");
    assert_eq!(pending.data["state"], "pending");
    let without = |e: &CloudEvent| {
        let mut data = e.data.clone();
        data.as_object_mut().unwrap().remove("state");
        data
    };
    assert_eq!(
        without(created),
        without(pending),
        "the same operation otherwise"
    );
    assert_eq!(
        app.count("event_outbox").await,
        0,
        "published rows are deleted"
    );
}

#[tokio::test]
async fn an_event_commits_with_its_change_or_not_at_all_whoever_writes_the_row() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let before = app.count("event_outbox").await;
    assert_eq!(
        before, 2,
        "resource.created; operation.created, standing for operation.pending too"
    );
    // A change rolled back leaves no event.
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE operations SET state = 'running', attempt = 1 WHERE id = $1")
        .bind(id_of(&op))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(app.count("event_outbox").await, before);
    // A change made by hand, outside the gateway's code, still records its event.
    sqlx::query("UPDATE operations SET state = 'running', attempt = 1 WHERE id = $1")
        .bind(id_of(&op))
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        app.count("event_outbox WHERE type = 'operation.running'")
            .await,
        1
    );
    // A write that changes no state (bookkeeping) records none.
    sqlx::query("UPDATE operations SET stream_seq = 42 WHERE id = $1")
        .bind(id_of(&op))
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(app.count("event_outbox").await, before + 1);
    // A refused request (validation error) records nothing.
    let a = app
        .post(
            &format!("/v1/tenants/{tenant}/vms"),
            json!({"name": "bad", "zone": "zone-a", "spec": {"flavor": "nope", "image": "debian-12"}}),
        )
        .await;
    assert!(a.status.is_client_error());
    assert_eq!(app.count("event_outbox").await, before + 1);
}

#[tokio::test]
async fn a_relay_that_dies_between_publish_and_delete_publishes_nothing_twice() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    app.create_vms(&tenant, 5).await;
    let rows = app.count("event_outbox").await as usize;
    // Per create: resource.created; operation.created, standing for operation.pending too.
    assert_eq!(rows, 10);
    let published = 15;
    // The delete fails after every publish was acknowledged: as if the relay died there.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected: relay died'; END $$;
         CREATE TRIGGER refuse BEFORE DELETE ON event_outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let relay = crate::outbox::relay_for(&app);
    assert!(relay.events_pass().await.is_err());
    assert_eq!(
        app.count("event_outbox").await as usize,
        rows,
        "nothing deleted"
    );
    sqlx::raw_sql("DROP TRIGGER refuse ON event_outbox")
        .execute(&app.pool)
        .await
        .unwrap();
    let pass = relay.events_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (rows, rows));
    assert_eq!(app.count("event_outbox").await, 0);
    let events = events_of(&app, &tenant, published).await;
    assert_eq!(events.len(), published, "each event once in the stream");
    let mut ids: Vec<_> = events.iter().map(|(_, e)| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), published);
}

/// The events claim of the relay before migration 0020, as it shipped.
const CLAIM_BEFORE_0020: &str =
    "SELECT e.id, e.event_id, e.type, e.tenant, e.kind, t.plural, e.zone, e.resource_id,
            e.operation_id, e.request_id, e.row, e.created_at
     FROM event_outbox e LEFT JOIN resource_types t ON t.kind = e.kind
     ORDER BY e.id LIMIT $1";

/// An event row as the relay before migration 0020 read it: `row` never NULL.
#[derive(sqlx::FromRow)]
#[allow(dead_code)]
struct RowBefore0020 {
    id: i64,
    event_id: uuid::Uuid,
    #[sqlx(rename = "type")]
    event_type: String,
    tenant: String,
    kind: String,
    plural: Option<String>,
    zone: String,
    resource_id: uuid::Uuid,
    operation_id: Option<uuid::Uuid>,
    request_id: Option<String>,
    row: Value,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// During a rolling upgrade past migration 0020, a relay of the version before cannot
/// take a row that stands for two events (it would publish `operation.created` alone):
/// its claim fails on the row, so its pass fails and deletes nothing, and a relay of
/// this version publishes both events.
#[tokio::test]
async fn a_relay_of_the_version_before_fails_on_a_row_standing_for_two_events() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let mut old = app.pool.begin().await.unwrap();
    let claimed = sqlx::query_as::<_, RowBefore0020>(CLAIM_BEFORE_0020)
        .bind(100i64)
        .fetch_all(&mut *old)
        .await;
    assert!(
        claimed.is_err(),
        "the old relay read a row standing for two events"
    );
    old.rollback().await.unwrap();
    assert_eq!(app.count("event_outbox").await, 2, "nothing taken");
    // The rows that stand for one event (here `resource.created`) it still takes.
    sqlx::query("DELETE FROM event_outbox WHERE state_row IS NOT NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    let claimed = sqlx::query_as::<_, RowBefore0020>(CLAIM_BEFORE_0020)
        .bind(100i64)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "resource.created");
    // This version's relay publishes both events of a row that stands for two.
    let second = app
        .create(&tenant, "vms", "db", "zone-a", example_spec("vms"))
        .await;
    let relay = crate::outbox::relay_for(&app);
    assert_eq!(relay.events_pass().await.unwrap().published, 3);
    let events = events_of(&app, &tenant, 4).await;
    let of_second: Vec<_> = events
        .iter()
        .filter(|(_, e)| e.operationid == Some(id_of(&second)) && e.event_type.is_operation())
        .map(|(_, e)| e.event_type.as_str())
        .collect();
    assert_eq!(of_second, ["operation.created", "operation.pending"]);
    assert!(events
        .iter()
        .all(|(_, e)| e.operationid != Some(id_of(&op)) || !e.event_type.is_operation()));
}

/// A row standing for two events whose second publish JetStream refuses stays in the
/// outbox whole; the next pass publishes it again, JetStream drops the first event as a
/// duplicate (its `Nats-Msg-Id`), and each event is in the stream once, in order. The
/// refusal is real: the events stream is made to take one message fewer than the pass
/// publishes (`max_msgs` with `discard: new`).
#[tokio::test]
async fn a_row_whose_second_event_is_refused_is_published_again_without_a_duplicate() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let limit = |max_messages: i64| {
        let js = js.clone();
        let name = app.config.nats.events_stream();
        async move {
            let mut config = js
                .get_stream(&name)
                .await
                .unwrap()
                .cached_info()
                .config
                .clone();
            config.max_messages = max_messages;
            config.discard = async_nats::jetstream::stream::DiscardPolicy::New;
            js.update_stream(config).await.unwrap();
        }
    };
    // `resource.created`, then the operation's row: `operation.created` fits, its
    // `operation.pending` does not.
    limit(2).await;
    let relay = crate::outbox::relay_for(&app);
    let pass = relay.events_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (2, 1), "{pass:?}");
    let left: Vec<(String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT type, operation_id FROM event_outbox")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        left,
        [("operation.created".to_owned(), Some(id_of(&op)))],
        "the row of two events stays whole"
    );
    limit(-1).await;
    let pass = relay.events_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (1, 1), "{pass:?}");
    assert_eq!(app.count("event_outbox").await, 0);
    let events = events_of(&app, &tenant, 3).await;
    assert_eq!(
        types(&events),
        ["resource.created", "operation.created", "operation.pending"],
        "each event once"
    );
    let stream = js
        .get_stream(app.config.nats.events_stream())
        .await
        .unwrap();
    assert_eq!(
        stream.cached_info().state.messages,
        3,
        "no duplicate stored"
    );
}

/// A row the relay cannot turn into its events (written by hand, or by a newer schema)
/// is dropped, logged and counted, not retried forever, and the rows around it are
/// published: an unknown type, and a row standing for two events whose operation has
/// no known state.
#[tokio::test]
async fn malformed_event_rows_are_dropped_and_counted_and_the_others_published() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    sqlx::query(
        "INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, row)
         VALUES ('operation.exploded', $1, 'vm', 'zone-a', gen_random_uuid(), '{}');
         ",
    )
    .bind(&tenant)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO event_outbox (type, tenant, kind, zone, resource_id, operation_id,
                                   state_row, state_event_id)
         SELECT 'operation.created', tenant, kind, zone, resource_id, id,
                to_jsonb(o) || '{\"state\": \"nowhere\"}', gen_random_uuid()
         FROM operations o WHERE id = $1",
    )
    .bind(id_of(&op))
    .execute(&app.pool)
    .await
    .unwrap();
    let relay = crate::outbox::relay_for(&app);
    let pass = relay.events_pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (4, 4));
    assert_eq!(app.count("event_outbox").await, 0, "none left to retry");
    let events = events_of(&app, &tenant, 3).await;
    assert_eq!(
        types(&events),
        ["resource.created", "operation.created", "operation.pending"]
    );
    assert_eq!(relay.metrics.events_malformed.get(), 2);
}

#[tokio::test]
async fn only_one_relay_publishes_events_at_a_time() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    // Another relay holds the publisher lock in an open transaction.
    let mut other = app.pool.begin().await.unwrap();
    let claimed = gateway::store::events::claim(&mut other, 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let relay = crate::outbox::relay_for(&app);
    let pass = relay.events_pass().await.unwrap();
    assert_eq!(pass.claimed, 0, "the second relay waits its turn");
    other.rollback().await.unwrap();
    assert_eq!(relay.events_pass().await.unwrap().published, 2);
}

#[tokio::test]
async fn events_of_many_resources_keep_each_resources_order_under_concurrent_writes() {
    let _h = common::heavy().await;
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let mut ops = Vec::new();
    for i in 0..20 {
        let op = app
            .create(
                &tenant,
                "vms",
                &format!("vm-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        ops.push(id_of(&op).to_string());
    }
    // An update queued behind each create: two operations per resource.
    let mut updates = Vec::new();
    for op in &ops {
        let rid = app.get(&format!("/v1/operations/{op}")).await.body["resource_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let a = app
            .request(
                reqwest::Method::PATCH,
                &format!("/v1/tenants/{tenant}/vms/{rid}"),
                Some(&app.admin_key),
                Some(&json!({"spec": {"flavor": "m1.large", "image": "debian-12"}})),
            )
            .await;
        assert_eq!(a.status, 202, "{:?}", a.body);
        updates.push(a.body["id"].as_str().unwrap().to_owned());
    }
    for op in ops.iter().chain(&updates) {
        app.wait_done(op).await;
    }
    app.wait_outbox_empty().await;
    let events = events_of(&app, &tenant, 20 * 14).await;
    let rank = |t: &str| {
        [
            "operation.created",
            "operation.pending",
            "operation.dispatched",
            "operation.running",
            "operation.succeeded",
        ]
        .iter()
        .position(|x| *x == t)
        .unwrap()
    };
    let mut last: std::collections::HashMap<uuid::Uuid, (usize, i64)> = Default::default();
    let mut generation: std::collections::HashMap<uuid::Uuid, i64> = Default::default();
    for (_, e) in &events {
        if e.event_type.is_operation() {
            let r = rank(e.event_type.as_str());
            let prev = last.insert(e.operationid.unwrap(), (r, 0));
            assert!(prev.is_none_or(|(p, _)| p < r), "{e:?} after {prev:?}");
        } else {
            let g = e.data["generation"].as_i64().unwrap();
            let prev = generation.insert(e.resourceid, g).unwrap_or(0);
            assert!(g >= prev, "generation went back: {e:?}");
        }
    }
    assert_eq!(last.len(), 40);
    assert!(
        last.values().all(|(r, _)| *r == 4),
        "every operation succeeded"
    );
    let value: Value = serde_json::to_value(&events[0].1).unwrap();
    assert!(value.get("type").is_some());
}

#[tokio::test]
async fn a_report_that_dispatches_nothing_still_has_its_event_published_at_once() {
    // The relay polls only once a minute here: only its doorbell can be in time.
    let app = spawn_with(Options {
        tweak: |c| c.relay_poll_interval = Duration::from_secs(60),
        ..Options::api_and_relay()
    })
    .await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = id_of(&op).to_string();
    app.wait_op(&id, |o| o["state"] == "dispatched").await;
    let a = app
        .report_as_vm_worker(&id, json!({"attempt": 1, "state": "running"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // The report writes no outbox row, yet its event goes out well within the minute.
    let started = std::time::Instant::now();
    let events = events_of(&app, &tenant, 5).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        types(&events).contains(&"operation.running"),
        "{:?}",
        types(&events)
    );
}

#[tokio::test]
async fn a_resource_change_names_the_operation_that_made_it_when_the_next_starts_with_it() {
    // No workers: the test plays the worker, so the next operation is queued for sure.
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let create = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let path = common::vm_path(&tenant, &create);
    let done = |id: &str| {
        let (app, id) = (&app, id.to_owned());
        async move {
            for state in ["running", "succeeded"] {
                let a = app
                    .report_as_vm_worker(&id, json!({"attempt": 1, "state": state, "status": {}}))
                    .await;
                assert_eq!(a.status, 200, "{:?}", a.body);
            }
        }
    };
    done(create["id"].as_str().unwrap()).await;
    let reboot = app
        .post(&format!("{path}/actions/reboot"), json!({}))
        .await
        .body;
    let relabel = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin_key),
            Some(&json!({"labels": {"team": "a"}})),
        )
        .await
        .body;
    assert_eq!(relabel["state"], "queued", "{relabel}");
    // The reboot's end and the relabel's start, in one transaction.
    done(reboot["id"].as_str().unwrap()).await;
    let changes: Vec<(String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT row->>'phase', operation_id FROM event_outbox
         WHERE resource_id = $1 AND type = 'resource.status_changed' ORDER BY id",
    )
    .bind(uuid::Uuid::parse_str(create["resource_id"].as_str().unwrap()).unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let (reboot, relabel) = (id_of(&reboot), id_of(&relabel));
    let last_two = &changes[changes.len() - 2..];
    assert_eq!(
        last_two,
        [
            ("ready".to_owned(), Some(reboot)),
            ("updating".to_owned(), Some(relabel))
        ],
        "all the resource's status changes: {changes:?}"
    );
}
