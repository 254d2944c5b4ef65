//! Labels change by `PATCH` (issue 11 §6): set and remove keys with a merge patch,
//! validated like labels on create; metadata moves the ETag, not the generation.

use crate::common::{example_spec, spawn_with, Options};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn labels_change_by_patch_and_bad_ones_are_refused() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;
    let created = app
        .post(
            &format!("/v1/tenants/{t}/vms"),
            json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms"),
                   "labels": {"env": "dev", "team": "a"}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{:?}", created.body);
    let id = created.body["resource_id"].as_str().unwrap().to_owned();
    app.wait_done(created.body["id"].as_str().unwrap()).await;
    let path = format!("/v1/tenants/{t}/vms/{id}");
    let before = app.get(&path).await;
    let patch = |body: serde_json::Value| {
        let path = path.clone();
        let app = &app;
        async move {
            app.request(Method::PATCH, &path, Some(&app.admin_key), Some(&body))
                .await
        }
    };

    let changed = patch(json!({"labels": {"env": "prod", "team": null, "tier": "web"}})).await;
    assert_eq!(changed.status, StatusCode::ACCEPTED, "{:?}", changed.body);
    app.wait_done(changed.body["id"].as_str().unwrap()).await;
    let after = app.get(&path).await;
    assert_eq!(after.body["labels"], json!({"env": "prod", "tier": "web"}));
    assert_eq!(
        after.body["generation"], before.body["generation"],
        "metadata only"
    );
    assert_ne!(after.header("etag"), before.header("etag"));
    let listed = app
        .get(&format!("/v1/tenants/{t}/vms?label=env=prod"))
        .await;
    assert_eq!(
        listed.body["items"].as_array().unwrap().len(),
        1,
        "{:?}",
        listed.body
    );

    // Bad labels are refused with the field, and change nothing.
    let bad = patch(json!({"labels": {"Env": "x"}})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.code(), "invalid_label");
    assert_eq!(bad.body["details"]["field"], "labels.Env");
    let too_many: serde_json::Map<String, serde_json::Value> =
        (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    let bad = patch(json!({"labels": too_many})).await;
    assert_eq!(bad.code(), "invalid_label", "{:?}", bad.body);
    assert_eq!(app.get(&path).await.body["labels"], after.body["labels"]);

    // A patch must say what it changes.
    let empty = patch(json!({})).await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(empty.code(), "invalid_body");

    // Spec and labels in one patch.
    let both = patch(json!({"spec": {"flavor": "m1.large"}, "labels": {"size": "large"}})).await;
    assert_eq!(both.status, StatusCode::ACCEPTED, "{:?}", both.body);
    app.wait_done(both.body["id"].as_str().unwrap()).await;
    let vm = app.get(&path).await;
    assert_eq!(vm.body["spec"]["flavor"], "m1.large");
    assert_eq!(vm.body["labels"]["size"], "large");
}
