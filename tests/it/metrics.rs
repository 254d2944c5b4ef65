//! Operators can see the queues: `/metrics` moves as operations flow, parses with
//! promtool, and a request ID can be followed end to end.

use crate::common::{example_spec, sample, spawn_app, spawn_with, Options, TestApp};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

async fn scrape(app: &TestApp) -> String {
    let res = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    res.text().await.unwrap()
}

/// Polls `/metrics` until `pred` holds (10 s at most).
async fn until(app: &TestApp, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(app).await;
        if pred(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `promtool check metrics` on `text`; promtool is installed by scripts/services.sh.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed for this test: run scripts/services.sh (installs Debian's prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 1 for lint findings too; only parse errors matter here.
    assert!(
        !report.contains("error while linting") && !report.contains("text format parsing error"),
        "{report}"
    );
}

#[tokio::test]
async fn counters_move_as_operations_flow_and_the_exposition_parses() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let before = scrape(&app).await;
    promtool_check(&before);
    for i in 0..3 {
        let op = app
            .create(
                &tenant,
                "clusters",
                &format!("c{i}"),
                "zone-b",
                example_spec("clusters"),
            )
            .await;
        app.wait_done(op["id"].as_str().unwrap()).await;
    }
    let failed = app
        .create(
            &tenant,
            "clusters",
            "fail-c",
            "zone-b",
            example_spec("clusters"),
        )
        .await;
    app.wait_done(failed["id"].as_str().unwrap()).await;
    let text = scrape(&app).await;
    promtool_check(&text);
    let created =
        r#"gateway_operations_created_total{action="create",service="k8s",zone="zone-b"}"#;
    assert_eq!(sample(&text, created), 4.0, "{text}");
    let ok = r#"gateway_operations_finished_total{action="create",service="k8s",zone="zone-b",outcome="succeeded"}"#;
    let bad = r#"gateway_operations_finished_total{action="create",service="k8s",zone="zone-b",outcome="failed"}"#;
    assert_eq!(sample(&text, ok), 3.0);
    assert_eq!(sample(&text, bad), 1.0);
    assert!(
        sample(
            &text,
            r#"gateway_operation_duration_seconds_count{action="create",service="k8s"}"#
        ) >= 4.0
    );
    assert!(
        sample(
            &text,
            r#"gateway_http_requests_total{route="/v1/tenants/{tenant}/{kind}",method="POST",status="2xx"}"#
        ) >= 4.0,
        "{text}"
    );
    // Four creates checked the same version, flavor and zone: the cache answered most.
    let hits = sample(
        &text,
        r#"gateway_cache_requests_total{cache="catalog",result="hit"}"#,
    );
    let misses = sample(
        &text,
        r#"gateway_cache_requests_total{cache="catalog",result="miss"}"#,
    );
    assert_eq!(
        misses, 2.0,
        "one miss per distinct entry (1.31, m1.large)\n{text}"
    );
    assert_eq!(hits, 6.0, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"gateway_cache_requests_total{cache="zones",result="hit"}"#
        ),
        3.0
    );
    // In-process workers report into the same registry.
    assert!(text.contains("worker_messages_total"), "{text}");
}

#[tokio::test]
async fn the_outbox_backlog_rises_without_a_relay_and_drains_with_one() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    for i in 0..5 {
        app.create(
            &tenant,
            "vms",
            &format!("v{i}"),
            "zone-a",
            example_spec("vms"),
        )
        .await;
    }
    until(&app, "backlog of 5", |t| {
        sample(t, "gateway_outbox_pending") == 5.0
    })
    .await;
    let text = until(&app, "5 pending operations", |t| {
        sample(t, r#"gateway_operations_active{state="pending"}"#) == 5.0
    })
    .await;
    assert!(sample(&text, "gateway_outbox_oldest_age_seconds") >= 0.0);
    let running = app.running.as_ref().unwrap();
    let relay = gateway::relay::Relay {
        pool: app.pool.clone(),
        js: running.backends.js.clone(),
        batch_size: 100,
        concurrent_passes: 1,
        poll_interval: Duration::from_millis(100),
        wake: Default::default(),
        changes: Default::default(),
        metrics: Default::default(),
        signer: app.config.dispatch_signing_key.clone().unwrap(),
        events_prefix: app.config.nats.events_prefix.clone(),
    };
    relay.pass().await.unwrap();
    // Gauges refresh one after another: wait for both rather than read them at once.
    until(&app, "drained and dispatched", |t| {
        sample(t, "gateway_outbox_pending") == 0.0
            && sample(t, r#"gateway_operations_active{state="dispatched"}"#) == 5.0
    })
    .await;
    // No consumer runs here: the messages wait in the vm/zone-a pool's consumer.
    until(&app, "consumer backlog", |t| {
        sample(
            t,
            r#"gateway_jetstream_consumer_pending{service="vm",zone="zone-a"}"#,
        ) == 5.0
    })
    .await;
}

#[tokio::test]
async fn the_upkeep_gauges_show_autovacuum_and_the_queue_tables_sizes() {
    // No relay: the outbox and events rows stay, so the tables' sizes hold still.
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    for i in 0..40 {
        let spec = example_spec("vms");
        app.create(&tenant, "vms", &format!("v{i}"), "zone-a", spec)
            .await;
    }
    let (autovacuum, outbox, events): (bool, i64, i64) = sqlx::query_as(
        "SELECT current_setting('autovacuum')::bool,
                pg_total_relation_size('outbox'), pg_total_relation_size('event_outbox')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(outbox > 0 && events > 0);
    until(&app, "the server's autovacuum and table sizes", |t| {
        sample(t, "gateway_database_autovacuum") == f64::from(u8::from(autovacuum))
            && sample(t, r#"gateway_queue_table_bytes{table="outbox"}"#) == outbox as f64
            && sample(t, r#"gateway_queue_table_bytes{table="event_outbox"}"#) == events as f64
    })
    .await;
}

#[tokio::test]
async fn a_request_id_travels_from_the_202_through_the_worker_and_back() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = app
        .http
        .post(format!("{}/v1/tenants/{tenant}/volumes", app.url))
        .bearer_auth(&app.admin_key)
        .header("x-request-id", "follow-me-0042")
        .header("traceparent", traceparent)
        .json(&serde_json::json!({"name": "traced", "zone": "zone-a", "spec": example_spec("volumes")}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "follow-me-0042");
    let op: Value = res.json().await.unwrap();
    let done = app.wait_done(op["id"].as_str().unwrap()).await;
    assert_eq!(done["request_id"], "follow-me-0042");
    // The worker's reports carried the same request ID back to the gateway: the audit
    // trail shows the `running` and `succeeded` reports under it.
    app.wait_audit(
        "request_id = 'follow-me-0042' AND action LIKE '%/reports'",
        2,
    )
    .await;
    let reports: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, principal_name FROM audit_log WHERE request_id = $1 AND action LIKE '%/reports' ORDER BY id",
    )
    .bind("follow-me-0042")
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports
            .iter()
            .all(|(_, who)| who == "worker:storage:zone-a"),
        "{reports:?}"
    );
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM operations WHERE id = $1::uuid")
            .bind(op["id"].as_str().unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored.as_deref(), Some(traceparent));
}

#[tokio::test]
async fn the_audit_gauge_shows_the_rows_an_open_transaction_holds_out_of_the_chain() {
    let app = spawn_with(Options::api_only()).await;
    // A transaction that has written and stays open: rows newer than it are not final
    // until it ends, so they wait for it.
    let mut open = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    app.tenant().await;
    until(&app, "the tenant's audit row waiting", |t| {
        sample(t, "gateway_audit_unsealed") >= 1.0
    })
    .await;
    open.commit().await.unwrap();
    until(&app, "the audit rows chained", |t| {
        sample(t, "gateway_audit_unsealed") == 0.0
    })
    .await;
}

/// The waiting audit rows are counted up to a bound: under a transaction left open for
/// hours every row since waits, and each process's refresh must not read them all.
#[tokio::test]
async fn the_audit_count_stops_at_its_bound() {
    let sandbox =
        crate::common::Sandbox::new(&crate::common::pg_base(), &crate::common::nats_url());
    let pool = gateway::store::connect(&sandbox.database_url(), 2)
        .await
        .unwrap();
    gateway::store::migrate(&pool).await.unwrap();
    let bound = gateway::store::audit::UNSEALED_COUNTED;
    // Nothing seals here (no API process): every row waits.
    let insert = "INSERT INTO audit_log (at, action, target, outcome, status, request_id)
                  SELECT now(), 'GET /v1/zones', '/v1/zones', 'allowed', 200, 'r' || n
                  FROM generate_series(1, $1) n";
    sqlx::query(insert)
        .bind(bound - 1)
        .execute(&pool)
        .await
        .unwrap();
    let count = gateway::store::audit::unsealed_count(&pool).await.unwrap();
    assert_eq!(count, bound - 1);
    sqlx::query(insert)
        .bind(2_i64)
        .execute(&pool)
        .await
        .unwrap();
    let count = gateway::store::audit::unsealed_count(&pool).await.unwrap();
    assert_eq!(count, bound, "counted past its bound");
    pool.close().await;
}
