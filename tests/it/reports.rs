//! Workers' reports: scoped keys, forward-only transitions, harmless repeats.

use crate::common::{example_spec, spawn_with, vm_path, Options};
use gateway::app::worker_key;
use gateway::domain::Service;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn reports_move_operations_forward_only_and_only_for_their_pool() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap();
    let path = format!("/v1/operations/{id}/reports");
    let vm_a = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let vm_b = worker_key(&app.pool, &Service::named("vm"), "zone-b")
        .await
        .unwrap();
    let storage_a = worker_key(&app.pool, &Service::named("storage"), "zone-a")
        .await
        .unwrap();
    let send = |key: String, body: Value| {
        let path = path.clone();
        let app = &app;
        async move {
            app.request(Method::POST, &path, Some(&key), Some(&body))
                .await
        }
    };
    let running = json!({"attempt": 1, "state": "running"});
    // Keys that may not see the operation learn nothing of it: `404`, as a read or a
    // report on an ID that does not exist answers (an outside probe told another
    // tenant's operation IDs from unknown ones by a `403`). A key of its own tenant
    // that sees it but may not report on it: `403`.
    let tenant_key = |tenant: String, role: &'static str| {
        let app = &app;
        async move {
            let body = json!({"name": format!("k-{}", crate::common::unique()), "role": role});
            let a = app.post(&format!("/v1/tenants/{tenant}/keys"), body).await;
            assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
            a.body["key"].as_str().unwrap().to_owned()
        }
    };
    let stranger = tenant_key(app.tenant().await, "owner").await;
    let own_reader = tenant_key(tenant.clone(), "reader").await;
    let unknown = format!("/v1/operations/{}/reports", uuid::Uuid::now_v7());
    for other in [&vm_b, &storage_a, &stranger] {
        let a = send(other.clone(), running.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{:?}",
            a.body
        );
        let a = app
            .request(Method::POST, &unknown, Some(other), Some(&running))
            .await;
        assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
        let items = vec![
            json!({"operation_id": id, "report": running}),
            json!({"operation_id": uuid::Uuid::now_v7(), "report": running}),
        ];
        let (status, body) = batch(&app, other, items).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(body["results"][0]["status"], 404, "{body:?}");
        assert_eq!(body["results"][1]["status"], 404, "{body:?}");
    }
    let a = send(own_reader, running.clone()).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "{:?}",
        a.body
    );
    // A worker key reads operations of its pool, but no tenant's resources.
    let a = app
        .request(
            Method::GET,
            &format!("/v1/operations/{id}"),
            Some(&vm_a),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = app
        .request(
            Method::GET,
            &format!("/v1/operations/{id}"),
            Some(&vm_b),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = app
        .request(
            Method::GET,
            &format!("/v1/tenants/{tenant}/vms"),
            Some(&vm_a),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    let a = send(vm_a.clone(), json!({"attempt": 0, "state": "running"})).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_report")
    );
    let a = send(vm_a.clone(), json!({"attempt": 1, "state": "failed"})).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_report")
    );
    let a = send(vm_a.clone(), json!({"attempt": 1, "state": "exploded"})).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );

    let a = send(vm_a.clone(), running.clone()).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"operation_id": id, "state": "running", "attempt": 1, "cancel_requested": false})
    );
    let again = send(vm_a.clone(), running.clone()).await;
    assert_eq!(again.body, a.body, "a repeated report gets the same answer");
    // A redelivery: attempt 2 takes over, attempt 1 is stale from now on.
    let a = send(vm_a.clone(), json!({"attempt": 2, "state": "running"})).await;
    assert_eq!(a.body["attempt"], 2);
    let a = send(
        vm_a.clone(),
        json!({"attempt": 1, "state": "succeeded", "status": {}}),
    )
    .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::CONFLICT, "stale_attempt")
    );
    assert_eq!(a.body["details"]["current_attempt"], 2);

    let done = json!({"attempt": 2, "state": "succeeded", "status": {"power_state": "running"}});
    let a = send(vm_a.clone(), done.clone()).await;
    assert_eq!(a.body["state"], "succeeded");
    let a = send(vm_a.clone(), done).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "the answer to a lost ack is repeatable"
    );
    let a = send(
        vm_a.clone(),
        json!({"attempt": 2, "state": "failed", "error": {"code": "x", "message": "y"}}),
    )
    .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::CONFLICT, "operation_finished")
    );
    assert_eq!(a.body["details"]["state"], "succeeded");

    let r = app.get(&vm_path(&tenant, &op)).await;
    assert_eq!(r.body["phase"], "ready");
    assert_eq!(r.body["status"], json!({"power_state": "running"}));
    let o = app.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(o.body["attempt"], 2);
    assert!(
        o.header("retry-after").is_none(),
        "finished operations need no polling"
    );
}

#[tokio::test]
async fn workers_read_only_what_their_work_needs() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let vm_a = app
        .create(&tenant, "vms", "a", "zone-a", example_spec("vms"))
        .await;
    let vol_a = app
        .create(&tenant, "volumes", "v", "zone-a", example_spec("volumes"))
        .await;
    let path = |kind: &str, op: &Value| {
        format!(
            "/v1/tenants/{tenant}/{kind}/{}",
            op["resource_id"].as_str().unwrap()
        )
    };
    let storage_a = worker_key(&app.pool, &Service::named("storage"), "zone-a")
        .await
        .unwrap();
    let storage_b = worker_key(&app.pool, &Service::named("storage"), "zone-b")
        .await
        .unwrap();
    let vm_key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let read = |key: &str, p: String| {
        let app = &app;
        let key = key.to_owned();
        async move { app.request(Method::GET, &p, Some(&key), None).await.status }
    };
    assert_eq!(
        read(&storage_a, path("vms", &vm_a)).await,
        StatusCode::OK,
        "a volume's VM, same zone"
    );
    assert_eq!(
        read(&storage_a, path("volumes", &vol_a)).await,
        StatusCode::OK
    );
    assert_eq!(
        read(&storage_b, path("vms", &vm_a)).await,
        StatusCode::NOT_FOUND,
        "other zone"
    );
    assert_eq!(
        read(&vm_key, path("volumes", &vol_a)).await,
        StatusCode::NOT_FOUND,
        "not a VM worker's business"
    );
    assert_eq!(
        app.request(
            Method::GET,
            &format!("/v1/tenants/{tenant}/vms"),
            Some(&storage_a),
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND,
        "workers list nothing"
    );
}

/// Creates `n` VMs in zone-a; their operations' IDs.
async fn create_vms(app: &crate::common::TestApp, tenant: &str, n: usize) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let op = app
            .create(
                tenant,
                "vms",
                &format!("vm-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        ids.push(crate::common::id_of(&op));
    }
    ids
}

/// `POST /v1/reports` with `key`: the status and the results, by position.
async fn batch(
    app: &crate::common::TestApp,
    key: &str,
    reports: Vec<Value>,
) -> (StatusCode, Value) {
    let body = json!({ "reports": reports });
    let a = app
        .request(Method::POST, "/v1/reports", Some(key), Some(&body))
        .await;
    (a.status, a.body)
}

#[tokio::test]
async fn a_batch_applies_each_report_on_its_own_in_one_request() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut ops = Vec::new();
    for (name, zone) in [
        ("a", "zone-a"),
        ("b", "zone-a"),
        ("c", "zone-a"),
        ("d", "zone-b"),
    ] {
        let op = app
            .create(&tenant, "vms", name, zone, example_spec("vms"))
            .await;
        ops.push(op["id"].as_str().unwrap().to_owned());
    }
    let (a, b, c, d) = (&ops[0], &ops[1], &ops[2], &ops[3]);
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let item = |id: &str, report: Value| json!({"operation_id": id, "report": report});
    let running = json!({"attempt": 1, "state": "running"});
    let (status, body) = batch(
        &app,
        &key,
        vec![
            item(a, running.clone()),
            item(b, running.clone()),
            item(
                a,
                json!({"attempt": 1, "state": "succeeded", "status": {"ip": "10.0.0.9"}}),
            ),
            item(d, running.clone()),
            item(&unknown, running.clone()),
            item(b, json!({"attempt": 1, "state": "failed"})),
            json!({"operation_id": c, "report": running, "request_id": "follow-c-1"}),
            item(
                a,
                json!({"attempt": 1, "state": "failed", "error": {"code": "x", "message": "y"}}),
            ),
            item(b, running.clone()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    let got: Vec<(u64, &str)> = results
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (200, ""),
            (200, ""),
            (200, ""),
            (404, "not_found"),
            (404, "not_found"),
            (422, "invalid_report"),
            (200, ""),
            (409, "operation_finished"),
            (200, ""),
        ],
        "{body}"
    );
    for (r, id) in results.iter().zip([a, b, a, d, &unknown, b, c, a, b]) {
        assert_eq!(r["operation_id"], json!(id));
    }
    // Two reports on one operation apply one after the other, as two requests would.
    assert_eq!(results[2]["ack"]["state"], "succeeded");
    assert_eq!(
        results[8]["ack"],
        json!({"operation_id": b, "state": "running", "attempt": 1, "cancel_requested": false})
    );
    let state = |id: String| {
        let app = &app;
        async move { app.get(&format!("/v1/operations/{id}")).await.body["state"].clone() }
    };
    assert_eq!(state(a.clone()).await, "succeeded");
    assert_eq!(state(b.clone()).await, "running");
    assert_eq!(state(c.clone()).await, "running");
    assert_eq!(
        state(d.clone()).await,
        "pending",
        "the refused report changed nothing"
    );
    // Starts in a batch are written together, and before anything else touches their
    // operation: `a` ran, then succeeded, and its events say so in that order. No relay
    // runs here: a report on a `pending` operation shows that it was dispatched.
    let events = app.operation_events(a).await;
    assert_eq!(
        events,
        [
            "operation.created",
            "operation.pending",
            "operation.dispatched",
            "operation.running",
            "operation.succeeded"
        ]
    );
    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE id = ANY($1::uuid[]) AND started_at IS NOT NULL",
    )
    .bind(vec![
        a.parse::<uuid::Uuid>().unwrap(),
        b.parse().unwrap(),
        c.parse().unwrap(),
    ])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(started, 3, "every start is recorded");
    let vm = app.get(&format!("/v1/operations/{a}")).await.body["resource_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let vm = app
        .get(&format!("/v1/tenants/{tenant}/vms/{vm}"))
        .await
        .body;
    assert_eq!(vm["status"]["ip"], "10.0.0.9");
    assert_eq!(vm["phase"], "ready");
    // Each report is audited as the request it stands for, with the ID it carried.
    let rows: Vec<(String, Option<String>, i16, String)> = sqlx::query_as(
        "SELECT target, tenant, status, request_id FROM audit_log
         WHERE action = 'POST /v1/operations/{id}/reports' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 9, "{rows:?}");
    assert_eq!(rows[3].2, 404);
    assert_eq!(rows[4].1, None, "an unknown operation has no tenant");
    assert_eq!(rows[6].0, format!("/v1/operations/{c}/reports"));
    assert_eq!(rows[6].1.as_deref(), Some(tenant.as_str()));
    assert_eq!(rows[6].3, "follow-c-1");
    assert_eq!(rows[7].2, 409);
    let batch_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'POST /v1/reports'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(batch_rows, 0, "the reports' rows stand for the batch");
}

#[tokio::test]
async fn a_batch_must_hold_one_to_a_hundred_well_formed_reports() {
    let app = spawn_with(Options::api_only()).await;
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let report =
        json!({"operation_id": uuid::Uuid::now_v7(), "report": {"attempt": 1, "state": "running"}});
    for (reports, code) in [
        (vec![], "invalid_batch"),
        (vec![report.clone(); 101], "invalid_batch"),
        (
            vec![json!({"operation_id": "nope", "report": {"attempt": 1, "state": "running"}})],
            "invalid_body",
        ),
        // What the schema forbids refuses the whole batch, as it refuses a lone report.
        (
            vec![
                report.clone(),
                json!({"operation_id": uuid::Uuid::now_v7(), "report": {"attempt": 0, "state": "running"}}),
            ],
            "invalid_report",
        ),
        (
            vec![json!({"report": {"attempt": 1, "state": "running"}})],
            "invalid_body",
        ),
        (
            vec![
                json!({"operation_id": uuid::Uuid::now_v7(), "report": {"attempt": 1, "state": "running"}, "request_id": "no spaces"}),
            ],
            "invalid_body",
        ),
        (
            vec![
                json!({"operation_id": uuid::Uuid::now_v7(), "report": {"attempt": 1, "state": "running"}, "extra": 1}),
            ],
            "invalid_body",
        ),
    ] {
        let (status, body) = batch(&app, &key, reports).await;
        assert_eq!(
            (status, body["code"].as_str().unwrap_or("")),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{body}"
        );
    }
    let (status, body) = batch(&app, &key, vec![report.clone(); 100]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 100);
    // No key, no batch; a tenant's key is refused report by report.
    let a = app
        .request(
            Method::POST,
            "/v1/reports",
            None,
            Some(&json!({"reports": [report]})),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let owner = app
        .post(
            &format!("/v1/tenants/{tenant}/keys"),
            json!({"role": "owner"}),
        )
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = batch(
        &app,
        &owner,
        vec![json!({"operation_id": op["id"], "report": {"attempt": 1, "state": "running"}})],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["results"][0]["status"], 403, "{body}");
}

#[tokio::test]
async fn concurrent_batches_over_the_same_operations_in_any_order_all_apply() {
    // Batches lock resources in ID order, then operations: opposite orders in two
    // batches, and the relay's own multi-row pass, must not deadlock.
    let app = spawn_with(Options::api_and_relay()).await;
    let tenant = app.tenant().await;
    let ids: Vec<String> = create_vms(&app, &tenant, 24)
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let batches = (0..8).map(|n| {
        let mut order = ids.clone();
        if n % 2 == 1 {
            order.reverse();
        }
        order.rotate_left(n * 3);
        let reports = order
            .iter()
            .map(|id| json!({"operation_id": id, "report": {"attempt": 1, "state": "running"}}))
            .collect();
        let (app, key) = (&app, &key);
        async move { batch(app, key, reports).await }
    });
    for (status, body) in futures::future::join_all(batches).await {
        assert_eq!(status, StatusCode::OK, "{body}");
        for r in body["results"].as_array().unwrap() {
            assert_eq!(r["status"], 200, "{r}");
        }
    }
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE state = 'running'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(running, 24);
}

#[tokio::test]
async fn a_workers_reports_ready_at_once_go_in_one_request() {
    use workers::report::Reporter;
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let ids = create_vms(&app, &tenant, 30).await;
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let reporter = workers::batch::BatchReporter::new(
        workers::report::GatewayClient::new(&app.url, &key).unwrap(),
        64,
    );
    let running = gateway_proto::Report {
        attempt: 1,
        state: gateway_proto::ReportState::Running,
        status: None,
        error: None,
    };
    let trace = workers::report::TraceHeaders::default();
    // One report alone goes the single-report way, with its trace headers.
    let first = reporter.report(ids[0], &running, &trace).await.unwrap();
    assert!(matches!(first, workers::report::ReportOutcome::Accepted(_)));
    // The test's runtime runs one task at a time: all 29 are queued before the
    // sender looks, so they leave together.
    let answers = futures::future::join_all(
        ids[1..]
            .iter()
            .map(|id| reporter.report(*id, &running, &trace)),
    )
    .await;
    for answer in answers {
        assert!(
            matches!(answer, Ok(workers::report::ReportOutcome::Accepted(_))),
            "{answer:?}"
        );
    }
    let count = |route: &str| {
        let series =
            format!(r#"gateway_http_requests_total{{route="{route}",method="POST",status="2xx"}}"#);
        let url = app.url.clone();
        async move { crate::common::metric(&url, &series).await }
    };
    assert_eq!(count("/v1/reports").await, 1.0);
    assert_eq!(count("/v1/operations/{id}/reports").await, 1.0);
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE state = 'running'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(running, 30);
}

#[tokio::test]
async fn a_batch_the_database_fails_midway_writes_nothing_of_it() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let ids = create_vms(&app, &tenant, 2).await;
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    // The second report's write fails, as if the database died at that statement.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected report failure'; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON operations FOR EACH ROW
         WHEN (NEW.id = '{}' AND NEW.state = 'succeeded') EXECUTE FUNCTION refuse();",
        ids[1]
    ))
    .execute(&app.pool)
    .await
    .unwrap();
    let running = json!({"attempt": 1, "state": "running"});
    let (status, body) = batch(
        &app,
        &key,
        vec![
            json!({"operation_id": ids[0], "report": running, "request_id": "first"}),
            json!({"operation_id": ids[1], "report": {"attempt": 1, "state": "succeeded", "status": {}}}),
        ],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")),
        "{body}"
    );
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM operations ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        states,
        ["pending", "pending"],
        "the first report went back too"
    );
    // The request is audited once, as failed; no report's row was kept.
    app.wait_audit("action = 'POST /v1/reports' AND status = 500", 1)
        .await;
    let parts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'POST /v1/operations/{id}/reports'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(parts, 0);
    // Without the failure, the same batch applies whole.
    sqlx::raw_sql("DROP TRIGGER refuse ON operations")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, body) = batch(
        &app,
        &key,
        vec![
            json!({"operation_id": ids[0], "report": running}),
            json!({"operation_id": ids[1], "report": {"attempt": 1, "state": "succeeded", "status": {}}}),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][1]["ack"]["state"], "succeeded");
}

/// The ends of a batch are written together: each operation ends as it would alone,
/// each resource records its own outcome, and what waited behind one starts.
#[tokio::test]
async fn ends_in_one_batch_record_each_resource_and_start_what_waits_behind_it() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut ops = Vec::new();
    for name in ["x", "y", "z"] {
        let op = app
            .create(&tenant, "vms", name, "zone-a", example_spec("vms"))
            .await;
        ops.push((
            op["id"].as_str().unwrap().to_owned(),
            op["resource_id"].as_str().unwrap().to_owned(),
        ));
    }
    let ((x, vm_x), (y, vm_y), (z, vm_z)) = (&ops[0], &ops[1], &ops[2]);
    let delete_x = app
        .delete(&format!("/v1/tenants/{tenant}/vms/{vm_x}"))
        .await;
    assert_eq!(delete_x.body["state"], "queued", "{}", delete_x.body);
    let delete_x = delete_x.body["id"].as_str().unwrap().to_owned();
    let key = worker_key(&app.pool, &Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let item = |id: &str, report: Value| json!({"operation_id": id, "report": report});
    let running = json!({"attempt": 1, "state": "running"});
    let (status, body) = batch(
        &app,
        &key,
        vec![
            item(x, running.clone()),
            item(y, running.clone()),
            item(z, running),
            item(x, json!({"attempt": 1, "state": "succeeded", "status": {"ip": "10.0.0.1"}})),
            item(
                y,
                json!({"attempt": 1, "state": "failed", "error": {"code": "no_capacity", "message": "full"}}),
            ),
            item(z, json!({"attempt": 1, "state": "succeeded", "status": {"ip": "10.0.0.3"}})),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let states: Vec<(u64, &str)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["ack"]["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (200, "running"),
            (200, "running"),
            (200, "running"),
            (200, "succeeded"),
            (200, "failed"),
            (200, "succeeded")
        ]
    );
    let op = |id: String| {
        let app = &app;
        async move { app.get(&format!("/v1/operations/{id}")).await.body }
    };
    let vm = |id: String| {
        let (app, tenant) = (&app, &tenant);
        async move {
            app.get(&format!("/v1/tenants/{tenant}/vms/{id}"))
                .await
                .body
        }
    };
    assert_eq!(op(x.clone()).await["state"], "succeeded");
    let failed = op(y.clone()).await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["error"]["code"], "no_capacity");
    // x's delete waited behind its create and starts in the same transaction.
    assert_eq!(op(delete_x.clone()).await["state"], "pending");
    let message: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE msg_id = $1")
        .bind(format!("{delete_x}.1"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(message, 1, "the promoted delete has its message");
    let (vx, vy, vz) = (
        vm(vm_x.clone()).await,
        vm(vm_y.clone()).await,
        vm(vm_z.clone()).await,
    );
    assert_eq!(vx["phase"], "deleting", "{vx}");
    assert_eq!(vx["status"]["ip"], "10.0.0.1");
    assert_eq!(vy["status"]["last_error"]["code"], "no_capacity", "{vy}");
    assert_eq!(vz["phase"], "ready", "{vz}");
    assert_eq!(vz["status"]["ip"], "10.0.0.3");
    assert_eq!(vz["observed_generation"], 1, "{vz}");
    // Each operation's events, in order, as if it had been reported alone.
    for (id, last) in [
        (x, "operation.succeeded"),
        (y, "operation.failed"),
        (z, "operation.succeeded"),
    ] {
        let events = app.operation_events(id).await;
        assert_eq!(
            events,
            [
                "operation.created",
                "operation.pending",
                "operation.dispatched",
                "operation.running",
                last
            ]
        );
    }
}
