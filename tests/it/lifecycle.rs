//! End to end: submit → outbox → relay → JetStream → worker → report → converged
//! database, for every kind in every zone, with real PostgreSQL and NATS.

use crate::common;
use crate::common::{example_spec, spawn_app, spawn_with, Options, KINDS, ZONES};
use gateway::app::Parts;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn every_kind_in_every_zone_is_created_converges_and_is_deleted() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let mut submitted = Vec::new();
    for kind in KINDS {
        for zone in ZONES {
            let op = app
                .create(
                    &tenant,
                    kind,
                    &format!("r-{zone}"),
                    zone,
                    example_spec(kind),
                )
                .await;
            assert_eq!(op["action"], "create");
            assert!(
                ["pending", "dispatched"].contains(&op["state"].as_str().unwrap()),
                "{op}"
            );
            submitted.push((kind, zone, op));
        }
    }
    for (kind, zone, op) in &submitted {
        let done = app.wait_done(op["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "succeeded", "{kind} in {zone}: {done}");
        assert_eq!(done["attempt"], 1);
        let path = format!(
            "/v1/tenants/{tenant}/{kind}/{}",
            op["resource_id"].as_str().unwrap()
        );
        let r = app.get(&path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["phase"], "ready", "{}", r.body);
        assert_eq!(r.body["zone"], *zone);
        assert_eq!(r.body["generation"], 1);
        assert_eq!(r.body["observed_generation"], 1);
        assert!(
            r.body["status"].as_object().is_some_and(|s| !s.is_empty()),
            "{}",
            r.body
        );
        assert!(r.header("etag").is_some());
    }
    for kind in KINDS {
        let list = app.get(&format!("/v1/tenants/{tenant}/{kind}")).await;
        assert_eq!(
            list.body["items"].as_array().unwrap().len(),
            2,
            "{}",
            list.body
        );
    }
    for (kind, _, op) in &submitted {
        let path = format!(
            "/v1/tenants/{tenant}/{kind}/{}",
            op["resource_id"].as_str().unwrap()
        );
        let del = app.delete(&path).await;
        assert_eq!(del.status, StatusCode::ACCEPTED, "{}", del.body);
        assert_eq!(del.body["action"], "delete");
        let done = app.wait_done(del.body["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(app.get(&path).await.status, StatusCode::NOT_FOUND);
    }
    for kind in KINDS {
        let list = app.get(&format!("/v1/tenants/{tenant}/{kind}")).await;
        assert_eq!(list.body["items"], json!([]), "{kind}");
    }
    app.wait_outbox_empty().await;
}

#[tokio::test]
async fn a_driver_failure_fails_the_operation_and_shows_on_the_resource() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "fail-web", "zone-a", example_spec("vms"))
        .await;
    let done = app.wait_done(op["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "simulated_failure");
    let r = app.get(&common::vm_path(&tenant, &op)).await;
    assert_eq!(r.body["phase"], "failed");
    assert_eq!(r.body["status"]["last_error"]["code"], "simulated_failure");
    assert_eq!(r.body["observed_generation"], 0);
}

#[tokio::test]
async fn a_failed_resource_can_still_be_deleted() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let op = app
        .create(
            &tenant,
            "volumes",
            "fail-disk",
            "zone-b",
            example_spec("volumes"),
        )
        .await;
    app.wait_done(op["id"].as_str().unwrap()).await;
    let path = format!(
        "/v1/tenants/{tenant}/volumes/{}",
        op["resource_id"].as_str().unwrap()
    );
    // The sim driver fails every operation on `fail-` names, deletes included: the
    // resource stays, failed, and says why.
    let del = app.delete(&path).await;
    let done = app.wait_done(del.body["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    assert_eq!(app.get(&path).await.body["phase"], "failed");
}

#[tokio::test]
async fn a_delete_behind_a_running_create_waits_its_turn_then_runs() {
    // No workers: this test plays the worker through the report API, step by step.
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: false,
            workers: None,
            webhooks: false,
        },
        ..Default::default()
    })
    .await;
    let tenant = app.tenant().await;
    let create = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let path = common::vm_path(&tenant, &create);
    let del = app.delete(&path).await;
    assert_eq!(del.status, StatusCode::ACCEPTED);
    assert_eq!(del.body["state"], "queued", "{}", del.body);
    // Deleting again while the delete waits returns the same operation.
    let again = app.delete(&path).await;
    assert_eq!(again.body["id"], del.body["id"]);

    let key = gateway::app::worker_key(&app.pool, &gateway::domain::Service::named("vm"), "zone-a")
        .await
        .unwrap();
    let report = |id: &str, body: serde_json::Value| {
        let (key, id) = (key.clone(), id.to_owned());
        let app = &app;
        async move {
            app.request(
                Method::POST,
                &format!("/v1/operations/{id}/reports"),
                Some(&key),
                Some(&body),
            )
            .await
        }
    };
    let create_id = create["id"].as_str().unwrap();
    let a = report(create_id, json!({"attempt": 1, "state": "running"})).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["state"], "running");
    let a = report(
        create_id,
        json!({"attempt": 1, "state": "succeeded", "status": {"ip": "10.0.0.1"}}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    // The create's end promoted the delete in the same transaction.
    let d = app
        .wait_op(del.body["id"].as_str().unwrap(), |op| {
            op["state"] != "queued"
        })
        .await;
    assert!(
        ["pending", "dispatched"].contains(&d["state"].as_str().unwrap()),
        "{d}"
    );
    assert_eq!(app.get(&path).await.body["phase"], "deleting");
    let a = report(
        d["id"].as_str().unwrap(),
        json!({"attempt": 1, "state": "succeeded", "status": {}}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(app.get(&path).await.status, StatusCode::NOT_FOUND);
    let ops = app.get(&format!("/v1/tenants/{tenant}/operations")).await;
    let states: Vec<_> = ops.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["state"].clone())
        .collect();
    assert_eq!(states, vec![json!("succeeded"), json!("succeeded")]);
}

#[tokio::test]
async fn a_deleted_name_can_be_used_again() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let first = app
        .create(
            &tenant,
            "clusters",
            "prod",
            "zone-a",
            example_spec("clusters"),
        )
        .await;
    app.wait_done(first["id"].as_str().unwrap()).await;
    let dup = app
        .post(
            &format!("/v1/tenants/{tenant}/clusters"),
            json!({"name": "prod", "zone": "zone-b", "spec": example_spec("clusters")}),
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.code(), "name_taken");
    // The refusal names the resource that has the name.
    assert_eq!(dup.body["details"]["resource_id"], first["resource_id"]);
    let path = format!(
        "/v1/tenants/{tenant}/clusters/{}",
        first["resource_id"].as_str().unwrap()
    );
    let del = app.delete(&path).await;
    app.wait_done(del.body["id"].as_str().unwrap()).await;
    let second = app
        .create(
            &tenant,
            "clusters",
            "prod",
            "zone-b",
            example_spec("clusters"),
        )
        .await;
    assert_eq!(
        app.wait_done(second["id"].as_str().unwrap()).await["state"],
        "succeeded"
    );
}

#[tokio::test]
async fn a_volume_attaches_to_a_vm_of_the_same_tenant_and_zone() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let vm = app
        .create(&tenant, "vms", "db", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(vm["id"].as_str().unwrap()).await;
    let vm_id = vm["resource_id"].as_str().unwrap();
    let spec = json!({"size_gb": 100, "class": "nvme", "attached_to": vm_id});
    let elsewhere = app
        .post(
            &format!("/v1/tenants/{tenant}/volumes"),
            json!({"name": "data", "zone": "zone-b", "spec": spec}),
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(elsewhere.code(), "invalid_attachment");
    let other = app.tenant().await;
    let foreign = app
        .post(
            &format!("/v1/tenants/{other}/volumes"),
            json!({"name": "data", "zone": "zone-a", "spec": spec}),
        )
        .await;
    assert_eq!(foreign.code(), "invalid_attachment");
    let op = app.create(&tenant, "volumes", "data", "zone-a", spec).await;
    let done = app.wait_done(op["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["result"]["attached_to"], vm_id);
}

/// Reports, relay passes and submissions contend for the same rows: none of them may
/// deadlock or time out (a deadlock surfaces as a 500 to a worker, which retries, so
/// only the error count shows it).
#[tokio::test]
async fn heavy_contention_between_reports_and_the_relay_answers_no_errors() {
    use futures::StreamExt;
    let mut instant = common::fast_sim();
    instant.min_latency = std::time::Duration::ZERO;
    instant.max_latency = std::time::Duration::ZERO;
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            workers: Some(instant),
            webhooks: false,
        },
        ..Default::default()
    })
    .await;
    let tenant = app.tenant().await;
    let ids: Vec<String> = futures::stream::iter(0..600)
        .map(|i| {
            let (app, tenant) = (&app, &tenant);
            async move {
                let zone = if i % 2 == 0 { "zone-a" } else { "zone-b" };
                let op = app
                    .create(tenant, "vms", &format!("vm-{i}"), zone, example_spec("vms"))
                    .await;
                op["id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for id in &ids {
        assert_eq!(app.wait_done(id).await["state"], "succeeded");
    }
    let text = reqwest::get(format!("{}/metrics", app.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("gateway_http_requests_total{") && l.contains("status=\"5xx\""))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn write_transactions_plan_generically_without_table_scans_and_leave_the_connection_as_it_was(
) {
    let app = spawn_with(Options::api_only()).await;
    // One connection, so the statement after each transaction runs on the same one.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&app.config.database_url)
        .await
        .unwrap();
    let settings = "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan')";
    let defaults: (String, String) = sqlx::query_as(settings).fetch_one(&pool).await.unwrap();
    assert_eq!(defaults, ("auto".to_owned(), "on".to_owned()));
    for commit in [true, false] {
        let mut tx = gateway::store::begin(&pool).await.unwrap();
        let inside: (String, String) = sqlx::query_as(settings).fetch_one(&mut *tx).await.unwrap();
        assert_eq!(inside, ("force_generic_plan".to_owned(), "off".to_owned()));
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        let after: (String, String) = sqlx::query_as(settings).fetch_one(&pool).await.unwrap();
        assert_eq!(
            after, defaults,
            "after a transaction that committed: {commit}"
        );
    }
}
