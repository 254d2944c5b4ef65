//! Tenant quotas: admins set limits per kind and zone, writes that would pass them are
//! refused in their own transaction, deletes give room back once they succeed, and
//! owners see their quota and usage.

use crate::common::{example_spec, pg_base, spawn_with, unique, Answer, Options, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn put_quota(app: &TestApp, key: &str, tenant: &str, limits: Value) -> Answer {
    let path = format!("/v1/tenants/{tenant}/quotas");
    let body = json!({ "limits": limits });
    app.request(Method::PUT, &path, Some(key), Some(&body))
        .await
}

/// Sets `tenant`'s limits as the admin, which must succeed.
async fn set_quota(app: &TestApp, tenant: &str, limits: Value) -> Value {
    let a = put_quota(app, &app.admin_key, tenant, limits).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body
}

/// A create as the admin, answered as it comes.
async fn try_create(app: &TestApp, tenant: &str, kind: &str, name: &str, spec: Value) -> Answer {
    let body = json!({"name": name, "zone": "zone-a", "spec": spec});
    app.request(
        Method::POST,
        &format!("/v1/tenants/{tenant}/{kind}"),
        Some(&app.admin_key),
        Some(&body),
    )
    .await
}

/// A patch or action as the admin.
async fn try_change(app: &TestApp, method: Method, path: &str, body: Value) -> Answer {
    app.request(method, path, Some(&app.admin_key), Some(&body))
        .await
}

fn assert_exceeded(a: &Answer, details: Value) {
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::CONFLICT, "quota_exceeded"),
        "{:?}",
        a.body
    );
    assert_eq!(a.body["details"], details, "{:?}", a.body);
}

/// Ends operation `op` as a worker would (the admin may report): `succeeded`.
async fn succeed(app: &TestApp, op: &Value) {
    let id = op["id"].as_str().unwrap();
    let report = json!({"attempt": 1, "state": "succeeded", "status": {}});
    let a = app
        .post(&format!("/v1/operations/{id}/reports"), report)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
}

#[tokio::test]
async fn fifty_concurrent_creates_against_a_quota_of_ten_accept_exactly_ten() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    set_quota(
        &app,
        &t,
        json!([{"dimension": "count", "kind": "vm", "limit": 10}]),
    )
    .await;
    let answers = futures::future::join_all((0..50).map(|i| {
        let app = &app;
        let t = &t;
        async move { try_create(app, t, "vms", &format!("vm-{i}"), example_spec("vms")).await }
    }))
    .await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .count();
    assert_eq!(accepted, 10);
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::ACCEPTED)
        .collect();
    assert_eq!(refused.len(), 40);
    for a in refused {
        assert_exceeded(
            a,
            json!({"dimension": "count", "kind": "vm", "zone": null, "limit": 10, "used": 10, "requested": 1}),
        );
        assert!(a.body["message"].as_str().unwrap().contains("quota"));
    }
    assert_eq!(
        app.count(&format!("resources WHERE tenant = '{t}'")).await,
        10
    );
    let view = app.get(&format!("/v1/tenants/{t}/quotas")).await;
    assert_eq!(view.body["limits"][0]["used"], 10, "{:?}", view.body);
}

#[tokio::test]
async fn limits_apply_to_their_kind_and_zone_only_and_tenants_without_quotas_are_unlimited() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let free = app.tenant().await;
    set_quota(
        &app,
        &t,
        json!([{"dimension": "count", "kind": "vm", "zone": "zone-a", "limit": 1}]),
    )
    .await;
    assert_eq!(
        try_create(&app, &t, "vms", "a1", example_spec("vms"))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let again = try_create(&app, &t, "vms", "a2", example_spec("vms")).await;
    assert_exceeded(
        &again,
        json!({"dimension": "count", "kind": "vm", "zone": "zone-a", "limit": 1, "used": 1, "requested": 1}),
    );
    // Another zone, another kind, another tenant: not covered.
    app.create(&t, "vms", "b1", "zone-b", example_spec("vms"))
        .await;
    app.create(&t, "volumes", "v1", "zone-a", example_spec("volumes"))
        .await;
    for i in 0..3 {
        app.create(
            &free,
            "vms",
            &format!("f{i}"),
            "zone-a",
            example_spec("vms"),
        )
        .await;
    }
    let view = app.get(&format!("/v1/tenants/{free}/quotas")).await;
    assert_eq!(view.status, StatusCode::OK);
    assert_eq!(view.body["limits"], json!([]));
    assert_eq!(
        view.body["usage"],
        json!([{"kind": "vm", "zone": "zone-a", "count": 3, "vcpus": 3, "memory_mb": 6144, "nodes": 0, "storage_gb": 0}])
    );
}

#[tokio::test]
async fn a_change_that_grows_past_a_limit_is_refused_and_one_that_shrinks_never_is() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let storage = json!({"dimension": "storage_gb", "kind": "volume", "limit": 100});
    set_quota(
        &app,
        &t,
        json!([storage, {"dimension": "vcpus", "limit": 8}]),
    )
    .await;
    let vol = app
        .create(
            &t,
            "volumes",
            "data",
            "zone-a",
            json!({"size_gb": 60, "class": "ssd"}),
        )
        .await;
    let vol = format!(
        "/v1/tenants/{t}/volumes/{}",
        vol["resource_id"].as_str().unwrap()
    );
    // Patch and action alike: growing past the limit is refused, up to it is fine.
    let grow = try_change(&app, Method::PATCH, &vol, json!({"spec": {"size_gb": 120}})).await;
    assert_exceeded(
        &grow,
        json!({"dimension": "storage_gb", "kind": "volume", "zone": null, "limit": 100, "used": 60, "requested": 60}),
    );
    let resize = format!("{vol}/actions/resize");
    let grow = try_change(&app, Method::POST, &resize, json!({"size_gb": 101})).await;
    assert_eq!(grow.code(), "quota_exceeded", "{:?}", grow.body);
    let fits = try_change(&app, Method::POST, &resize, json!({"size_gb": 100})).await;
    assert_eq!(fits.status, StatusCode::ACCEPTED, "{:?}", fits.body);
    // A limit lowered below usage takes nothing away and refuses growth (usage that
    // shrinks while above it: the VM's resize below). A volume never shrinks.
    let lowered = json!({"dimension": "storage_gb", "kind": "volume", "limit": 50});
    let view = set_quota(
        &app,
        &t,
        json!([lowered, {"dimension": "vcpus", "limit": 8}]),
    )
    .await;
    assert_eq!(view.body_limit("storage_gb")["used"], 100);
    let shrink = try_change(&app, Method::PATCH, &vol, json!({"spec": {"size_gb": 80}})).await;
    assert_eq!(shrink.code(), "invalid_spec", "{:?}", shrink.body);
    let more = try_create(
        &app,
        &t,
        "volumes",
        "more",
        json!({"size_gb": 1, "class": "ssd"}),
    )
    .await;
    assert_exceeded(
        &more,
        json!({"dimension": "storage_gb", "kind": "volume", "zone": null, "limit": 50, "used": 100, "requested": 1}),
    );

    // vCPUs of VMs and cluster nodes count together: 1 (m1.small) + 4 (1 × m1.large).
    let vm = app
        .create(&t, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let vm = format!(
        "/v1/tenants/{t}/vms/{}",
        vm["resource_id"].as_str().unwrap()
    );
    let cluster = json!({"version": "1.31", "node_count": 1, "node_flavor": "m1.large"});
    let cluster = app.create(&t, "clusters", "k", "zone-b", cluster).await;
    let cluster = format!(
        "/v1/tenants/{t}/clusters/{}",
        cluster["resource_id"].as_str().unwrap()
    );
    let resize = format!("{vm}/actions/resize");
    let medium = try_change(&app, Method::POST, &resize, json!({"flavor": "m1.medium"})).await;
    assert_eq!(medium.status, StatusCode::ACCEPTED, "{:?}", medium.body);
    let scale = format!("{cluster}/actions/scale");
    let two = try_change(&app, Method::POST, &scale, json!({"node_count": 2})).await;
    assert_exceeded(
        &two,
        json!({"dimension": "vcpus", "kind": null, "zone": null, "limit": 8, "used": 6, "requested": 4}),
    );
    // Changes that grow no dimension pass even at the limit.
    let full = set_quota(&app, &t, json!([{"dimension": "vcpus", "limit": 6}])).await;
    assert_eq!(full.body_limit("vcpus")["used"], 6);
    for (path, body) in [
        (format!("{vm}/actions/stop"), json!({})),
        (
            format!("{vm}/actions/resize"),
            json!({"flavor": "m1.small"}),
        ),
    ] {
        let a = try_change(&app, Method::POST, &path, body).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{path}: {:?}", a.body);
    }
    let view = app.get(&format!("/v1/tenants/{t}/quotas")).await;
    assert_eq!(view.body.body_limit("vcpus")["used"], 5, "{:?}", view.body);
}

#[tokio::test]
async fn a_delete_gives_room_back_only_once_it_succeeds() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    set_quota(&app, &t, json!([{"dimension": "count", "limit": 1}])).await;
    let create = app
        .create(&t, "vms", "one", "zone-a", example_spec("vms"))
        .await;
    succeed(&app, &create).await;
    let path = format!(
        "/v1/tenants/{t}/vms/{}",
        create["resource_id"].as_str().unwrap()
    );
    let delete = app.delete(&path).await;
    assert_eq!(delete.status, StatusCode::ACCEPTED);
    // Deleting, not deleted: it still counts.
    let early = try_create(&app, &t, "volumes", "two", example_spec("volumes")).await;
    assert_exceeded(
        &early,
        json!({"dimension": "count", "kind": null, "zone": null, "limit": 1, "used": 1, "requested": 1}),
    );
    succeed(&app, &delete.body).await;
    let now = try_create(&app, &t, "volumes", "two", example_spec("volumes")).await;
    assert_eq!(now.status, StatusCode::ACCEPTED, "{:?}", now.body);
    // A create cancelled before it started never existed: its room is back at once.
    let id = now.body["id"].as_str().unwrap();
    let cancel = app
        .post(&format!("/v1/operations/{id}/cancel"), json!({}))
        .await;
    assert_eq!(cancel.body["state"], "cancelled", "{:?}", cancel.body);
    let three = try_create(&app, &t, "vms", "three", example_spec("vms")).await;
    assert_eq!(three.status, StatusCode::ACCEPTED, "{:?}", three.body);
}

#[tokio::test]
async fn with_workers_a_failed_create_still_counts_and_a_finished_delete_frees_it() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;
    set_quota(
        &app,
        &t,
        json!([{"dimension": "count", "kind": "cluster", "limit": 1}]),
    )
    .await;
    let failed = app
        .create(&t, "clusters", "fail-1", "zone-a", example_spec("clusters"))
        .await;
    let done = app.wait_done(failed["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    let refused = try_create(&app, &t, "clusters", "ok-1", example_spec("clusters")).await;
    assert_eq!(refused.code(), "quota_exceeded", "{:?}", refused.body);
    // The simulated driver fails every operation on `fail-` resources, delete included,
    // so remove it as the worker would report it.
    let path = format!(
        "/v1/tenants/{t}/clusters/{}",
        failed["resource_id"].as_str().unwrap()
    );
    let delete = app.delete(&path).await;
    let done = app.wait_done(delete.body["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "failed");
    let still = try_create(&app, &t, "clusters", "ok-1", example_spec("clusters")).await;
    assert_eq!(
        still.code(),
        "quota_exceeded",
        "a failed delete frees nothing"
    );
    // A resource the workers can delete frees its room when the delete succeeds.
    set_quota(
        &app,
        &t,
        json!([{"dimension": "count", "kind": "cluster", "limit": 2}]),
    )
    .await;
    let ok = app
        .create(&t, "clusters", "ok-1", "zone-a", example_spec("clusters"))
        .await;
    app.wait_done(ok["id"].as_str().unwrap()).await;
    let path = format!(
        "/v1/tenants/{t}/clusters/{}",
        ok["resource_id"].as_str().unwrap()
    );
    let delete = app.delete(&path).await;
    let done = app.wait_done(delete.body["id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "succeeded");
    app.create(&t, "clusters", "ok-2", "zone-a", example_spec("clusters"))
        .await;
}

#[tokio::test]
async fn a_replayed_request_returns_its_operation_not_a_quota_error() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    set_quota(&app, &t, json!([{"dimension": "count", "limit": 1}])).await;
    let send = |name: &'static str, key: &'static str| {
        let req = app
            .http
            .post(format!("{}/v1/tenants/{t}/vms", app.url))
            .bearer_auth(&app.admin_key)
            .header("idempotency-key", key)
            .json(&json!({"name": name, "zone": "zone-a", "spec": example_spec("vms")}));
        async move {
            let res = req.send().await.unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = send("web", "key-1").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, again) = send("web", "key-1").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["id"], first["id"]);
    let (status, other) = send("web-2", "key-2").await;
    assert_eq!(
        (status, other["code"].as_str()),
        (StatusCode::CONFLICT, Some("quota_exceeded"))
    );
}

#[tokio::test]
async fn owners_members_and_readers_read_the_quota_and_only_admins_set_it() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let other = app.tenant().await;
    let key = |tenant: String, role: &'static str| {
        let app = &app;
        async move {
            let a = app
                .post(&format!("/v1/tenants/{tenant}/keys"), json!({"role": role}))
                .await;
            a.body["key"].as_str().unwrap().to_owned()
        }
    };
    let limits = json!([{"dimension": "count", "limit": 5}]);
    let stored = set_quota(&app, &t, limits.clone()).await;
    assert_eq!(
        stored["limits"],
        json!([{"dimension": "count", "kind": null, "zone": null, "limit": 5, "used": 0}])
    );
    app.create(&t, "volumes", "v", "zone-b", example_spec("volumes"))
        .await;
    let path = format!("/v1/tenants/{t}/quotas");
    for role in ["owner", "member", "reader"] {
        let k = key(t.clone(), role).await;
        let a = app.request(Method::GET, &path, Some(&k), None).await;
        assert_eq!(a.status, StatusCode::OK, "{role}: {:?}", a.body);
        assert_eq!(a.body["tenant"], json!(t));
        assert_eq!(a.body["limits"][0]["used"], 1, "{role}");
        assert_eq!(
            a.body["usage"],
            json!([{"kind": "volume", "zone": "zone-b", "count": 1, "vcpus": 0, "memory_mb": 0, "nodes": 0, "storage_gb": 20}])
        );
        let a = put_quota(&app, &k, &t, json!([])).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{role}"
        );
    }
    // Another tenant's owner learns nothing, not even that the tenant exists.
    let outsider = key(other, "owner").await;
    let a = app.request(Method::GET, &path, Some(&outsider), None).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::NOT_FOUND, "tenant_not_found")
    );
    let a = put_quota(&app, &outsider, &t, json!([])).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::NOT_FOUND, "tenant_not_found")
    );
    let a = app.request(Method::GET, &path, None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Nothing above changed the quota; an empty set removes it.
    assert_eq!(app.get(&path).await.body["limits"][0]["limit"], 5);
    let cleared = set_quota(&app, &t, json!([])).await;
    assert_eq!(cleared["limits"], json!([]));
    assert_eq!(app.count("quotas").await, 0);
    // Unknown tenants, for the admin too.
    let missing = format!("/v1/tenants/nobody-{}/quotas", unique());
    assert_eq!(app.get(&missing).await.code(), "tenant_not_found");
    let a = app
        .request(
            Method::PUT,
            &missing,
            Some(&app.admin_key),
            Some(&json!({"limits": []})),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::NOT_FOUND, "tenant_not_found")
    );
}

#[tokio::test]
async fn bad_quota_bodies_are_refused_with_clear_codes_and_change_nothing() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let kept = json!([{"dimension": "vcpus", "kind": "cluster", "zone": "zone-b", "limit": 40}]);
    set_quota(&app, &t, kept).await;
    let path = format!("/v1/tenants/{t}/quotas");
    let cases = [
        (json!({}), "invalid_body", None),
        (json!({"limits": [], "extra": 1}), "invalid_body", None),
        (
            json!({"limits": [{"dimension": "count", "limit": 1, "scope": "x"}]}),
            "invalid_body",
            None,
        ),
        (
            json!({"limits": [{"dimension": "count", "limit": 1.5}]}),
            "invalid_body",
            None,
        ),
        (
            json!({"limits": [{"dimension": "count"}]}),
            "invalid_body",
            None,
        ),
        (
            json!({"limits": [{"dimension": "gpus", "limit": 1}]}),
            "invalid_quota",
            Some("limits[0].dimension"),
        ),
        (
            json!({"limits": [{"dimension": "count", "kind": "vms", "limit": 1}]}),
            "invalid_quota",
            Some("limits[0].kind"),
        ),
        (
            json!({"limits": [{"dimension": "count", "limit": -1}]}),
            "invalid_quota",
            Some("limits[0].limit"),
        ),
        (
            json!({"limits": [{"dimension": "nodes", "kind": "volume", "limit": 1}]}),
            "invalid_quota",
            Some("limits[0].dimension"),
        ),
        (
            json!({"limits": [{"dimension": "count", "limit": 1}, {"dimension": "count", "kind": null, "limit": 2}]}),
            "invalid_quota",
            Some("limits[1]"),
        ),
        (
            json!({"limits": [{"dimension": "count", "limit": 1}, {"dimension": "count", "zone": "zone-z", "limit": 2}]}),
            "unknown_zone",
            Some("limits[1].zone"),
        ),
    ];
    for (body, code, field) in cases {
        let a = app
            .request(Method::PUT, &path, Some(&app.admin_key), Some(&body))
            .await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{body}: {:?}",
            a.body
        );
        if let Some(field) = field {
            assert_eq!(a.body["details"]["field"], field, "{body}");
        }
    }
    let view = app.get(&path).await;
    assert_eq!(view.body["limits"][0]["limit"], 40, "{:?}", view.body);
    assert_eq!(view.body["limits"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn rejections_and_how_full_limits_get_are_in_the_metrics() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    set_quota(
        &app,
        &t,
        json!([{"dimension": "count", "kind": "vm", "limit": 2}, {"dimension": "storage_gb", "limit": 10}]),
    )
    .await;
    app.create(&t, "vms", "a", "zone-a", example_spec("vms"))
        .await;
    app.create(&t, "vms", "b", "zone-a", example_spec("vms"))
        .await;
    try_create(&app, &t, "vms", "c", example_spec("vms")).await;
    try_create(
        &app,
        &t,
        "volumes",
        "v",
        json!({"size_gb": 11, "class": "ssd"}),
    )
    .await;
    let text = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series}:\n{text}"));
        line[series.len()..].trim().parse().unwrap()
    };
    assert_eq!(
        value(r#"gateway_quota_rejections_total{service="vm",dimension="count"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gateway_quota_rejections_total{service="storage",dimension="storage_gb"}"#),
        1.0
    );
    assert_eq!(
        value(r#"gateway_quota_rejections_total{service="k8s",dimension="nodes"}"#),
        0.0
    );
    // Two accepted creates filled the VM count limit to 1/2, then 2/2.
    assert_eq!(
        value(r#"gateway_quota_usage_ratio_count{dimension="count"}"#),
        2.0
    );
    assert_eq!(
        value(r#"gateway_quota_usage_ratio_sum{dimension="count"}"#),
        1.5
    );
    assert_eq!(
        value(r#"gateway_quota_usage_ratio_bucket{le="0.5",dimension="count"}"#),
        1.0
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("gateway_quota"))
            .all(|l| !l.contains(&t) && !l.contains("tenant")),
        "no tenant in quota series"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_the_quota_routes() {
    let app = spawn_with(Options::api_only()).await;
    let doc = app
        .request(Method::GET, "/v1/openapi.json", None, None)
        .await
        .body;
    let route = &doc["paths"]["/v1/tenants/{tenant}/quotas"];
    assert!(
        route["get"].is_object() && route["put"].is_object(),
        "{route}"
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "QuotasIn",
        "QuotasOut",
        "LimitIn",
        "LimitOut",
        "UsageOut",
        "Dimension",
    ] {
        assert!(schemas.contains_key(s), "missing schema {s}");
    }
}

/// Resources created before migration 0007 get what they consume from the migration
/// itself, by the same rule the gateway applies to new ones.
#[tokio::test]
async fn the_migration_records_what_existing_resources_consume() {
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", pg_base()))
        .await
        .unwrap();
    let database = format!("gwtest_{}", unique());
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&admin)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&format!("{}/{database}", pg_base()))
        .await
        .unwrap();
    let dir = crate::common::repo_root().join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (before, after): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|p| p.file_name().unwrap().to_str().unwrap() < "0007");
    for file in &before {
        let sql = std::fs::read_to_string(file).unwrap();
        sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO tenants (id) VALUES ('old');
         INSERT INTO resources (id, tenant, kind, zone, name, spec, phase, deleted_at) VALUES
           (gen_random_uuid(), 'old', 'vm', 'zone-a', 'vm', '{\"flavor\": \"m1.large\", \"image\": \"debian-12\"}', 'ready', NULL),
           (gen_random_uuid(), 'old', 'cluster', 'zone-a', 'k', '{\"version\": \"1.31\", \"node_count\": 3, \"node_flavor\": \"m1.medium\"}', 'ready', NULL),
           (gen_random_uuid(), 'old', 'volume', 'zone-b', 'v', '{\"size_gb\": 40, \"class\": \"ssd\"}', 'ready', NULL),
           (gen_random_uuid(), 'old', 'bm', 'zone-b', 'b', '{\"machine_class\": \"bm.gpu\", \"image\": \"debian-12\"}', 'ready', NULL),
           (gen_random_uuid(), 'old', 'vm', 'zone-a', 'gone', '{\"flavor\": \"m1.xlarge\", \"image\": \"debian-12\"}', 'deleted', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    for file in &after {
        let sql = std::fs::read_to_string(file).unwrap();
        sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
    }
    let usage = gateway::store::quotas::usage(&pool, "old").await.unwrap();
    let got: Vec<_> = usage
        .iter()
        .map(|u| (u.kind.as_str(), u.zone.as_str(), u.amounts))
        .collect();
    let amounts = |count, vcpus, memory_mb, nodes, storage_gb| gateway::domain::quota::Amounts {
        count,
        vcpus,
        memory_mb,
        nodes,
        storage_gb,
    };
    assert_eq!(
        got,
        [
            ("bm", "zone-b", amounts(1, 0, 0, 0, 0)),
            ("cluster", "zone-a", amounts(1, 6, 12288, 3, 0)),
            ("vm", "zone-a", amounts(1, 4, 8192, 0, 0)),
            ("volume", "zone-b", amounts(1, 0, 0, 0, 40)),
        ]
    );
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}

/// The limit of `dimension` in a quota answer.
trait LimitOf {
    fn body_limit(&self, dimension: &str) -> &Value;
}

impl LimitOf for Value {
    fn body_limit(&self, dimension: &str) -> &Value {
        self["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["dimension"] == dimension)
            .unwrap_or_else(|| panic!("no {dimension} limit in {self}"))
    }
}

/// Whole numbers written as decimals (`50.0`) are the integers they are: they count
/// against quotas (an outside probe had a 50-node cluster and a 16,000 GB volume pass
/// limits of 5 and 100, counted as 0, and then a scale down refused), and are stored
/// and shown as integers.
#[tokio::test]
async fn whole_decimals_count_against_quotas_as_the_integers_they_are() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    set_quota(
        &app,
        &t,
        json!([{"dimension": "nodes", "limit": 5}, {"dimension": "storage_gb", "limit": 100}]),
    )
    .await;
    let mut cluster = example_spec("clusters");
    cluster["node_count"] = json!(50.0);
    let a = try_create(&app, &t, "clusters", "c-big", cluster.clone()).await;
    assert_eq!(a.code(), "quota_exceeded", "{:?}", a.body);
    let a = try_create(
        &app,
        &t,
        "volumes",
        "v-big",
        json!({"size_gb": 16000.0, "class": "ssd"}),
    )
    .await;
    assert_eq!(a.code(), "quota_exceeded", "{:?}", a.body);
    cluster["node_count"] = json!(2.0);
    let a = try_create(&app, &t, "clusters", "c-ok", cluster).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    let resource = a.body["resource_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/tenants/{t}/clusters/{resource}");
    let read = app.get(&path).await;
    assert!(read.body["spec"]["node_count"].is_i64(), "{:?}", read.body);
    assert_eq!(read.body["spec"]["node_count"], json!(2));
    let view = app.get(&format!("/v1/tenants/{t}/quotas")).await;
    let nodes = view.body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["dimension"] == "nodes")
        .unwrap()
        .clone();
    assert_eq!(nodes["used"], json!(2), "{:?}", view.body);
    succeed(&app, &a.body).await;
    let a = try_change(
        &app,
        Method::POST,
        &format!("{path}/actions/scale"),
        json!({"node_count": 6.0}),
    )
    .await;
    assert_eq!(a.code(), "quota_exceeded", "{:?}", a.body);
}
