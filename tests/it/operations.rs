//! The operations API clients can trust: idempotency, per-resource ordering, ETags,
//! actions, long-polls, cancellation, filters and deadlines.

use crate::common;
use crate::common::{example_spec, spawn_app, spawn_with, Options, TestApp};
use gateway::app::{worker_key, Parts};
use gateway::domain::Service;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn post_with_key(app: &TestApp, path: &str, key: &str, body: &Value) -> common::Answer {
    let res = app
        .http
        .post(format!("{}{path}", app.url))
        .bearer_auth(&app.admin_key)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    common::Answer::read(res).await
}

/// A new tenant of `app`, the create of a VM in it (left `pending`: no relay runs), and
/// the `vm`/`zone-a` worker key to report on it.
async fn pending_vm(app: &TestApp) -> (String, String, String) {
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    (tenant, id(&op).to_owned(), key)
}

/// A report on, and a cancellation of, an operation that does not exist: `404
/// not_found`, and nothing is written (no operation, no outbox row, no event).
#[tokio::test]
async fn reports_and_cancellations_of_unknown_operations_are_not_found() {
    let app = spawn_with(Options::api_only()).await;
    let (_tenant, _op, key) = pending_vm(&app).await;
    let before = (
        app.count("operations").await,
        app.count("outbox").await,
        app.count("event_outbox").await,
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    let a = report(
        &app,
        &key,
        &unknown,
        json!({"attempt": 1, "state": "running"}),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{:?}", a.body);
    assert_eq!(a.body["code"], "not_found");
    let a = cancel(&app, &unknown).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{:?}", a.body);
    assert_eq!(a.body["code"], "not_found");
    let after = (
        app.count("operations").await,
        app.count("outbox").await,
        app.count("event_outbox").await,
    );
    assert_eq!(after, before);
}

async fn report(app: &TestApp, key: &str, op: &str, body: Value) -> common::Answer {
    app.request(
        Method::POST,
        &format!("/v1/operations/{op}/reports"),
        Some(key),
        Some(&body),
    )
    .await
}

/// `POST /v1/operations/{op}/cancel`, as an admin.
async fn cancel(app: &TestApp, op: &str) -> common::Answer {
    app.request(
        Method::POST,
        &format!("/v1/operations/{op}/cancel"),
        Some(&app.admin_key),
        None,
    )
    .await
}

async fn act(
    app: &TestApp,
    tenant: &str,
    kind: &str,
    res: String,
    action: &str,
    body: Value,
) -> common::Answer {
    let path = format!("/v1/tenants/{tenant}/{kind}/{res}/actions/{action}");
    app.request(Method::POST, &path, Some(&app.admin_key), Some(&body))
        .await
}

async fn run(
    app: &TestApp,
    tenant: &str,
    kind: &str,
    res: String,
    action: &str,
    body: Value,
) -> Value {
    let a = act(app, tenant, kind, res, action, body).await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "{kind} {action}: {:?}",
        a.body
    );
    assert_eq!(a.body["action"], action);
    let done = app.wait_done(id(&a.body)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    done
}

fn id(v: &Value) -> &str {
    v["id"].as_str().unwrap()
}

#[tokio::test]
async fn the_same_idempotency_key_and_request_return_the_same_operation() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/vms");
    let body = json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")});
    let first = post_with_key(&app, &path, "create-web-1", &body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    // The client lost the answer and retries: same operation, nothing new written.
    let again = post_with_key(&app, &path, "create-web-1", &body).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(id(&again.body), id(&first.body));
    assert_eq!(app.count("resources").await, 1);
    assert_eq!(app.count("operations").await, 1);
    // The same key with another request is refused.
    let other = json!({"name": "web-2", "zone": "zone-a", "spec": example_spec("vms")});
    let reused = post_with_key(&app, &path, "create-web-1", &other).await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );
    assert_eq!(app.count("resources").await, 1);
    let bad = post_with_key(&app, &path, "", &other).await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_idempotency_key")
    );
}

#[tokio::test]
async fn concurrent_posts_with_one_key_create_exactly_one_resource() {
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/clusters");
    let body = json!({"name": "k", "zone": "zone-b", "spec": example_spec("clusters")});
    let answers =
        futures::future::join_all((0..8).map(|_| post_with_key(&app, &path, "one-cluster", &body)))
            .await;
    let ids: HashSet<&str> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
            id(&a.body)
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("resources").await, 1);
    assert_eq!(app.count("operations").await, 1);
}

#[tokio::test]
async fn a_retry_after_completion_returns_the_finished_operation() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/volumes");
    let body = json!({"name": "data", "zone": "zone-a", "spec": example_spec("volumes")});
    let first = post_with_key(&app, &path, "vol-data", &body).await;
    app.wait_done(id(&first.body)).await;
    let again = post_with_key(&app, &path, "vol-data", &body).await;
    assert_eq!(id(&again.body), id(&first.body));
    assert_eq!(again.body["state"], "succeeded");
    assert_eq!(app.count("resources").await, 1);
}

#[tokio::test]
async fn queued_updates_run_one_at_a_time_in_order_and_the_last_one_wins() {
    // A `slow-` resource takes 3 × 300–400 ms per operation: long enough for the
    // updates below to arrive while its create still runs, even on a loaded machine.
    let mut sim = common::fast_sim();
    sim.min_latency = Duration::from_millis(300);
    sim.max_latency = Duration::from_millis(400);
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            workers: Some(sim),
            webhooks: false,
        },
        ..Default::default()
    })
    .await;
    let tenant = app.tenant().await;
    let create = app
        .create(&tenant, "vms", "slow-web", "zone-a", example_spec("vms"))
        .await;
    let path = common::vm_path(&tenant, &create);
    let mut ops = vec![create.clone()];
    for flavor in ["m1.medium", "m1.large", "m1.xlarge"] {
        let a = app
            .request(
                Method::PATCH,
                &path,
                Some(&app.admin_key),
                Some(&json!({"spec": {"flavor": flavor}})),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
        assert_eq!(a.body["action"], "update");
        assert_eq!(a.body["state"], "queued", "the create is still running");
        ops.push(a.body);
    }
    let mut done = Vec::new();
    for op in &ops {
        done.push(app.wait_done(id(op)).await);
    }
    for pair in done.windows(2) {
        assert_eq!(pair[1]["state"], "succeeded");
        assert!(
            pair[1]["started_at"].as_str() >= pair[0]["finished_at"].as_str(),
            "ran in order: {pair:?}"
        );
    }
    let vm = app.get(&path).await;
    assert_eq!(vm.body["spec"]["flavor"], "m1.xlarge");
    assert_eq!(vm.body["status"]["flavor"], "m1.xlarge");
    assert_eq!(vm.body["generation"], 4);
    assert_eq!(vm.body["observed_generation"], 4);
    assert_eq!(vm.body["phase"], "ready");
}

#[tokio::test]
async fn if_match_guards_against_lost_updates() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let create = app
        .create(&tenant, "clusters", "k", "zone-a", example_spec("clusters"))
        .await;
    app.wait_done(id(&create)).await;
    let path = format!(
        "/v1/tenants/{tenant}/clusters/{}",
        create["resource_id"].as_str().unwrap()
    );
    let etag = app.get(&path).await.header("etag").unwrap().to_owned();
    let patch = |etag: String, nodes: u32| {
        let (app, path) = (&app, path.clone());
        async move {
            app.http
                .patch(format!("{}{path}", app.url))
                .bearer_auth(&app.admin_key)
                .header("if-match", etag)
                .json(&json!({"spec": {"node_count": nodes}}))
                .send()
                .await
                .unwrap()
        }
    };
    let ok = patch(etag.clone(), 5).await;
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let stale = patch(etag.clone(), 7).await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let body: Value = stale.json().await.unwrap();
    assert_eq!(body["code"], "precondition_failed");
    assert_ne!(body["details"]["current_etag"].as_str().unwrap(), etag);
    let garbage = patch("\"not-a-version\"".into(), 7).await;
    assert_eq!(garbage.status(), StatusCode::PRECONDITION_FAILED);
    let bad_spec = app
        .request(
            Method::PATCH,
            &path,
            Some(&app.admin_key),
            Some(&json!({"spec": {"node_count": 0}})),
        )
        .await;
    assert_eq!(
        (bad_spec.status, bad_spec.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec")
    );
    let unknown = app
        .request(
            Method::PATCH,
            &path,
            Some(&app.admin_key),
            Some(&json!({"spec": {"gpus": 1}})),
        )
        .await;
    assert_eq!(unknown.code(), "invalid_spec");
    assert_eq!(app.get(&path).await.body["spec"]["node_count"], 5);
}

#[tokio::test]
async fn actions_change_the_desired_state_and_workers_converge_on_it() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let vm = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let vol = app
        .create(
            &tenant,
            "volumes",
            "data",
            "zone-a",
            example_spec("volumes"),
        )
        .await;
    let cluster = app
        .create(
            &tenant,
            "clusters",
            "k",
            "zone-b",
            json!({"version": "1.30", "node_count": 3, "node_flavor": "m1.large"}),
        )
        .await;
    let bm = app
        .create(
            &tenant,
            "bare-metal",
            "metal",
            "zone-b",
            example_spec("bare-metal"),
        )
        .await;
    for op in [&vm, &vol, &cluster, &bm] {
        app.wait_done(id(op)).await;
    }
    let rid = |op: &Value| op["resource_id"].as_str().unwrap().to_owned();
    let t = tenant.as_str();
    run(&app, t, "vms", rid(&vm), "stop", json!({})).await;
    let v = app
        .get(&format!("/v1/tenants/{tenant}/vms/{}", rid(&vm)))
        .await;
    assert_eq!(v.body["spec"]["power_state"], "stopped");
    assert_eq!(v.body["status"]["power_state"], "stopped");
    assert_eq!(v.body["generation"], 2);
    let reboot = act(&app, t, "vms", rid(&vm), "reboot", json!({})).await;
    assert_eq!(
        (reboot.status, reboot.code()),
        (StatusCode::CONFLICT, "invalid_state")
    );
    run(&app, t, "vms", rid(&vm), "start", json!({})).await;
    run(&app, t, "vms", rid(&vm), "reboot", json!({})).await;
    run(
        &app,
        t,
        "vms",
        rid(&vm),
        "resize",
        json!({"flavor": "m1.large"}),
    )
    .await;
    let unknown = act(
        &app,
        t,
        "vms",
        rid(&vm),
        "resize",
        json!({"flavor": "m9.huge"}),
    )
    .await;
    assert_eq!(unknown.code(), "unknown_catalog_item");

    let shrink = act(
        &app,
        t,
        "volumes",
        rid(&vol),
        "resize",
        json!({"size_gb": 10}),
    )
    .await;
    assert_eq!(
        (shrink.status, shrink.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec")
    );
    run(
        &app,
        t,
        "volumes",
        rid(&vol),
        "resize",
        json!({"size_gb": 40}),
    )
    .await;
    let done = run(
        &app,
        t,
        "volumes",
        rid(&vol),
        "attach",
        json!({"vm_id": rid(&vm)}),
    )
    .await;
    assert_eq!(done["result"]["attached_to"], rid(&vm));
    let elsewhere = act(
        &app,
        t,
        "volumes",
        rid(&vol),
        "attach",
        json!({"vm_id": rid(&bm)}),
    )
    .await;
    assert_eq!(
        elsewhere.status,
        StatusCode::CONFLICT,
        "already attached: {:?}",
        elsewhere.body
    );
    run(&app, t, "volumes", rid(&vol), "detach", json!({})).await;
    let not_a_vm = act(
        &app,
        t,
        "volumes",
        rid(&vol),
        "attach",
        json!({"vm_id": rid(&bm)}),
    )
    .await;
    assert_eq!(not_a_vm.code(), "invalid_attachment");

    run(
        &app,
        t,
        "clusters",
        rid(&cluster),
        "scale",
        json!({"node_count": 5}),
    )
    .await;
    run(
        &app,
        t,
        "clusters",
        rid(&cluster),
        "upgrade",
        json!({"version": "1.31"}),
    )
    .await;
    let c = app
        .get(&format!("/v1/tenants/{tenant}/clusters/{}", rid(&cluster)))
        .await;
    assert_eq!(c.body["status"]["nodes_ready"], 5);
    assert_eq!(c.body["status"]["version"], "1.31");
    run(&app, t, "bare-metal", rid(&bm), "power_off", json!({})).await;
    run(
        &app,
        t,
        "bare-metal",
        rid(&bm),
        "reprovision",
        json!({"image": "rocky-9"}),
    )
    .await;

    let nope = act(&app, t, "vms", rid(&vm), "scale", json!({})).await;
    assert_eq!(
        (nope.status, nope.code()),
        (StatusCode::NOT_FOUND, "unknown_action")
    );
    let strict = act(&app, t, "vms", rid(&vm), "stop", json!({"force": true})).await;
    assert_eq!(
        (strict.status, strict.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
}

/// A long-poll on one gateway is woken by a report applied on another (the change is
/// announced over NATS), not by its safety re-check.
#[tokio::test]
async fn a_long_poll_on_one_replica_returns_on_a_change_made_on_another() {
    let d = common::Deployment::new(&common::pg_base(), &common::nats_url(), &[]).await;
    let [(a, ca), (_b, cb)] = d.two_replicas().await;
    let t = d.tenant(&a.url()).await;
    let op = ca
        .create(&t, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let op_id = id(&op).to_owned();
    let key = worker_key(&d.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let started = Instant::now();
    let poll_path = format!("/v1/operations/{op_id}?wait=20s");
    let poll = cb.get(&poll_path);
    let work = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = json!({"attempt": 1, "state": "running"});
        let path = format!("/v1/operations/{op_id}/reports");
        ca.request(Method::POST, &path, Some(&key), Some(&body))
            .await
    };
    let (polled, reported) = tokio::join!(poll, work);
    assert_eq!(reported.status, StatusCode::OK, "{:?}", reported.body);
    assert_eq!(polled.body["state"], "running", "{:?}", polled.body);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "woken by the other replica's announcement, not by a re-check"
    );
}

/// A report that waits for its operation's resource (held by another transaction, which
/// ends the operation meanwhile) acts on the operation as that transaction left it: it
/// is refused as finished, and the operation stays as it was ended. The resource and the
/// operation are locked in one statement; this is the case where the operation's row
/// read with the resource's lock is not the one under it.
#[tokio::test]
async fn a_report_that_waited_for_the_resource_sees_the_operation_as_the_holder_left_it() {
    let app = spawn_with(Options::api_only()).await;
    let (_tenant, op_id, key) = pending_vm(&app).await;
    let op = Uuid::parse_str(&op_id).unwrap();
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM resources WHERE id = (SELECT resource_id FROM operations WHERE id = $1)
         FOR NO KEY UPDATE",
    )
    .bind(op)
    .execute(&mut *holder)
    .await
    .unwrap();
    let running = json!({"attempt": 1, "state": "running"});
    let reported = report(&app, &key, &op_id, running);
    let end = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query("UPDATE operations SET state = 'cancelled', finished_at = now() WHERE id = $1")
            .bind(op)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder.commit().await.unwrap();
    };
    let (reported, ()) = tokio::join!(reported, end);
    assert_eq!(
        (reported.status, reported.code()),
        (StatusCode::CONFLICT, "operation_finished"),
        "{:?}",
        reported.body
    );
    let state: String = sqlx::query_scalar("SELECT state FROM operations WHERE id = $1")
        .bind(op)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
}

/// A long-poll waiting for its operation to end (`until=done`) re-reads the operation
/// only on an announcement that may have ended it: one naming it as ended, or one from a
/// process that does not name ends (an older replica, during a rolling upgrade). An
/// announcement that names its ends and not this operation's is not read; the safety
/// re-check (5 s) still finds an end that no announcement named.
#[tokio::test]
async fn a_long_poll_for_the_end_rereads_only_when_its_operation_may_have_ended() {
    let app = spawn_with(Options::api_only()).await;
    let nats = app.running.as_ref().unwrap().backends.nats.clone();
    let subject = app.config.nats.changes_subject();
    let waits = ["ended named", "ends not named", "another end named"].map(|case| {
        let (app, nats, subject) = (&app, nats.clone(), subject.clone());
        async move {
            let (_tenant, op_id, _key) = pending_vm(app).await;
            let started = Instant::now();
            let poll_path = format!("/v1/operations/{op_id}?wait=20s&until=done");
            let poll = app.get(&poll_path);
            let end = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                // The operation ends behind the gateway's back, then an announcement
                // from another process comes.
                sqlx::query(
                    "UPDATE operations SET state = 'succeeded', finished_at = now() WHERE id = $1",
                )
                .bind(Uuid::parse_str(&op_id).unwrap())
                .execute(&app.pool)
                .await
                .unwrap();
                let other = Uuid::now_v7();
                let body = match case {
                    "ended named" => format!("from elsewhere\nends named\n{op_id}\nended {op_id}"),
                    "ends not named" => format!("from elsewhere\n{op_id}"),
                    _ => format!("from elsewhere\nends named\n{op_id}\n{other}\nended {other}"),
                };
                nats.publish(subject, body.into()).await.unwrap();
                nats.flush().await.unwrap();
            };
            let (polled, ()) = tokio::join!(poll, end);
            assert_eq!(
                polled.body["state"], "succeeded",
                "{case}: {:?}",
                polled.body
            );
            (case, started.elapsed())
        }
    });
    for (case, took) in futures::future::join_all(waits).await {
        let reread_at_once = took < Duration::from_secs(3);
        assert_eq!(
            reread_at_once,
            case != "another end named",
            "{case}: answered after {took:?}"
        );
    }
}

/// A long-poll waiting for the end that heard a change it did not read (one that did
/// not end the operation) answers, at its deadline, the operation as that change left
/// it, not as it first read it.
#[tokio::test]
async fn a_long_poll_for_the_end_answers_the_latest_state_at_its_deadline() {
    let app = spawn_with(Options::api_only()).await;
    let (_tenant, op_id, key) = pending_vm(&app).await;
    let (polled, reported) = poll_while_it_starts(&app, &key, &op_id, "wait=2s&until=done").await;
    assert_eq!(reported.status, StatusCode::OK, "{:?}", reported.body);
    assert_eq!(polled.body["state"], "running", "{:?}", polled.body);
    assert_eq!(polled.header("retry-after"), Some("1"));
}

/// Long-polls operation `op_id` with `query` while its worker reports it `running`
/// 300 ms later; answers the poll's and the report's answers.
async fn poll_while_it_starts(
    app: &TestApp,
    key: &str,
    op_id: &str,
    query: &str,
) -> (common::Answer, common::Answer) {
    let poll_path = format!("/v1/operations/{op_id}?{query}");
    let poll = app.get(&poll_path);
    let work = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        report(app, key, op_id, json!({"attempt": 1, "state": "running"})).await
    };
    tokio::join!(poll, work)
}

#[tokio::test]
async fn a_long_poll_returns_on_the_state_change_not_at_the_end_of_its_wait() {
    let app = spawn_with(Options::api_only()).await;
    let (tenant, op_id, key) = pending_vm(&app).await;
    let started = Instant::now();
    let (polled, reported) = poll_while_it_starts(&app, &key, &op_id, "wait=20s").await;
    assert_eq!(reported.status, StatusCode::OK);
    assert_eq!(polled.body["state"], "running", "{:?}", polled.body);
    // Well before the 5 s safety re-check: the change itself woke it.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "returned on the change, not on a re-check"
    );
    assert_eq!(polled.header("retry-after"), Some("1"));
    // A finished operation answers at once, wait or not.
    report(
        &app,
        &key,
        &op_id,
        json!({"attempt": 1, "state": "succeeded", "status": {}}),
    )
    .await;
    let started = Instant::now();
    let done = app.get(&format!("/v1/operations/{op_id}?wait=20s")).await;
    assert_eq!(done.body["state"], "succeeded");
    assert!(started.elapsed() < Duration::from_secs(10));
    let bad = app
        .get(&format!("/v1/operations/{op_id}?wait=forever"))
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    // A short wait on an unchanging operation ends with the operation as it is.
    let other = app
        .create(&tenant, "vms", "idle", "zone-a", example_spec("vms"))
        .await;
    let idle = app
        .get(&format!("/v1/operations/{}?wait=200ms", id(&other)))
        .await;
    assert_eq!(idle.body["state"], "pending");
}

/// `until=done`: one long-poll follows the operation through every state to its end,
/// instead of answering at the first change.
#[tokio::test]
async fn a_long_poll_until_done_answers_at_the_end_not_at_the_first_change() {
    let app = spawn_with(Options::api_only()).await;
    let (tenant, op_id, key) = pending_vm(&app).await;
    let started = Instant::now();
    let path = format!("/v1/operations/{op_id}?wait=20s&until=done");
    let poll = app.get(&path);
    let work = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let running = json!({"attempt": 1, "state": "running"});
        let a = report(&app, &key, &op_id, running).await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let done = json!({"attempt": 1, "state": "succeeded", "status": {}});
        let b = report(&app, &key, &op_id, done).await;
        assert_eq!(b.status, StatusCode::OK, "{:?}", b.body);
    };
    let (polled, ()) = tokio::join!(poll, work);
    assert_eq!(polled.status, StatusCode::OK, "{:?}", polled.body);
    assert_eq!(polled.body["state"], "succeeded", "{:?}", polled.body);
    assert_eq!(polled.body["done"], true);
    assert_eq!(polled.header("retry-after"), None, "a finished operation");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "woken by the end, not by a re-check: {:?}",
        started.elapsed()
    );
    // Finished: answered at once.
    let started = Instant::now();
    let again = app
        .get(&format!("/v1/operations/{op_id}?wait=20s&until=done"))
        .await;
    assert_eq!(again.body["state"], "succeeded");
    assert!(started.elapsed() < Duration::from_secs(2));
    // An operation that does not end in time is answered as it is, when the wait is up.
    let other = app
        .create(&tenant, "vms", "idle", "zone-a", example_spec("vms"))
        .await;
    let other_id = id(&other).to_owned();
    let running = json!({"attempt": 1, "state": "running"});
    let path = format!("/v1/operations/{other_id}?wait=1500ms&until=done");
    let poll = app.get(&path);
    let work = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        report(&app, &key, &other_id, running).await
    };
    let started = Instant::now();
    let (idle, reported) = tokio::join!(poll, work);
    assert_eq!(reported.status, StatusCode::OK);
    assert_eq!(idle.body["state"], "running", "{:?}", idle.body);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(idle.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn a_bad_until_is_refused_and_until_alone_reads_at_once() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let op_id = id(&op).to_owned();
    for query in ["wait=1s&until=never", "until=sometime", "wait=1s&until="] {
        let a = app.get(&format!("/v1/operations/{op_id}?{query}")).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "{query}: {:?}",
            a.body
        );
    }
    for query in ["wait=1ms&until=changed", "until=done"] {
        // Without `wait`, `until` changes nothing: the operation is read at once.
        let started = Instant::now();
        let a = app.get(&format!("/v1/operations/{op_id}?{query}")).await;
        assert_eq!(a.status, StatusCode::OK, "{query}: {:?}", a.body);
        assert_eq!(a.body["state"], "pending");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn cancelling_stops_what_has_not_started_and_asks_workers_to_stop_the_rest() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    // A pending create: cancelled at once, and the resource never existed.
    let a = app
        .create(&tenant, "vms", "a", "zone-a", example_spec("vms"))
        .await;
    let c = cancel(&app, id(&a)).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    assert_eq!(c.body["state"], "cancelled");
    assert_eq!(c.body["error"]["code"], "cancelled");
    assert_eq!(
        app.get(&common::vm_path(&tenant, &a)).await.status,
        StatusCode::NOT_FOUND
    );
    // Its message may still reach a worker: the gateway tells it the operation is over.
    let late = report(
        &app,
        &key,
        id(&a),
        json!({"attempt": 1, "state": "running"}),
    )
    .await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::CONFLICT, "operation_finished")
    );
    // A retried cancel gets the same answer.
    let again = cancel(&app, id(&a)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["state"], "cancelled");

    // A running create: the worker learns of the request in its next report's answer.
    let b = app
        .create(&tenant, "vms", "b", "zone-a", example_spec("vms"))
        .await;
    let path = common::vm_path(&tenant, &b);
    report(
        &app,
        &key,
        id(&b),
        json!({"attempt": 1, "state": "running"}),
    )
    .await;
    let queued = app
        .request(
            Method::POST,
            &format!("{path}/actions/stop"),
            Some(&app.admin_key),
            Some(&json!({})),
        )
        .await;
    assert_eq!(queued.body["state"], "queued");
    let c = cancel(&app, id(&b)).await;
    assert_eq!(c.body["state"], "running");
    assert_eq!(c.body["cancel_requested"], true);
    let ack = report(
        &app,
        &key,
        id(&b),
        json!({"attempt": 1, "state": "running"}),
    )
    .await;
    assert_eq!(ack.body["cancel_requested"], true);
    let stopped = report(
        &app,
        &key,
        id(&b),
        json!({"attempt": 1, "state": "cancelled"}),
    )
    .await;
    assert_eq!(stopped.body["state"], "cancelled");
    // The queued stop behind it was for a resource that never came to be.
    let q = app
        .get(&format!("/v1/operations/{}", id(&queued.body)))
        .await;
    assert_eq!(q.body["state"], "cancelled");
    assert_eq!(q.body["error"]["code"], "resource_deleted");

    // A queued operation is cancelled at once and the one after it moves up.
    let d = app
        .create(&tenant, "vms", "d", "zone-a", example_spec("vms"))
        .await;
    let path = common::vm_path(&tenant, &d);
    let stop = app
        .request(
            Method::POST,
            &format!("{path}/actions/stop"),
            Some(&app.admin_key),
            None,
        )
        .await;
    let del = app.delete(&path).await;
    assert_eq!(
        cancel(&app, id(&stop.body)).await.body["state"],
        "cancelled"
    );
    report(
        &app,
        &key,
        id(&d),
        json!({"attempt": 1, "state": "succeeded", "status": {}}),
    )
    .await;
    let del = app.get(&format!("/v1/operations/{}", id(&del.body))).await;
    assert_eq!(
        del.body["state"], "pending",
        "the delete moved up past the cancelled stop"
    );
    // A finished operation cannot be cancelled.
    let done = cancel(&app, id(&d)).await;
    assert_eq!(
        (done.status, done.code()),
        (StatusCode::CONFLICT, "operation_finished")
    );
    assert_eq!(done.body["details"]["state"], "succeeded");
}

#[tokio::test]
async fn lists_filter_and_page_through_every_row_exactly_once_while_rows_are_added() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut before = HashSet::new();
    for i in 0..24 {
        let (kind, zone) = if i % 3 == 0 {
            ("volumes", "zone-b")
        } else {
            ("vms", "zone-a")
        };
        let op = app
            .create(&tenant, kind, &format!("r{i}"), zone, example_spec(kind))
            .await;
        before.insert(id(&op).to_owned());
    }
    let insert_more = async {
        for i in 0..20 {
            app.create(
                &tenant,
                "vms",
                &format!("late{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        }
    };
    let page_through = async {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/tenants/{tenant}/operations?limit=5");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = app.get(&path).await;
            seen.extend(
                page.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| id(o).to_owned()),
            );
            match page.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break seen,
            }
        }
    };
    let ((), seen) = tokio::join!(insert_more, page_through);
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no operation twice");
    assert!(
        before.is_subset(&unique),
        "every operation that existed is listed"
    );

    let vols = app
        .get(&format!(
            "/v1/tenants/{tenant}/operations?kind=volume&zone=zone-b&state=pending"
        ))
        .await;
    assert_eq!(
        vols.body["items"].as_array().unwrap().len(),
        8,
        "{:?}",
        vols.body
    );
    let since = chrono::Utc::now() + chrono::Duration::hours(1);
    let none = app
        .get(&format!(
            "/v1/tenants/{tenant}/operations?since={}",
            since.to_rfc3339().replace('+', "%2B")
        ))
        .await;
    assert_eq!(none.body["items"], json!([]));
    let bad = app
        .get(&format!("/v1/tenants/{tenant}/operations?state=sleeping"))
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let provisioning = app
        .get(&format!("/v1/tenants/{tenant}/volumes?phase=provisioning"))
        .await;
    assert_eq!(provisioning.body["items"].as_array().unwrap().len(), 8);
    let ready = app
        .get(&format!("/v1/tenants/{tenant}/volumes?phase=ready"))
        .await;
    assert_eq!(ready.body["items"], json!([]));
}

#[tokio::test]
async fn an_operation_past_its_deadline_fails_with_deadline_exceeded() {
    let app = spawn_with(Options {
        database_port: None,
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            workers: None,
            webhooks: false,
        },
        tweak: |c| {
            c.operation_timeout = Duration::from_secs(1);
            c.reconcile_interval = Duration::from_millis(100);
        },
    })
    .await;
    let tenant = app.tenant().await;
    let op = app
        .create(
            &tenant,
            "bare-metal",
            "m",
            "zone-a",
            example_spec("bare-metal"),
        )
        .await;
    let done = app.wait_done(id(&op)).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["error"]["code"], "deadline_exceeded");
    let r = app
        .get(&format!(
            "/v1/tenants/{tenant}/bare-metal/{}",
            op["resource_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.body["phase"], "failed");
    assert_eq!(r.body["status"]["last_error"]["code"], "deadline_exceeded");
}

#[tokio::test]
async fn an_idempotency_key_is_forgotten_after_its_retention_and_may_be_used_again() {
    let app = spawn_with(Options {
        database_port: None,
        tweak: |c| c.idempotency_retention = Duration::from_secs(1),
        parts: gateway::app::Parts {
            api: true,
            reconciler: true,
            ..Default::default()
        },
    })
    .await;
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/vms");
    let first = json!({"name": "a", "zone": "zone-a", "spec": common::example_spec("vms")});
    let a = post_with_key(&app, &path, "once", &first).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let other = json!({"name": "b", "zone": "zone-a", "spec": common::example_spec("vms")});
    let b = post_with_key(&app, &path, "once", &other).await;
    assert_eq!(
        b.code(),
        "idempotency_key_reused",
        "remembered within the retention"
    );
    // The reconciler forgets it once the retention has passed; the operation stays.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = app
            .count("operations WHERE idempotency_key IS NOT NULL")
            .await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the key was never forgotten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = post_with_key(&app, &path, "once", &other).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{:?}", c.body);
    assert_ne!(c.body["id"], a.body["id"], "a new operation");
    let old = app
        .get(&format!(
            "/v1/operations/{}",
            a.body["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(old.status, StatusCode::OK);
}
