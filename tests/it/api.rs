//! The API's contract surface: OpenAPI document, health, readiness, lists.

use crate::common::{example_spec, spawn_with, vm_path, Options};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::HashSet;

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let app = spawn_with(Options::api_only()).await;
    let a = app
        .request(reqwest::Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = a.body["paths"].as_object().unwrap();
    for p in [
        "/v1/tenants/{tenant}/{kind}",
        "/v1/tenants/{tenant}/{kind}/{id}",
        "/v1/operations/{id}",
        "/v1/operations/{id}/reports",
        "/v1/tenants/{tenant}/operations",
        "/v1/tenants",
        "/v1/zones",
        "/v1/catalog/{category}",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    let schemas = a.body["components"]["schemas"].as_object().unwrap();
    for s in [
        "OperationOut",
        "ResourceOut",
        "ErrorBody",
        "VmSpec",
        "Report",
        "Dispatch",
    ] {
        assert!(schemas.contains_key(s), "missing schema {s}");
    }
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_with(Options::api_only()).await;
    let a = app
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = app
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["database"], "ok");
    assert_eq!(a.body["nats"], "ok");
}

#[tokio::test]
async fn zones_and_catalog_are_listed() {
    let app = spawn_with(Options::api_only()).await;
    let zones = app.get("/v1/zones").await;
    let names: Vec<&str> = zones
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["zone-a", "zone-b"]);
    let flavors = app.get("/v1/catalog/flavor").await;
    assert!(flavors
        .body
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "m1.small"));
    assert_eq!(
        app.get("/v1/catalog/nothing").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn pages_return_every_resource_exactly_once() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let created: HashSet<String> = app
        .create_vms(&tenant, 7)
        .await
        .iter()
        .map(|op| op["resource_id"].as_str().unwrap().to_owned())
        .collect();
    app.create(&tenant, "vms", "other-zone", "zone-b", example_spec("vms"))
        .await;
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/tenants/{tenant}/vms?zone=zone-a&limit=3");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        for item in page.body["items"].as_array().unwrap() {
            assert!(
                seen.insert(item["id"].as_str().unwrap().to_owned()),
                "seen twice: {item}"
            );
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    let ops = app
        .get(&format!("/v1/tenants/{tenant}/operations?limit=5"))
        .await;
    assert_eq!(ops.body["items"].as_array().unwrap().len(), 5);
    let next = ops.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(&format!("/v1/tenants/{tenant}/operations?cursor={next}"))
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 3);
    let _: Value = rest.body;
    // The store writes a page's limit as one of a few sizes (6 rows asked: 9 written)
    // and hands back only the rows asked for.
    let filter = gateway::store::operations::OperationFilter::default();
    for limit in [1, 3, 6, 8] {
        let rows =
            gateway::store::operations::list_for_tenant(&app.pool, &tenant, &filter, None, limit)
                .await
                .unwrap();
        assert_eq!(rows.len(), limit as usize);
    }
}

#[tokio::test]
async fn labels_are_validated_stored_and_select_resources() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let create = |name: &'static str, labels: Value| {
        let app = &app;
        let tenant = tenant.clone();
        async move {
            app.post(
                &format!("/v1/tenants/{tenant}/vms"),
                serde_json::json!({"name": name, "zone": "zone-a", "spec": example_spec("vms"), "labels": labels}),
            )
            .await
        }
    };
    let web = create("web", serde_json::json!({"env": "prod", "team": "web"})).await;
    assert_eq!(web.status, StatusCode::ACCEPTED);
    create("db", serde_json::json!({"env": "prod", "team": "db"})).await;
    create("scratch", serde_json::json!({"env": "dev"})).await;
    let bad = create("bad", serde_json::json!({"Env": "prod"})).await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_label")
    );
    assert_eq!(bad.body["details"]["field"], "labels.Env");
    let typed = create("typed", serde_json::json!({"env": 1})).await;
    assert_eq!(typed.code(), "invalid_body");

    let vm = app.get(&vm_path(&tenant, &web.body)).await;
    assert_eq!(
        vm.body["labels"],
        serde_json::json!({"env": "prod", "team": "web"})
    );
    let names = |q: &'static str| {
        let app = &app;
        let tenant = tenant.clone();
        async move {
            let page = app
                .get(&format!("/v1/tenants/{tenant}/vms?label={q}"))
                .await;
            assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
            let mut n: Vec<String> = page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect();
            n.sort();
            n
        }
    };
    assert_eq!(names("env=prod").await, ["db", "web"]);
    assert_eq!(names("env=prod,team=db").await, ["db"]);
    assert_eq!(names("env=staging").await, Vec::<String>::new());
    let bad = app
        .get(&format!("/v1/tenants/{tenant}/vms?label=env"))
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
}

/// The gateway's connections never compile a query (`jit = off`). Its transactions run
/// with `enable_seqscan = off`, which prices a whole-table scan at 10^10, past every JIT
/// threshold: a trigger's read of a one-row table was compiled anew at each call (about
/// 13 ms), and creating a tenant took some 25 ms in its two replication triggers (more
/// in a region, whose clock is a one-row table updated at every change), against 0.3 ms.
#[tokio::test]
async fn the_gateways_connections_never_compile_a_query() {
    let app = spawn_with(Options::default()).await;
    let mut tx = gateway::store::begin(&app.pool).await.unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(jit, "off");
    // The plan that was compiled: a whole-table read inside such a transaction.
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN (ANALYZE, COSTS OFF) SELECT region FROM replication_clock")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert!(!plan.iter().any(|l| l.contains("JIT")), "{plan:#?}");
}
