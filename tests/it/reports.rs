//! Workers' reports: scoped keys, forward-only transitions, harmless repeats.

use crate::common::{example_spec, spawn_with, Options};
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
    for other in [&vm_b, &storage_a] {
        let a = send(other.clone(), running.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{:?}",
            a.body
        );
    }
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

    let r = app
        .get(&format!(
            "/v1/tenants/{tenant}/vms/{}",
            op["resource_id"].as_str().unwrap()
        ))
        .await;
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
