//! The outbox invariant and the relay, against real PostgreSQL and NATS.

use crate::common;
use crate::common::{example_spec, spawn_with, Options};
use futures::StreamExt;
use gateway::relay::{Relay, Wake};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

pub fn relay_for(app: &common::TestApp) -> Relay {
    let running = app.running.as_ref().unwrap();
    Relay {
        pool: app.pool.clone(),
        js: running.backends.js.clone(),
        batch_size: 100,
        concurrent_passes: 1,
        poll_interval: Duration::from_millis(100),
        wake: Wake::default(),
        changes: Default::default(),
        metrics: Default::default(),
        signer: app.config.dispatch_signing_key.clone().unwrap(),
        events_prefix: app.config.nats.events_prefix.clone(),
    }
}

/// A VM `name` created in a new tenant: its `create` operation and its resource's ID.
async fn a_vm(app: &common::TestApp, name: &str) -> (serde_json::Value, uuid::Uuid) {
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", name, "zone-a", example_spec("vms"))
        .await;
    let resource = op["resource_id"].as_str().unwrap().parse().unwrap();
    (op, resource)
}

#[tokio::test]
async fn resource_operation_and_outbox_row_commit_together_or_not_at_all() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    // Make the outbox insert fail, as if the database died at that statement.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected outbox failure'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let body = json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")});
    let a = app
        .post(&format!("/v1/tenants/{tenant}/vms"), body.clone())
        .await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", a.body);
    assert_eq!(a.code(), "internal");
    assert!(
        !a.body["message"].as_str().unwrap().contains("injected"),
        "5xx bodies say nothing internal"
    );
    for table in ["resources", "operations", "outbox"] {
        assert_eq!(app.count(table).await, 0, "{table}: nothing half-written");
    }
    sqlx::raw_sql("DROP TRIGGER refuse ON outbox")
        .execute(&app.pool)
        .await
        .unwrap();
    let a = app.post(&format!("/v1/tenants/{tenant}/vms"), body).await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "the name is free: the failed attempt left nothing"
    );
    for table in ["resources", "operations", "outbox"] {
        assert_eq!(app.count(table).await, 1, "{table}");
    }
    let row: (String, String) = sqlx::query_as("SELECT subject, msg_id FROM outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        row.0,
        format!("{}.vm.zone-a", app.config.nats.subject_prefix)
    );
    assert_eq!(row.1, format!("{}.1", a.body["id"].as_str().unwrap()));
}

#[tokio::test]
async fn the_relay_publishes_deletes_and_marks_operations_dispatched() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let op = app
            .create(
                &tenant,
                "volumes",
                &format!("v{i}"),
                "zone-b",
                example_spec("volumes"),
            )
            .await;
        assert_eq!(op["state"], "pending");
        ids.push(op["id"].as_str().unwrap().to_owned());
    }
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (5, 5));
    assert_eq!(app.count("outbox").await, 0);
    for id in &ids {
        assert_eq!(
            app.get(&format!("/v1/operations/{id}")).await.body["state"],
            "dispatched"
        );
    }
    let js = &app.running.as_ref().unwrap().backends.js;
    let mut stream = js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
    // The message a worker gets carries everything it needs.
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&gateway_proto::consumer_name(
            &gateway_proto::Service::named("storage"),
            "zone-b",
        ))
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    let dispatch: gateway_proto::Dispatch = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(dispatch.tenant, tenant);
    assert_eq!(dispatch.spec["size_gb"], 20);
    assert_eq!(dispatch.generation, 1);
    let headers = msg.headers.as_ref().unwrap();
    assert_eq!(
        headers.get("Nats-Msg-Id").unwrap().as_str(),
        format!("{}.1", dispatch.operation_id)
    );
    assert!(headers.get("X-Request-Id").is_some());
}

#[tokio::test]
async fn a_row_published_twice_is_delivered_once() {
    // A relay that dies after publishing but before deleting leaves the row behind; the
    // next pass publishes it again under the same Nats-Msg-Id.
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let (subject, msg_id, payload): (String, String, serde_json::Value) =
        sqlx::query_as("SELECT subject, msg_id, payload FROM outbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id.as_str());
    js.publish_with_headers(
        subject,
        headers,
        serde_json::to_vec(&payload).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!(
        (pass.claimed, pass.published),
        (1, 1),
        "a duplicate ack counts as published"
    );
    assert_eq!(app.count("outbox").await, 0);
    let mut stream = js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn rows_stay_in_the_outbox_while_jetstream_refuses_them() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let js = app.running.as_ref().unwrap().backends.js.clone();
    js.delete_stream(&app.config.nats.stream).await.unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (1, 0));
    assert_eq!(app.count("outbox").await, 1, "nothing is lost");
    let op_state: String = sqlx::query_scalar("SELECT state FROM operations")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(op_state, "pending");
    // Once the stream is back, the same row goes out.
    let zones = vec!["zone-a".to_string(), "zone-b".to_string()];
    gateway::jetstream::apply(
        &js,
        &app.config.nats,
        &zones,
        &crate::common::builtin_services(),
    )
    .await
    .unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (1, 1));
    assert_eq!(app.count("outbox").await, 0);
}

/// A pass in which some publishes fail: the published rows leave the outbox and their
/// operations are `dispatched`; the others stay exactly as they were (ID, message ID,
/// time), and their operations stay `pending` until a later pass publishes them.
#[tokio::test]
async fn rows_jetstream_refused_stay_unchanged_beside_those_it_took() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    for name in ["a", "b"] {
        app.create(&tenant, "vms", name, "zone-a", example_spec("vms"))
            .await;
    }
    // The third op's message goes to a subject no stream takes.
    let stray = app
        .create(&tenant, "vms", "c", "zone-a", example_spec("vms"))
        .await;
    let stray_op = stray["id"].as_str().unwrap();
    sqlx::query("UPDATE outbox SET subject = 'nowhere.' || subject WHERE operation_id = $1::uuid")
        .bind(stray_op)
        .execute(&app.pool)
        .await
        .unwrap();
    let before: (i64, String, String, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT id, msg_id, subject, created_at FROM outbox WHERE operation_id = $1::uuid",
    )
    .bind(stray_op)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (3, 2));
    let after: (i64, String, String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT id, msg_id, subject, created_at FROM outbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        after, before,
        "the refused row is there as it was, and alone"
    );
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, state FROM operations ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    for (id, state) in &states {
        let expected = if id == stray_op {
            "pending"
        } else {
            "dispatched"
        };
        assert_eq!(state, expected, "{id}");
    }
    // Its subject fixed, the next pass publishes it.
    sqlx::query("UPDATE outbox SET subject = substr(subject, 9)")
        .execute(&app.pool)
        .await
        .unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published), (1, 1));
    assert_eq!(app.count("outbox").await, 0);
}

/// The interleaving that once deadlocked: a report locks its resource row, while the
/// relay updates the operation row a second time in its transaction (which makes
/// PostgreSQL re-check the operation's foreign key against that resource row). Resource
/// locks are `FOR NO KEY UPDATE`, which the foreign-key check does not wait for.
#[tokio::test]
async fn a_locked_resource_never_blocks_the_relay_marking_its_operation_dispatched() {
    use gateway::store::{operations, outbox, resources};
    let app = spawn_with(Options::api_only()).await;
    let (op, resource_id) = a_vm(&app, "web").await;
    let op_id: uuid::Uuid = op["id"].as_str().unwrap().parse().unwrap();
    let row_id: i64 = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    let mut relay = app.pool.begin().await.unwrap();
    let mut report = app.pool.begin().await.unwrap();
    resources::lock(&mut report, resource_id).await.unwrap();
    // Recording the row (one statement: the resource's lock without waiting, the
    // row's delete, the operation marked dispatched) must not wait for the resource's
    // lock: it answers the operation as held, and leaves both rows as they were.
    let acked = outbox::Acked {
        id: row_id,
        operation: Some(op_id),
        dispatch: Some(1),
        seq: 1,
        kept: false,
    };
    let marked = tokio::time::timeout(
        Duration::from_secs(3),
        outbox::record_published(&mut relay, &[acked]),
    )
    .await;
    let held =
        marked.expect("the relay waited for the report's resource lock: a deadlock in the making");
    assert_eq!(held.unwrap(), [op_id]);
    relay.commit().await.unwrap();
    let kept: Option<i64> = sqlx::query_scalar("SELECT published_seq FROM outbox WHERE id = $1")
        .bind(row_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, Some(1), "the row stays, with the sequence it got");
    assert!(operations::lock_with_resource(&mut report, op_id)
        .await
        .unwrap()
        .is_some());
    report.commit().await.unwrap();
}

/// A pass never waits for a resource another transaction holds (a request or a report
/// in flight): it records the rows it can, and leaves the other in the outbox with the
/// sequence JetStream gave it, its operation untouched; a later pass, once the resource
/// is free, records it without publishing it again (past the stream's 15-minute
/// duplicate window, a second publish would be a second message).
#[tokio::test]
async fn a_row_whose_resource_is_in_use_waits_for_a_later_pass_and_holds_up_no_other() {
    use gateway::store::resources;
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let busy = app
        .create(&tenant, "vms", "busy", "zone-a", example_spec("vms"))
        .await;
    app.create(&tenant, "vms", "free", "zone-a", example_spec("vms"))
        .await;
    let busy_op = busy["id"].as_str().unwrap();
    let resource_id: uuid::Uuid = busy["resource_id"].as_str().unwrap().parse().unwrap();
    let mut holder = app.pool.begin().await.unwrap();
    resources::lock(&mut holder, resource_id).await.unwrap();

    let mut registry = prometheus_client::registry::Registry::default();
    let relay = Relay {
        metrics: gateway::metrics::Metrics::register(&mut registry),
        ..relay_for(&app)
    };
    let lags = || {
        let text = gateway::metrics::render(&registry);
        text.lines()
            .find_map(|l| l.strip_prefix("gateway_relay_lag_seconds_count "))
            .map(|v| v.trim().parse::<u64>().unwrap())
    };
    let pass = tokio::time::timeout(Duration::from_secs(5), relay.pass())
        .await
        .expect("the relay waited for a resource lock")
        .unwrap();
    assert_eq!((pass.claimed, pass.published, pass.busy), (2, 1, 1));
    let left: Vec<String> = sqlx::query_scalar("SELECT operation_id::text FROM outbox")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, [busy_op], "only the busy resource's row is left");
    let state = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT state, stream_seq FROM operations WHERE id = $1::uuid",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(state(busy_op.into()).await, ("pending".into(), None));
    assert_eq!(relay.metrics.relay_busy_rows.get(), 1);
    // Both messages are in the stream: both lags are counted, at their acks.
    assert_eq!(lags(), Some(2));
    // A publish of it now would fail: only a record without one can succeed.
    let kept: Option<i64> = sqlx::query_scalar(
        "UPDATE outbox SET subject = 'nowhere.' || subject RETURNING published_seq",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        kept.is_some(),
        "the row keeps the sequence JetStream gave it"
    );

    holder.commit().await.unwrap();
    let pass = relay.pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published, pass.busy), (1, 1, 0));
    assert_eq!(app.count("outbox").await, 0);
    assert_eq!(
        lags(),
        Some(2),
        "a message's lag is counted once, at its ack, not again when it is recorded"
    );
    let (recorded, seq) = state(busy_op.into()).await;
    assert_eq!(recorded, "dispatched");
    let js = &app.running.as_ref().unwrap().backends.js;
    let mut stream = js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    assert_eq!(seq, kept, "the sequence recorded is the one kept");
    let stored = stream.get_raw_message(seq.unwrap() as u64).await.unwrap();
    assert_eq!(
        stored.headers.get("Nats-Msg-Id").unwrap().as_str(),
        format!("{busy_op}.1")
    );
}

/// A row naming no operation (written by hand, or by an older tool) has no resource to
/// wait for: it is published and deleted like any other, not left behind forever.
#[tokio::test]
async fn a_row_naming_no_operation_is_published_not_held_back() {
    let app = spawn_with(Options::api_only()).await;
    let subject = format!("{}.vm.zone-a", app.config.nats.subject_prefix);
    sqlx::query(
        "INSERT INTO outbox (operation_id, subject, msg_id, payload)
         VALUES (gen_random_uuid(), $1, 'orphan', '{}')",
    )
    .bind(&subject)
    .execute(&app.pool)
    .await
    .unwrap();
    let pass = relay_for(&app).pass().await.unwrap();
    assert_eq!((pass.claimed, pass.published, pass.busy), (1, 1, 0));
    assert_eq!(app.count("outbox").await, 0);
}

/// The relay's loop comes back by itself for a row it left behind a lock: nothing
/// rings when a lock is let go.
#[tokio::test]
async fn the_relay_loop_comes_back_for_a_row_it_left_behind_a_lock() {
    use gateway::store::resources;
    let app = spawn_with(Options::api_only()).await;
    let (_, resource_id) = a_vm(&app, "web").await;
    let mut holder = app.pool.begin().await.unwrap();
    resources::lock(&mut holder, resource_id).await.unwrap();
    let relay = Relay {
        // Far longer than the test waits: only the retry of a busy row can record it.
        poll_interval: Duration::from_secs(600),
        ..relay_for(&app)
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.count("outbox").await,
        1,
        "held back while the lock is held"
    );
    holder.commit().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.count("outbox").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the row was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await.unwrap();
}

/// While JetStream takes its time to acknowledge, the relay holds no resource's lock: a
/// request on a resource whose dispatch is being published (a cancellation, a change)
/// does not wait for the acks.
#[tokio::test]
async fn a_request_on_a_resource_being_published_does_not_wait_for_jetstream() {
    let app = spawn_with(Options::api_only()).await;
    let (_, resource_id) = a_vm(&app, "web").await;
    // A subject no stream takes but a silent subscriber does: the publish waits for an
    // ack that never comes, until the JetStream context's timeout.
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let silent = format!("slow-{}", common::unique());
    let _sub = js.client().subscribe(format!("{silent}.>")).await.unwrap();
    sqlx::query("UPDATE outbox SET subject = $1 || '.' || subject")
        .bind(&silent)
        .execute(&app.pool)
        .await
        .unwrap();
    let relay = relay_for(&app);
    let pass = tokio::spawn(async move { relay.pass().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pass.is_finished(),
        "the publish is still waiting for its ack"
    );
    let mut other = app.pool.begin().await.unwrap();
    let locked = tokio::time::timeout(
        Duration::from_secs(2),
        gateway::store::resources::lock(&mut other, resource_id),
    )
    .await;
    assert!(
        locked.is_ok(),
        "the relay held the resource while it waited"
    );
    other.commit().await.unwrap();
    let pass = pass.await.unwrap();
    assert_eq!((pass.claimed, pass.published), (1, 0), "the ack never came");
    assert_eq!(app.count("outbox").await, 1, "nothing is lost");
}

/// An outbox row is stamped when it is written, not when its transaction began, so the
/// relay's lag (`gateway_relay_lag_seconds`) does not count the time a group commit's
/// transaction spent before its last create joined it.
#[tokio::test]
async fn an_outbox_row_is_stamped_when_written_not_when_its_transaction_began() {
    let app = spawn_with(Options::api_only()).await;
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_sleep(0.3)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let late: f64 = sqlx::query_scalar(
        "INSERT INTO outbox (subject, msg_id, payload) VALUES ('x', 'stamp', '{}')
         RETURNING EXTRACT(EPOCH FROM created_at - now())::float8",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(late >= 0.25, "stamped {late} s after the transaction began");
}

#[tokio::test]
async fn concurrent_passes_publish_every_row_exactly_once() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..90 {
        let zone = if i % 2 == 0 { "zone-a" } else { "zone-b" };
        let op = app
            .create(
                &tenant,
                "vms",
                &format!("vm-{i}"),
                zone,
                example_spec("vms"),
            )
            .await;
        ids.insert(op["id"].as_str().unwrap().to_owned());
    }
    let relay = Relay {
        batch_size: 8,
        concurrent_passes: 4,
        ..relay_for(&app)
    };
    let mut published = 0;
    for _ in 0..20 {
        let pass = relay.passes().await.unwrap();
        assert_eq!(pass.claimed, pass.published);
        assert!(pass.claimed <= 32, "each pass claims at most its batch");
        published += pass.published;
        if pass.claimed == 0 {
            break;
        }
    }
    assert_eq!(published, 90, "no row twice, none left out");
    assert_eq!(app.count("outbox").await, 0);
    let dispatched: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT id::text, stream_seq FROM operations WHERE state = 'dispatched'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(dispatched.len(), 90);
    assert!(dispatched
        .iter()
        .all(|(id, seq)| ids.contains(id) && seq.is_some()));
    let js = &app.running.as_ref().unwrap().backends.js;
    let mut stream = js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 90);
}

/// A backlog of several batches, rung once, is drained by the running relay though only
/// its leading loop hears the doorbell (a full batch recruits the helper loops; which
/// loops took which batch is not visible here), and no row is published twice or left
/// behind. The relay polls only once a minute here: no poll drains it.
#[tokio::test]
async fn a_backlog_rung_once_is_drained_by_the_leader_and_its_helpers() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    // A doorbell of its own: the creates below do not ring it.
    let wake = Wake::default();
    let relay = Relay {
        batch_size: 8,
        concurrent_passes: 4,
        poll_interval: Duration::from_secs(60),
        wake: wake.clone(),
        ..relay_for(&app)
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    // Every loop's first pass (at start) finds nothing; then they wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.create_vms(&tenant, 90).await;
    wake.ring_here(&[gateway::relay::Bell::Dispatches]);
    common::eventually("the backlog is relayed", || async {
        (app.count("outbox").await == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    running.await.unwrap();
    let dispatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE state = 'dispatched'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(dispatched, 90);
    let js = &app.running.as_ref().unwrap().backends.js;
    let mut stream = js.get_stream(&app.config.nats.stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 90);
}

/// Operations and events are relayed by loops of their own: while every events pass
/// fails (the events stream is gone, and the events loop backs off towards 5 s), a new
/// operation is still dispatched as soon as it commits.
#[tokio::test]
async fn a_failing_events_stream_does_not_delay_dispatch() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let js = app.running.as_ref().unwrap().backends.js.clone();
    js.delete_stream(app.config.nats.events_stream())
        .await
        .unwrap();
    let first = app
        .create(&tenant, "vms", "first", "zone-a", example_spec("vms"))
        .await;
    app.wait_op(first["id"].as_str().unwrap(), |op| {
        op["state"] == "dispatched"
    })
    .await;
    // Long enough for the events loop's backoff to pass 3 s between tries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = app
        .create(&tenant, "vms", "second", "zone-a", example_spec("vms"))
        .await;
    let started = tokio::time::Instant::now();
    app.wait_op(second["id"].as_str().unwrap(), |op| {
        op["state"] == "dispatched"
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "dispatch waited {:?} behind the failing events passes",
        started.elapsed()
    );
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(waiting > 0, "the events wait in their outbox, none lost");
}

/// A worker can report before the relay has recorded the dispatch (it receives the
/// message as soon as JetStream has it). Its report shows the dispatch: the operation
/// goes `pending` → `dispatched` → `running`, and the relay's late record then only
/// adds the stream sequence.
#[tokio::test]
async fn a_report_that_overtakes_the_relays_record_still_shows_the_dispatch() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap().to_owned();
    let report = app
        .report_as_vm_worker(&id, json!({"attempt": 1, "state": "running"}))
        .await;
    assert_eq!(report.status, StatusCode::OK, "{:?}", report.body);
    assert_eq!(relay_for(&app).pass().await.unwrap().published, 1);
    let (state, seq): (String, Option<i64>) =
        sqlx::query_as("SELECT state, stream_seq FROM operations WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(state, "running");
    assert!(
        seq.is_some(),
        "the relay still records where JetStream stored it"
    );
    let events = app.operation_events(&id).await;
    assert_eq!(
        events,
        [
            "operation.created",
            "operation.pending",
            "operation.dispatched",
            "operation.running"
        ]
    );
}

/// An app with its relay (four operations loops) polling once a minute, so only a ring
/// wakes a pass in time, settled after its first passes; and a tenant.
async fn relay_that_polls_once_a_minute() -> (common::TestApp, String) {
    let app = spawn_with(Options {
        tweak: |c| {
            c.relay_poll_interval = Duration::from_secs(60);
            c.relay_concurrent_passes = 4;
        },
        ..Options::api_and_relay()
    })
    .await;
    let tenant = app.tenant().await;
    app.wait_outbox_empty().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (app, tenant)
}

/// Creates VM `name` and checks that it is dispatched within 5 s: with the relay of
/// [`relay_that_polls_once_a_minute`], by a ring, not a poll.
async fn dispatched_in_time(app: &common::TestApp, tenant: &str, name: &str) {
    let op = app
        .create(tenant, "vms", name, "zone-a", example_spec("vms"))
        .await;
    let started = tokio::time::Instant::now();
    app.wait_op(op["id"].as_str().unwrap(), |op| op["state"] == "dispatched")
        .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{name}: {took:?}, not rung");
}

/// A commit wakes one of the relay's operations loops, not all of them, and not again
/// through its own ring on NATS (before, each commit cost every loop an empty pass, and
/// then each again for the NATS echo). The relay's record of a dispatch rings its
/// events loop: the dispatch's event goes out without waiting for the next commit.
#[tokio::test]
async fn a_commit_wakes_one_relay_pass_and_a_dispatch_rings_the_events_loop() {
    // The relay polls only once a minute here: every pass below was rung.
    let (app, tenant) = relay_that_polls_once_a_minute().await;
    let empty = || common::metric(&app.url, "gateway_relay_empty_passes_total");
    let before = empty().await;
    for i in 0..20 {
        dispatched_in_time(&app, &tenant, &format!("vm-{i}")).await;
    }
    let wasted = empty().await - before;
    assert!(
        wasted <= 5.0,
        "{wasted} empty relay passes for 20 commits: a ring woke more than one loop"
    );
    common::eventually("the last dispatch's event is published", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
}

/// A commit in one process rings the relay in another, over NATS.
#[tokio::test]
async fn a_commit_in_one_process_rings_the_relay_in_another() {
    let d = common::Deployment::new(
        &common::pg_base(),
        &common::nats_url(),
        &[("RELAY_POLL_INTERVAL_MS", "60000")],
    )
    .await;
    let api = common::Gateway::serve(&d.env).await;
    let client = d.client(&api.url());
    let _relay = common::Gateway::relay(&d.env);
    let tenant = d.tenant(&api.url()).await;
    // The relay's first passes (at start) and its subscription to the doorbell.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        let op = client
            .create(
                &tenant,
                "vms",
                &format!("vm-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        let id = common::id_of(&op);
        let started = tokio::time::Instant::now();
        common::eventually("the relay dispatches it", || async {
            let (state, _, _) = d.operation(id).await;
            (state == "dispatched").then_some(())
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "rung across processes, not polled: {:?}",
            started.elapsed()
        );
    }
}

/// A leading relay pass held up after its claim (its acks slow to come, say) does not
/// hold up the operations committed meanwhile: after `relay::HELD_UP` (100 ms) the
/// rings it hears go to the helper loops, which claim the new rows past its locked ones
/// and dispatch them. The relay polls once a minute here, so only a ring passed on is in
/// time.
#[tokio::test]
async fn a_held_up_relay_pass_does_not_hold_up_the_operations_committed_meanwhile() {
    let (app, tenant) = relay_that_polls_once_a_minute().await;
    let (got_there, go_on) = app.pause(gateway::pause::Point::RelayPassClaimed);
    let first = app
        .create(&tenant, "vms", "held", "zone-a", example_spec("vms"))
        .await;
    got_there.await.unwrap();
    // The leader holds the first row, claimed and not published.
    for i in 0..3 {
        dispatched_in_time(&app, &tenant, &format!("after-{i}")).await;
    }
    let held = app
        .get(&format!("/v1/operations/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(held.body["state"], "pending", "{:?}", held.body);
    go_on.send(()).unwrap();
    app.wait_op(first["id"].as_str().unwrap(), |op| {
        op["state"] == "dispatched"
    })
    .await;
}
