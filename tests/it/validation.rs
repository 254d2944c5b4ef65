//! Bad input gets a clear 4xx with a stable code, and nothing is written.

use crate::common::{example_spec, spawn_with, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn invalid_creates_are_refused_with_a_code_and_write_nothing() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let vm = |zone: &str, spec: Value| json!({"name": "web", "zone": zone, "spec": spec});
    let cases: Vec<(&str, Value, StatusCode, &str, Option<&str>)> = vec![
        (
            "vms",
            vm("zone-a", json!({"flavor": "m9.huge", "image": "debian-12"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_catalog_item",
            Some("spec.flavor"),
        ),
        (
            "vms",
            vm(
                "zone-a",
                json!({"flavor": "m1.small", "image": "windows-95"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_catalog_item",
            Some("spec.image"),
        ),
        (
            "vms",
            vm("zone-q", example_spec("vms")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_zone",
            Some("zone"),
        ),
        (
            "vms",
            vm(
                "zone-a",
                json!({"flavor": "m1.small", "image": "debian-12", "gpus": 2}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec"),
        ),
        (
            "vms",
            vm("zone-a", json!({"flavor": "m1.small"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec"),
        ),
        (
            "vms",
            json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms"), "color": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
        ),
        (
            "vms",
            json!({"zone": "zone-a", "spec": example_spec("vms")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            None,
        ),
        (
            "vms",
            json!({"name": "Web_1", "zone": "zone-a", "spec": example_spec("vms")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            Some("name"),
        ),
        (
            "volumes",
            vm("zone-a", json!({"size_gb": 0, "class": "ssd"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.size_gb"),
        ),
        (
            "volumes",
            vm("zone-a", json!({"size_gb": 20000, "class": "ssd"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.size_gb"),
        ),
        (
            "volumes",
            vm("zone-a", json!({"size_gb": 5, "class": "hdd"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.size_gb"),
        ),
        (
            "volumes",
            vm("zone-a", json!({"size_gb": 20, "class": "tape"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_catalog_item",
            Some("spec.class"),
        ),
        (
            "volumes",
            vm(
                "zone-a",
                json!({"size_gb": 20, "class": "ssd", "attached_to": uuid::Uuid::nil()}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_attachment",
            Some("spec.attached_to"),
        ),
        (
            "clusters",
            vm(
                "zone-a",
                json!({"version": "1.31", "node_count": 0, "node_flavor": "m1.large"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.node_count"),
        ),
        (
            "clusters",
            vm(
                "zone-a",
                json!({"version": "0.9", "node_count": 3, "node_flavor": "m1.large"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_catalog_item",
            Some("spec.version"),
        ),
        (
            "bare-metal",
            vm(
                "zone-a",
                json!({"machine_class": "bm.tiny", "image": "debian-12"}),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_catalog_item",
            Some("spec.machine_class"),
        ),
    ];
    for (kind, body, status, code, field) in cases {
        let a = app
            .post(&format!("/v1/tenants/{tenant}/{kind}"), body.clone())
            .await;
        assert_eq!(a.status, status, "{body}: {:?}", a.body);
        assert_eq!(a.code(), code, "{body}: {:?}", a.body);
        assert!(!a.body["message"].as_str().unwrap_or("").is_empty());
        if let Some(field) = field {
            assert_eq!(a.body["details"]["field"], field, "{body}");
        }
        assert_eq!(a.body["request_id"].as_str(), a.header("x-request-id"));
    }
    for table in ["resources", "operations", "outbox"] {
        assert_eq!(app.count(table).await, 0, "{table} must stay empty");
    }
}

#[tokio::test]
async fn malformed_and_mistyped_requests_get_their_own_codes() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let url = format!("{}/v1/tenants/{tenant}/vms", app.url);
    let send = |body: &'static str, content_type: Option<&'static str>| {
        let mut req = app.http.post(&url).bearer_auth(&app.admin_key).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = send("{\"name\": \"web\",", Some("application/json")).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("malformed_json"))
    );
    // An array is no object, even one holding the fields in order (serde would read it
    // as the struct: an outside probe created a VM, a tenant and a key that way, and
    // wiped a tenant's quota limits with `[[]]`).
    for body in [
        "[1, 2]",
        r#"["web", "zone-a", {"flavor": "m1.small", "image": "debian-12"}, {}]"#,
        "[[]]",
    ] {
        let (s, b) = send(body, Some("application/json")).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")),
            "{body}"
        );
    }
    // Nested past serde_json's own limit (128): too complex, as past ours (16).
    let deep: &'static str = Box::leak(
        format!(
            r#"{{"name": "web", "zone": "zone-a", "spec": {}{}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        )
        .into_boxed_str(),
    );
    let (s, b) = send(deep, Some("application/json")).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body_too_complex"))
    );
    let (s, b) = send("{}", None).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );
    let big: &'static str =
        Box::leak(format!("{{\"name\": \"{}\"}}", "x".repeat(100_000)).into_boxed_str());
    let (s, b) = send(big, Some("application/json")).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    assert_eq!(app.count("resources").await, 0);
}

#[tokio::test]
async fn unknown_tenants_kinds_ids_and_keys_are_told_apart() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let body = json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")});
    let a = app.post("/v1/tenants/nobody/vms", body.clone()).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::NOT_FOUND, "tenant_not_found")
    );
    let a = app
        .post(&format!("/v1/tenants/{tenant}/toasters"), body.clone())
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
    let a = app
        .get(&format!("/v1/tenants/{tenant}/vms/not-a-uuid"))
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
    let a = app
        .get(&format!(
            "/v1/tenants/{tenant}/vms/{}",
            uuid::Uuid::now_v7()
        ))
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
    let a = app
        .get(&format!("/v1/operations/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"));
    let a = app
        .request(
            Method::POST,
            &format!("/v1/tenants/{tenant}/vms"),
            None,
            Some(&body),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let a = app
        .request(
            Method::POST,
            &format!("/v1/tenants/{tenant}/vms"),
            Some("gw_wrong"),
            Some(&body),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let a = app.get(&format!("/v1/tenants/{tenant}/vms?limit=0")).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let a = app
        .get(&format!("/v1/tenants/{tenant}/vms?cursor=zzz"))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_REQUEST, "invalid_cursor")
    );
    let a = app
        .get(&format!("/v1/tenants/{tenant}/vms?colour=red"))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let a = app
        .request(Method::PUT, "/v1/tenants", Some(&app.admin_key), None)
        .await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let a = app.post("/v1/tenants", json!({"id": tenant})).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::CONFLICT, "tenant_exists")
    );
    let a = app.post("/v1/tenants", json!({"id": "Bad Name"})).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_name")
    );
    assert_eq!(app.count("resources").await, 0);
}

#[tokio::test]
async fn a_client_request_id_is_echoed_and_recorded_on_the_operation() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let res = app
        .http
        .post(format!("{}/v1/tenants/{tenant}/vms", app.url))
        .bearer_auth(&app.admin_key)
        .header("x-request-id", "client-chosen-42")
        .json(&json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()["x-request-id"], "client-chosen-42");
    assert!(res.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/v1/operations/"));
    assert_eq!(res.headers()["retry-after"], "1");
    let op: Value = res.json().await.unwrap();
    assert_eq!(op["request_id"], "client-chosen-42");
    let headers: Value = sqlx::query_scalar("SELECT headers FROM outbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(headers["X-Request-Id"], "client-chosen-42");
}

/// A volume's size and a cluster's version only grow, through `PATCH` as through their
/// `resize` and `upgrade` actions (an outside probe shrank a volume from 100 to 10 GB,
/// and moved a cluster back to an older version, with a `PATCH`).
#[tokio::test]
async fn a_patch_can_neither_shrink_a_volume_nor_downgrade_a_cluster() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let patch = |path: String, spec: Value| {
        let app = &app;
        async move {
            app.request(
                Method::PATCH,
                &path,
                Some(&app.admin_key),
                Some(&json!({"spec": spec})),
            )
            .await
        }
    };
    let volume = app
        .create(
            &tenant,
            "volumes",
            "v",
            "zone-a",
            json!({"size_gb": 100, "class": "ssd"}),
        )
        .await;
    let path = format!(
        "/v1/tenants/{tenant}/volumes/{}",
        volume["resource_id"].as_str().unwrap()
    );
    let a = patch(path.clone(), json!({"size_gb": 10})).await;
    assert_eq!(
        (a.status, a.code(), a.body["details"]["field"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.size_gb")
        ),
        "{:?}",
        a.body
    );
    let a = patch(path.clone(), json!({"size_gb": 100})).await;
    assert_eq!(
        a.status,
        StatusCode::ACCEPTED,
        "the same size: {:?}",
        a.body
    );
    let a = patch(path, json!({"size_gb": 200})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);

    let cluster = app
        .create(&tenant, "clusters", "c", "zone-a", example_spec("clusters"))
        .await;
    let path = format!(
        "/v1/tenants/{tenant}/clusters/{}",
        cluster["resource_id"].as_str().unwrap()
    );
    let a = patch(path.clone(), json!({"version": "1.29"})).await;
    assert_eq!(
        (a.status, a.code(), a.body["details"]["field"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            Some("spec.version")
        ),
        "{:?}",
        a.body
    );
    // Other fields still change either way: a cluster scales down.
    let a = patch(path, json!({"node_count": 1})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
}

/// An action's body is optional, but one that is sent is JSON and says so.
#[tokio::test]
async fn an_action_body_sent_must_be_json() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let vm = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let url = format!(
        "{}/v1/tenants/{tenant}/vms/{}/actions/reboot",
        app.url,
        vm["resource_id"].as_str().unwrap()
    );
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = app.http.post(&url).bearer_auth(&app.admin_key).body("{}");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        let b: Value = res.json().await.unwrap();
        assert_eq!(b["code"], "unsupported_media_type");
    }
    // No body at all: the action's input is empty (the VM is not running yet: the
    // action is queued behind its create, or refused for its state, never 415).
    let res = app
        .http
        .post(&url)
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_ne!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}
