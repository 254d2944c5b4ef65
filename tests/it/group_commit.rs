//! Group commit: concurrent creates share one transaction, and each is still answered,
//! audited and evented exactly as it would be alone.
//!
//! A batch of tenants without quota limits is one statement; one with a limited tenant
//! is a transaction that locks the quota rows ([`Path`]). The tests make batches form
//! deterministically: a test transaction holds what every lane needs (the tenant's
//! quota row, or a lock on the resources table), so every lane waits (the second once
//! a create has waited `group::STUCK` for the first), and the creates that arrive
//! meanwhile queue up; releasing it lets them go in batches.

use crate::common::{example_spec, metric, spawn_with, Answer, Options, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

/// Batches at once (`gateway::lifecycle::group::LANES`): while the first waits on a
/// lock, creates behind it take the second after `group::STUCK`.
const LANES: i64 = gateway::lifecycle::group::LANES as i64;

/// How a batch is recorded.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// One statement, outside a transaction block (tenants without quota limits).
    Statement,
    /// A transaction that locks the tenants' quota rows.
    Transaction,
}

const PATHS: [Path; 2] = [Path::Statement, Path::Transaction];

/// A tenant whose creates take `path` (with a VM quota too large to matter).
async fn tenant_for(app: &TestApp, path: Path) -> String {
    match path {
        Path::Statement => app.tenant().await,
        Path::Transaction => tenant_with_quota(app, 1000).await,
    }
}

/// Holds what every create of `tenant` on `path` needs, so each waits in its lane:
/// the tenant's quota row, or the resources table (a create's statement inserts into
/// it, which a `SHARE` lock holds off).
async fn hold(app: &TestApp, tenant: &str, path: Path) -> Transaction<'static, Postgres> {
    match path {
        Path::Transaction => hold_quota(app, tenant).await,
        Path::Statement => {
            let mut tx = app.pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE resources IN SHARE MODE")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        }
    }
}

/// A tenant with a quota (count of VMs limited to `limit`).
async fn tenant_with_quota(app: &TestApp, limit: i64) -> String {
    let t = app.tenant().await;
    let body = json!({"limits": [{"dimension": "count", "kind": "vm", "limit": limit}]});
    let path = format!("/v1/tenants/{t}/quotas");
    let a = app
        .request(Method::PUT, &path, Some(&app.admin_key), Some(&body))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    t
}

/// Holds `tenant`'s quota row, so every create of it waits in its lane.
async fn hold_quota(app: &TestApp, tenant: &str) -> Transaction<'static, Postgres> {
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM quotas WHERE tenant = $1 FOR UPDATE")
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Waits until a lane waits on a row lock (the first; the second too if a create
/// queued behind it took it) and `requests` requests are in flight besides those
/// before: the rest of them are queued.
async fn until_queued(app: &TestApp, before: f64, requests: usize) {
    until_lanes_wait(app, before, requests, 1..=LANES).await;
}

/// Waits until a number of lanes in `lanes_waiting` wait on a row lock and `requests`
/// requests are in flight besides those before.
async fn until_lanes_wait(
    app: &TestApp,
    before: f64,
    requests: usize,
    lanes_waiting: std::ops::RangeInclusive<i64>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lanes = waiting_on_locks(app).await;
        let in_flight = metric(&app.url, "gateway_http_requests_in_flight").await - before;
        if lanes_waiting.contains(&lanes) && in_flight >= requests as f64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{lanes} lanes waiting, {in_flight} requests in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of the test's database waiting on a lock: lanes whose batch is held.
async fn waiting_on_locks(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// A create of a VM named `name`, with an `Idempotency-Key` if given.
async fn create(app: &TestApp, tenant: &str, name: &str, key: Option<&str>) -> Answer {
    let mut req = app
        .http
        .post(format!("{}/v1/tenants/{tenant}/vms", app.url))
        .bearer_auth(&app.admin_key)
        .json(&json!({"name": name, "zone": "zone-a", "spec": example_spec("vms")}));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    Answer::read(req.send().await.unwrap()).await
}

/// Sends `names` as concurrent creates while what they need on `path` is held ([`hold`]),
/// waits until all but `unblocked` of them (replays, which lock no quota) are queued or
/// waiting, then lets them go; returns the answers, in the order of `names`.
async fn burst(
    app: &TestApp,
    (tenant, path): (&str, Path),
    names: &[(String, Option<String>)],
    unblocked: usize,
) -> Vec<Answer> {
    let before = metric(&app.url, "gateway_http_requests_in_flight").await;
    let held = hold(app, tenant, path).await;
    let sent = futures::future::join_all(
        names
            .iter()
            .map(|(name, key)| create(app, tenant, name, key.as_deref())),
    );
    let release = async {
        until_queued(app, before, names.len() - unblocked).await;
        held.rollback().await.unwrap();
    };
    let (answers, ()) = tokio::join!(sent, release);
    answers
}

/// The events each operation of `tenant` recorded, in order, as `type state dispatches`
/// (the operation's, as the event carries it).
async fn events_by_operation(app: &TestApp, tenant: &str) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT o.id::text, concat_ws(' ', e.type, e.state, e.dispatches)
             FROM operations o
             JOIN {} e ON e.resource_id = o.resource_id
             WHERE o.tenant = $1 ORDER BY e.id, e.n",
        crate::common::OUTBOX_EVENTS
    ))
    .bind(tenant)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut by_op: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (op, t) in rows {
        by_op.entry(op).or_default().push(t);
    }
    by_op
}

/// Each request answered left one audit row, with its own request ID and its status.
async fn audited_once_each(app: &TestApp, answers: &[Answer]) {
    for a in answers {
        let request = a.header("x-request-id").unwrap().to_owned();
        let status = a.status.as_u16();
        let row = format!("request_id = '{request}' AND status = {status}");
        app.wait_audit(&row, 1).await;
        let rows = app
            .count(&format!("audit_log WHERE request_id = '{request}'"))
            .await;
        assert_eq!(rows, 1, "audit rows of {request}");
    }
}

/// The `n` creates since `before` batches went in batches (fewer than `n`, some of
/// several), and no batch failed.
async fn went_in_batches(app: &TestApp, before: f64, n: usize) {
    let all = metric(&app.url, "gateway_write_batch_size_count").await;
    let ones = metric(&app.url, "gateway_write_batch_size_bucket{le=\"1.0\"}").await;
    assert!(all - before < n as f64, "{all} batches for {n} creates");
    assert!(ones < all, "every batch held one create");
    assert_eq!(
        metric(&app.url, "gateway_write_batch_failures_total").await,
        0.0
    );
}

/// Each of `accepted` is pending with the events `alone` (a create alone of `tenant`)
/// recorded, in that order.
async fn evented_as_alone(app: &TestApp, tenant: &str, alone: &Answer, accepted: &[&Answer]) {
    let events = events_by_operation(app, tenant).await;
    let model = &events[alone.body["id"].as_str().unwrap()];
    assert_eq!(
        model,
        &[
            "resource.created",
            "operation.created queued 0",
            "operation.pending pending 1"
        ]
    );
    for a in accepted {
        assert_eq!(a.body["state"], "pending", "{:?}", a.body);
        let id = a.body["id"].as_str().unwrap();
        assert_eq!(&events[id], model, "events of {id}");
    }
}

fn names(prefix: &str, n: usize) -> Vec<(String, Option<String>)> {
    (0..n).map(|i| (format!("{prefix}-{i}"), None)).collect()
}

#[tokio::test]
async fn queued_creates_share_transactions_and_each_is_answered_audited_and_evented_alone() {
    let app = spawn_with(Options::api_only()).await;
    let t = tenant_with_quota(&app, 30).await;
    // One create alone first: what every create of the burst must record too.
    let alone = create(&app, &t, "alone", None).await;
    assert_eq!(alone.status, StatusCode::ACCEPTED, "{:?}", alone.body);
    let batches_before = metric(&app.url, "gateway_write_batch_size_count").await;
    let answers = burst(&app, (&t, Path::Transaction), &names("vm", 40), 0).await;

    // 29 fit beside the first; each of the others is refused on its own.
    let accepted: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(accepted.len(), 29);
    for a in answers.iter().filter(|a| a.status != StatusCode::ACCEPTED) {
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::CONFLICT, "quota_exceeded")
        );
        assert_eq!(a.body["details"]["used"], 30, "{:?}", a.body);
    }
    let ids: HashSet<&str> = accepted
        .iter()
        .map(|a| a.body["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 29);
    assert_eq!(
        app.count(&format!("resources WHERE tenant = '{t}'")).await,
        30
    );
    assert_eq!(
        app.count(&format!(
            "outbox o JOIN operations p ON p.id = o.operation_id WHERE p.tenant = '{t}'"
        ))
        .await,
        30
    );

    // They went in batches: fewer transactions than creates, some of several.
    went_in_batches(&app, batches_before, 40).await;

    evented_as_alone(&app, &t, &alone, &accepted).await;

    audited_once_each(&app, &answers).await;
}

#[tokio::test]
async fn creates_of_tenants_without_limits_share_statements_and_each_is_answered_audited_and_evented_alone(
) {
    let app = spawn_with(Options::api_only()).await;
    let (t, other) = (app.tenant().await, app.tenant().await);
    let alone = create(&app, &t, "alone", None).await;
    assert_eq!(alone.status, StatusCode::ACCEPTED, "{:?}", alone.body);
    let batches_before = metric(&app.url, "gateway_write_batch_size_count").await;
    let answers = burst(&app, (&t, Path::Statement), &names("vm", 40), 0).await;
    assert!(
        answers.iter().all(|a| a.status == StatusCode::ACCEPTED),
        "{answers:?}"
    );
    let ids: HashSet<&str> = answers
        .iter()
        .map(|a| a.body["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 40);
    went_in_batches(&app, batches_before, 40).await;
    for table in ["resources", "operations"] {
        let n = app.count(&format!("{table} WHERE tenant = '{t}'")).await;
        assert_eq!(n, 41, "{table}");
    }
    let messages = "outbox o JOIN operations p ON p.id = o.operation_id";
    let n = app
        .count(&format!("{messages} WHERE p.tenant = '{t}'"))
        .await;
    assert_eq!(n, 41);
    let answered: Vec<&Answer> = answers.iter().collect();
    evented_as_alone(&app, &t, &alone, &answered).await;
    audited_once_each(&app, &answers).await;
    // Another tenant's create is not held back by what this one's did.
    assert_eq!(
        create(&app, &other, "vm-0", None).await.status,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_batch_whose_statement_or_transaction_fails_records_each_of_its_creates_alone() {
    for path in PATHS {
        a_batch_that_fails_records_each_of_its_creates_alone(path).await;
    }
}

async fn a_batch_that_fails_records_each_of_its_creates_alone(path: Path) {
    let app = spawn_with(Options::api_only()).await;
    let t = tenant_for(&app, path).await;
    // Twelve creates of one name among eight others: a batch holding two of them (or
    // one, once the name is taken) fails on the unique name as a whole.
    let mut sent = names("other", 8);
    sent.extend((0..12).map(|_| ("same".to_owned(), None)));
    let answers = burst(&app, (&t, path), &sent, 0).await;
    let (others, same) = answers.split_at(8);
    assert!(
        others.iter().all(|a| a.status == StatusCode::ACCEPTED),
        "{others:?}"
    );
    let won: Vec<_> = same
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .collect();
    assert_eq!(won.len(), 1, "{same:?}");
    for a in same.iter().filter(|a| a.status != StatusCode::ACCEPTED) {
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::CONFLICT, "name_taken"),
            "{path:?}: {:?}",
            a.body
        );
        // Each refusal names the resource the one accepted create made.
        assert_eq!(a.body["details"]["resource_id"], won[0].body["resource_id"]);
    }
    assert!(metric(&app.url, "gateway_write_batch_failures_total").await >= 1.0);
    assert_eq!(
        app.count(&format!("resources WHERE tenant = '{t}'")).await,
        9
    );
    assert_eq!(
        app.count(&format!("operations WHERE tenant = '{t}'")).await,
        9
    );
    audited_once_each(&app, &answers).await;
}

#[tokio::test]
async fn idempotency_keys_are_honoured_within_and_across_batches() {
    for path in PATHS {
        idempotency_keys_are_honoured_on(path).await;
    }
}

async fn idempotency_keys_are_honoured_on(path: Path) {
    let app = spawn_with(Options::api_only()).await;
    let t = tenant_for(&app, path).await;
    let earlier = create(&app, &t, "earlier", Some("key-0")).await;
    assert_eq!(earlier.status, StatusCode::ACCEPTED);
    let key = |k: &str| Some(k.to_owned());
    let mut sent = vec![
        ("earlier".to_owned(), key("key-0")),
        ("twice".to_owned(), key("key-1")),
        ("twice".to_owned(), key("key-1")),
        ("twice".to_owned(), key("key-1")),
        ("not-twice".to_owned(), key("key-1")),
    ];
    sent.extend((0..6).map(|i| (format!("keyed-{i}"), key(&format!("key-x{i}")))));
    // The replay of key-0 locks no quota row: it may be answered at once. Its statement
    // inserts nothing, but waits for the table like any other.
    let unblocked = match path {
        Path::Transaction => 1,
        Path::Statement => 0,
    };
    let answers = burst(&app, (&t, path), &sent, unblocked).await;

    assert_eq!(answers[0].status, StatusCode::ACCEPTED);
    assert_eq!(
        answers[0].body["id"], earlier.body["id"],
        "a replay of key-0"
    );
    // key-1: whichever body came first made the operation; the others with that body
    // get it again, those with the other body are refused.
    let winner = answers[1..5]
        .iter()
        .zip(&sent[1..5])
        .find(|(a, _)| a.status == StatusCode::ACCEPTED)
        .map(|(a, s)| (a.body["id"].clone(), s.0.clone()))
        .expect("one key-1 create is accepted");
    for (a, (name, _)) in answers[1..5].iter().zip(&sent[1..5]) {
        if *name == winner.1 {
            assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
            assert_eq!(a.body["id"], winner.0);
        } else {
            assert_eq!(a.code(), "idempotency_key_reused", "{:?}", a.body);
        }
    }
    assert!(answers[5..]
        .iter()
        .all(|a| a.status == StatusCode::ACCEPTED));
    // earlier, key-1's one, and six others.
    assert_eq!(
        app.count(&format!("operations WHERE tenant = '{t}'")).await,
        8
    );
}

#[tokio::test]
async fn a_create_whose_client_leaves_while_it_is_queued_is_not_recorded() {
    for path in PATHS {
        a_create_whose_client_leaves_is_not_recorded_on(path).await;
    }
}

async fn a_create_whose_client_leaves_is_not_recorded_on(path: Path) {
    let app = spawn_with(Options::api_only()).await;
    let t = tenant_for(&app, path).await;
    let before = metric(&app.url, "gateway_http_requests_in_flight").await;
    let held = hold(&app, &t, path).await;
    // One create per lane, each sent once the one before waits in its lane (sent
    // together, they could share the first lane's batch and leave the second free).
    let lanes = futures::future::join_all((0..LANES).map(|i| {
        let (app, t) = (&app, &t);
        async move {
            until_lanes_wait(app, before, i as usize, i..=i).await;
            create(app, t, &format!("lane-{i}"), None).await
        }
    }));
    let leaver = async {
        until_lanes_wait(&app, before, LANES as usize, LANES..=LANES).await;
        // Every lane waits: this one queues, and its client gives up.
        let gone = app
            .http
            .post(format!("{}/v1/tenants/{t}/vms", app.url))
            .bearer_auth(&app.admin_key)
            .timeout(Duration::from_millis(300))
            .json(&json!({"name": "gone", "zone": "zone-a", "spec": example_spec("vms")}))
            .send()
            .await;
        assert!(gone.unwrap_err().is_timeout());
        // The server notices the hang-up and drops the request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(&app.url, "gateway_http_requests_in_flight").await - before > LANES as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the request stays in flight"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held.rollback().await.unwrap();
    };
    let (answers, ()) = tokio::join!(lanes, leaver);
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.count(&format!("resources WHERE tenant = '{t}'")).await,
        LANES
    );
    assert_eq!(app.count("resources WHERE name = 'gone'").await, 0);
}

/// While the first lane's batch waits on a lock, the creates behind it wait for it only
/// `group::STUCK`: then they take the second lane, so one tenant's stuck batch does not
/// hold up every other tenant's creates until it ends.
#[tokio::test]
async fn creates_behind_a_stuck_batch_take_the_second_lane_after_a_moment() {
    let app = spawn_with(Options::api_only()).await;
    let (stuck, other) = (tenant_with_quota(&app, 1000).await, app.tenant().await);
    let before = metric(&app.url, "gateway_http_requests_in_flight").await;
    let held = hold(&app, &stuck, Path::Transaction).await;
    let first = create(&app, &stuck, "first", None);
    let rest = async {
        until_lanes_wait(&app, before, 1, 1..=1).await;
        // Another tenant's create waits for the first lane a moment (at most
        // `group::STUCK`: any create waiting that long, the first one's request among
        // them, opens the second), then goes in the second and is answered while the
        // first is still held.
        let answer = create(&app, &other, "free", None).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        assert_eq!(waiting_on_locks(&app).await, 1, "the first still waits");
        held.rollback().await.unwrap();
    };
    let (first, ()) = tokio::join!(first, rest);
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
}

#[tokio::test]
async fn with_a_batch_of_one_every_create_has_a_transaction_of_its_own() {
    let app = spawn_with(Options {
        tweak: |c| c.write_batch = 1,
        ..Options::api_only()
    })
    .await;
    let t = app.tenant().await;
    let answers = futures::future::join_all((0..10).map(|i| {
        let (app, t) = (&app, &t);
        async move { create(app, t, &format!("vm-{i}"), None).await }
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
    assert_eq!(
        metric(&app.url, "gateway_write_batch_size_count").await,
        0.0
    );
}

#[tokio::test]
async fn a_create_alone_that_is_refused_is_no_batch_failure() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    assert_eq!(
        create(&app, &t, "dup", None).await.status,
        StatusCode::ACCEPTED
    );
    let again = create(&app, &t, "dup", None).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "name_taken")
    );
    assert_eq!(
        metric(&app.url, "gateway_write_batch_failures_total").await,
        0.0
    );
}

/// A batch task that panics (a bug; injected here through `group::fault`, in debug
/// builds only) leaves no create waiting: each of its creates is answered `500
/// internal`, and audited once; nothing of the batch is recorded; its lane is free
/// again, so the creates after it, more than the lanes, are accepted.
#[tokio::test]
async fn a_batch_task_that_panics_answers_its_creates_and_frees_its_lane() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let name = format!("boom-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    gateway::lifecycle::group::fault::panic_on(&name);
    let boom = tokio::time::timeout(Duration::from_secs(10), create(&app, &t, &name, None))
        .await
        .expect("a create of a batch that panicked was left waiting");
    assert_eq!(
        (boom.status, boom.code()),
        (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        "{:?}",
        boom.body
    );
    audited_once_each(&app, std::slice::from_ref(&boom)).await;
    assert_eq!(
        app.count(&format!("resources WHERE name = '{name}'")).await,
        0
    );
    assert_eq!(
        app.count(&format!("operations WHERE tenant = '{t}'")).await,
        0
    );
    for i in 0..=LANES {
        let after = tokio::time::timeout(
            Duration::from_secs(10),
            create(&app, &t, &format!("after-{i}"), None),
        )
        .await
        .expect("a lane stayed taken after its batch panicked");
        assert_eq!(after.status, StatusCode::ACCEPTED, "{:?}", after.body);
    }
}
