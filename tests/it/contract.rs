//! The contract: `openapi/v1.json` is the generated document, committed, so every API
//! change is reviewed as a diff. `UPDATE_OPENAPI=1 cargo test --test it contract::`
//! rewrites it. The document must hold no dangling `$ref`, and the server must serve it.

use crate::common::{example_spec, id_of, spawn_app};
use serde_json::Value;

fn committed() -> std::path::PathBuf {
    crate::common::repo_root().join("openapi/v1.json")
}

fn generated() -> String {
    let mut text = serde_json::to_string_pretty(gateway::api::openapi::document()).unwrap();
    text.push('\n');
    text
}

/// The first line where `a` and `b` differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  committed: {x}\n  generated: {y}", i + 1);
        }
    }
    format!(
        "lengths differ ({} and {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

/// `Ok` when the committed text equals the generated one; else what differs.
pub fn compare_committed(committed: &str, generated: &str) -> Result<(), String> {
    if committed == generated {
        Ok(())
    } else {
        Err(first_difference(committed, generated))
    }
}

#[test]
fn the_committed_contract_is_the_generated_one() {
    let generated = generated();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed(), &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(committed()).unwrap_or_default();
    if let Err(diff) = compare_committed(&committed, &generated) {
        panic!(
            "openapi/v1.json is not the document the code generates ({diff}).\n\
             Review the change, then run `UPDATE_OPENAPI=1 cargo test --test it contract::` and commit the file."
        );
    }
}

#[test]
fn the_committed_contract_test_catches_a_change() {
    let generated = generated();
    let mut doc: Value = serde_json::from_str(&generated).unwrap();
    doc["components"]["schemas"]["TenantOut"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("display_name");
    let changed = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    let err = compare_committed(&generated, &changed).unwrap_err();
    assert!(err.contains("display_name"), "{err}");
}

/// Every `$ref` in `v`, with where it is.
fn refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push((at.clone(), x.as_str().unwrap_or("")));
                } else {
                    refs(x, format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_reference_resolves_and_every_route_is_described() {
    let doc = gateway::api::openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut all = Vec::new();
    refs(doc, String::new(), &mut all);
    assert!(!all.is_empty());
    let dangling: Vec<_> = all
        .iter()
        .filter(|(_, r)| !r.starts_with("#/") || doc.pointer(r.trim_start_matches('#')).is_none())
        .collect();
    assert!(dangling.is_empty(), "dangling references: {dangling:#?}");
    // Query parameters are query parameters; path parameters are in the template.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "path" {
                    let name = p["name"].as_str().unwrap();
                    assert!(
                        path.contains(&format!("{{{name}}}")),
                        "{method} {path}: {name} is not in the path"
                    );
                }
            }
            if op.get("security").is_some() {
                for status in ["401", "429", "503"] {
                    assert!(
                        op["responses"].get(status).is_some(),
                        "{method} {path}: no {status}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_schema_example_matches_its_schema() {
    let doc = gateway::api::openapi::document();
    let mut checked = 0;
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if let Some(example) = schema.get("example") {
            let mut errors = Vec::new();
            crate::common::schema::validate(schema, example, name, &mut errors);
            assert!(errors.is_empty(), "{errors:#?}");
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[tokio::test]
async fn the_server_serves_the_contract() {
    let app = spawn_app().await;
    let a = app.get("/v1/openapi.json").await;
    assert_eq!(a.status, 200);
    // The committed contract, and each registered type's schemas and routes.
    let types = gateway::registry::Registry::load(app.pool.clone())
        .await
        .unwrap();
    assert_eq!(
        a.body,
        gateway::api::openapi::document_for(&types.snapshot())
    );
    let contract = gateway::api::openapi::document();
    for (path, item) in contract["paths"].as_object().unwrap() {
        assert_eq!(&a.body["paths"][path], item, "{path}");
    }
    for (name, schema) in contract["components"]["schemas"].as_object().unwrap() {
        assert_eq!(&a.body["components"]["schemas"][name], schema, "{name}");
    }
    for name in [
        "VmSpec",
        "BmSpec",
        "ClusterSpec",
        "VolumeSpec",
        "VolumeAttachInput",
    ] {
        assert!(
            a.body["components"]["schemas"].get(name).is_some(),
            "{name}"
        );
    }
    let create = &a.body["paths"]["/v1/tenants/{tenant}/vms"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/VmCreateIn"
    );
    let mut refs_seen = Vec::new();
    crate::contract::refs(&a.body, String::new(), &mut refs_seen);
    for (at, r) in refs_seen {
        assert!(
            a.body.pointer(r.trim_start_matches('#')).is_some(),
            "{at}: {r}"
        );
    }
}

/// `scripts/contract.sh` against a live gateway: the document validates as OpenAPI 3.1
/// and schemathesis, with all its checks and phases (stateful too), finds no failure.
/// The gateway gets a tenant, a VM, an operation and a key first, so that routes about
/// one of them are reached with one that exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_failure_against_a_live_gateway() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "st-vm", "zone-a", example_spec("vms"))
        .await;
    let op_id = id_of(&op).to_string();
    let done = app.wait_done(&op_id).await;
    let resource = done["resource_id"].as_str().unwrap().to_owned();
    let key = app
        .post(
            &format!("/v1/tenants/{tenant}/keys"),
            serde_json::json!({"role": "reader"}),
        )
        .await;
    assert_eq!(key.status, 201, "{:?}", key.body);
    let widget = serde_json::json!({
        "kind": "st_widget", "plural": "st-widgets", "service": "st_widgets",
        "spec_schema": {"type": "object", "properties": {"size": {"type": "integer"}}},
        "actions": {"poke": {}}
    });
    let put = app
        .request(
            reqwest::Method::PUT,
            "/v1/resource-types/st_widget",
            Some(&app.admin_key),
            Some(&widget),
        )
        .await;
    assert_eq!(put.status, 201, "{:?}", put.body);
    let script = crate::common::repo_root().join("scripts/contract.sh");
    let mut command = tokio::process::Command::new(script);
    command
        .env("GW_URL", &app.url)
        .env("GW_KEY", &app.admin_key)
        .env("ST_TENANT", &tenant)
        .env("ST_RESOURCE", &resource)
        .env("ST_OPERATION", &op_id)
        .env("ST_KEY", key.body["id"].as_str().unwrap())
        .env("ST_KIND", "st_widget");
    let status = command.status().await.expect("scripts/contract.sh runs");
    assert!(
        status.success(),
        "schemathesis found failures (its report is above)"
    );
}
