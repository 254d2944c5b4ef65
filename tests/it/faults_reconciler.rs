//! The repairs behind the delivery guarantees, one at a time: the reconciler's sweeper
//! (lost messages), its converger (unapplied specs), the dead-letter handler (messages a
//! worker gave up on), and re-applying the JetStream definitions.

use crate::common;
use crate::common::{example_spec, spawn_with, Options, TestApp};
use async_nats::jetstream::{consumer::PullConsumer, AckKind};
use futures::StreamExt;
use gateway::app::Parts;
use gateway::lifecycle::Engine;
use gateway::reconciler::{Reconciler, Repairs};
use gateway::relay::Wake;
use gateway_proto::Service;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;
use workers::{SimConfig, SimDriver};

async fn reconciler(app: &TestApp) -> Reconciler {
    Reconciler {
        engine: Engine {
            pool: app.pool.clone(),
            names: app.config.nats.clone(),
            operation_timeout: Duration::from_secs(600),
            idempotency_retention: Duration::from_secs(86_400),
            wake: Wake::default(),
            // Announced over NATS, as a reconciler in a process of its own does: the
            // gateway drops its cached reads of what the repairs change.
            changes: gateway::changes::Changes::new(Some((
                app.running.as_ref().unwrap().backends.nats.clone(),
                app.config.nats.changes_subject(),
            ))),
            metrics: Default::default(),
            catalog: Default::default(),
            types: gateway::registry::Registry::load(app.pool.clone())
                .await
                .unwrap(),
            ids: Default::default(),
            group: std::sync::Arc::new(gateway::lifecycle::group::GroupCommit::new(1)),
        },
        interval: Duration::from_secs(1),
        redispatch_after: Duration::from_secs(60),
        js: Some(app.running.as_ref().unwrap().backends.js.clone()),
    }
}

async fn ops_stream(app: &TestApp) -> async_nats::jetstream::stream::Stream {
    let js = &app.running.as_ref().unwrap().backends.js;
    js.get_stream(&app.config.nats.stream).await.unwrap()
}

/// Makes every active operation look quiet for an hour.
async fn age(app: &TestApp) {
    sqlx::query("UPDATE operations SET updated_at = now() - interval '1 hour'")
        .execute(&app.pool)
        .await
        .unwrap();
}

/// Loses every message of the operations stream, as a NATS server that lost its disk.
async fn lose_messages(app: &TestApp) {
    ops_stream(app).await.purge().await.unwrap();
}

/// Waits (30 s at most) until the database has operation `id` `dispatched` with its
/// `n`th message. Not through the API: a read there may come from the gateway's read
/// cache, which hears of a change that the reconciler (an engine of its own, announcing
/// over NATS) made a moment later, so right after a redispatch it can still say
/// `dispatched` of the message before, and the test would lose the messages before the
/// relay has published the new one.
async fn wait_dispatched(app: &TestApp, id: &str, n: i32) {
    let what = format!("operation {id} is dispatched with message {n}");
    common::eventually(&what, || async {
        let (state, _, dispatches, _) = db_op(app, id).await;
        (state == "dispatched" && dispatches == n).then_some(())
    })
    .await
}

async fn db_op(app: &TestApp, id: &str) -> (String, i32, i32, Option<String>) {
    sqlx::query_as(
        "SELECT state, attempt, dispatches, error->>'code' FROM operations WHERE id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_quiet_operation_is_dispatched_again_only_once_its_message_is_gone() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap();
    app.wait_op(id, |o| o["state"] == "dispatched").await;
    age(&app).await;
    let r = reconciler(&app).await;
    assert_eq!(
        r.pass().await.unwrap(),
        Repairs::default(),
        "its message waits in the stream: JetStream still owns it"
    );

    lose_messages(&app).await;
    assert_eq!(r.pass().await.unwrap().redispatched, 1);
    wait_dispatched(&app, id, 2).await;
    // The message as the stream has it (the outbox row may be gone already: the relay
    // runs, and deletes it once published).
    let seq: i64 = sqlx::query_scalar("SELECT stream_seq FROM operations WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let message = ops_stream(&app)
        .await
        .get_raw_message(seq as u64)
        .await
        .unwrap();
    assert_eq!(
        message.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some(format!("{id}.2").as_str()),
        "a new message ID: not deduplicated"
    );

    // A worker started it, then its message was lost: dispatched again, with attempts
    // counted afresh, since the new message's deliveries count from 1.
    let key = gateway::app::worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let a = app
        .request(
            Method::POST,
            &format!("/v1/operations/{id}/reports"),
            Some(&key),
            Some(&json!({"attempt": 1, "state": "running"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    lose_messages(&app).await;
    age(&app).await;
    assert_eq!(r.pass().await.unwrap().redispatched, 1);
    wait_dispatched(&app, id, 3).await;
    let (_, attempt, dispatches, _) = db_op(&app, id).await;
    assert_eq!((attempt, dispatches), (0, 3));

    // A worker finishes it from the third message.
    let driver = SimDriver::new(common::fast_sim());
    let stop = tokio_util::sync::CancellationToken::new();
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let pool = tokio::spawn(workers::run_pool(
        js,
        app.pool_config(Service::named("vm"), key),
        driver.clone(),
        stop.clone(),
    ));
    let done = app.wait_done(id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert_eq!(driver.executions(id.parse().unwrap()), 1);
    stop.cancel();
    pool.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_operation_whose_messages_keep_getting_lost_fails_with_delivery_exhausted() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap();
    // A delete queued behind it is started when it ends.
    let path = common::vm_path(&tenant, &op);
    let del = app.delete(&path).await;
    assert_eq!(del.body["state"], "queued");
    let r = reconciler(&app).await;
    for round in 1..gateway::reconciler::MAX_DISPATCHES {
        wait_dispatched(&app, id, round).await;
        lose_messages(&app).await;
        age(&app).await;
        assert_eq!(r.pass().await.unwrap().redispatched, 1);
    }
    wait_dispatched(&app, id, gateway::reconciler::MAX_DISPATCHES).await;
    lose_messages(&app).await;
    age(&app).await;
    assert_eq!(r.pass().await.unwrap().exhausted, 1);
    let (state, _, dispatches, code) = db_op(&app, id).await;
    assert_eq!(
        (state.as_str(), dispatches, code.as_deref()),
        ("failed", 3, Some("delivery_exhausted"))
    );
    let d = app
        .wait_op(del.body["id"].as_str().unwrap(), |o| o["state"] != "queued")
        .await;
    assert!(
        ["pending", "dispatched"].contains(&d["state"].as_str().unwrap()),
        "{d}"
    );
}

#[tokio::test]
async fn a_message_a_worker_terminates_without_a_report_fails_its_operation() {
    // The dead-letter handler runs with the reconciler; no workers: this test plays a
    // worker that gives up on a message without reporting (say its key was revoked).
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            workers: None,
            webhooks: false,
        },
        ..Default::default()
    })
    .await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap();
    let path = common::vm_path(&tenant, &op);
    let del = app.delete(&path).await;
    assert_eq!(del.body["state"], "queued");
    app.wait_op(id, |o| o["state"] == "dispatched").await;

    let consumer: PullConsumer = ops_stream(&app)
        .await
        .get_consumer(&gateway_proto::consumer_name(
            &Service::named("vm"),
            "zone-a",
        ))
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    msg.ack_with(AckKind::Term).await.unwrap();

    let done = app.wait_done(id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "delivery_exhausted", "{done}");
    assert_eq!(
        app.get(&path).await.body["phase"],
        "deleting",
        "the delete started"
    );
    let d = app
        .wait_op(del.body["id"].as_str().unwrap(), |o| {
            o["state"] == "dispatched"
        })
        .await;
    assert_eq!(d["action"], "delete");
}

#[tokio::test]
async fn a_cancelled_update_is_converged_by_the_reconciler_and_a_failed_one_is_not() {
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            // `slow-` names take 3 × 300 ms.
            workers: Some(SimConfig {
                max_latency: Duration::from_millis(300),
                ..common::fast_sim()
            }),
            webhooks: false,
        },
        ..Default::default()
    })
    .await;
    let tenant = app.tenant().await;
    let create = app
        .create(&tenant, "vms", "slow-web", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(create["id"].as_str().unwrap()).await;
    let path = common::vm_path(&tenant, &create);
    let patch = |flavor: &str| {
        let body = json!({"spec": {"flavor": flavor}});
        let (app, path) = (&app, path.clone());
        async move {
            app.request(Method::PATCH, &path, Some(&app.admin_key), Some(&body))
                .await
        }
    };
    let first = patch("m1.large").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    let second = patch("m1.xlarge").await;
    assert_eq!(second.body["state"], "queued", "{:?}", second.body);
    let cancel = app
        .post(
            &format!(
                "/v1/operations/{}/cancel",
                second.body["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(cancel.body["state"], "cancelled", "{:?}", cancel.body);
    app.wait_done(first.body["id"].as_str().unwrap()).await;

    // The desired spec says m1.xlarge (generation 3); the first update applied
    // generation 2. The reconciler converges the resource on its spec.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = app.get(&path).await.body;
        if r["observed_generation"] == 3 && r["phase"] == "ready" {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r["generation"], 3);
    assert_eq!(r["status"]["flavor"], "m1.xlarge", "{r}");
    let system: Vec<(String, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT action, state, requested_by FROM operations WHERE request_id LIKE 'reconciler-%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        system,
        vec![("update".to_string(), "succeeded".to_string(), None)]
    );

    // A failed attempt at the current generation is not retried by itself.
    let failed = app
        .create(&tenant, "vms", "fail-web", "zone-a", example_spec("vms"))
        .await;
    let done = app.wait_done(failed["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(reconciler(&app).await.pass().await.unwrap().converged, 0);
    let ops: i64 = sqlx::query_scalar("SELECT count(*) FROM operations WHERE resource_id = $1")
        .bind(
            failed["resource_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap(),
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(ops, 1);
}

#[tokio::test]
async fn reapplying_the_definitions_is_idempotent_and_updates_changed_settings() {
    let app = spawn_with(Options::api_only()).await;
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let names = app.config.nats.clone();
    let zones = vec!["zone-a".to_string(), "zone-b".to_string()];
    let consumer = gateway_proto::consumer_name(&Service::named("bm"), "zone-b");
    let settings = || {
        let (js, names, consumer) = (js.clone(), names.clone(), consumer.clone());
        async move {
            let mut stream = js.get_stream(&names.stream).await.unwrap();
            let c = stream
                .consumer_info(&consumer)
                .await
                .unwrap()
                .config
                .clone();
            let max_bytes = stream.info().await.unwrap().config.max_bytes;
            (
                c.max_deliver,
                c.ack_wait,
                c.backoff,
                c.max_ack_pending,
                max_bytes,
            )
        }
    };
    let shipped = settings().await;
    assert_eq!(shipped.0, 5);
    assert_eq!(shipped.2.first(), Some(&Duration::from_secs(30)));

    let mut changed = gateway::jetstream::Definitions::shipped().unwrap();
    changed.pool_consumer.max_deliver = 7;
    changed.pool_consumer.ack_wait_seconds = 45;
    changed.pool_consumer.backoff_seconds = vec![];
    changed.pool_consumer.max_ack_pending = 64;
    changed.ops_stream.max_bytes = 512 * 1024 * 1024;
    for _ in 0..2 {
        gateway::jetstream::apply_definitions(
            &js,
            &names,
            &zones,
            &crate::common::builtin_services(),
            &changed,
        )
        .await
        .unwrap();
        assert_eq!(
            settings().await,
            (7, Duration::from_secs(45), vec![], 64, 512 * 1024 * 1024)
        );
    }
    gateway::jetstream::apply(&js, &names, &zones, &crate::common::builtin_services())
        .await
        .unwrap();
    assert_eq!(settings().await, shipped, "the shipped settings again");
    let advisories = js
        .get_stream(gateway::jetstream::advisory_stream_name(&names))
        .await
        .unwrap();
    let info: Value = serde_json::to_value(
        advisories
            .consumer_info("gateway-dead-letters")
            .await
            .unwrap()
            .config
            .max_deliver,
    )
    .unwrap();
    assert_eq!(info, json!(-1));
}

#[tokio::test]
async fn the_sweeper_pages_through_quiet_operations_so_none_is_starved() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let op = app
            .create(
                &tenant,
                "vms",
                &format!("web-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        let id = op["id"].as_str().unwrap().to_owned();
        app.wait_op(&id, |o| o["state"] == "dispatched").await;
        ids.push(id.parse::<Uuid>().unwrap());
    }
    age(&app).await;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = gateway::store::operations::quiet_active(&app.pool, 60.0, after, 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.updated_at, last.id));
        seen.extend(page.iter().map(|q| q.id));
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every quiet operation once");
}
