//! Resource types as data (issue 15): a kind registered through `/v1/resource-types`
//! works end to end with no gateway code — routes, validation with JSON pointers,
//! actions, quotas, events, the served contract and a worker with the exec driver — and
//! a registered type may only widen, served at once by every replica.

use crate::common::{nats_url, pg_base, spawn_with, Answer, Options, TestApp};
use crate::common::{Deployment, Gateway};
use gateway::app::Parts;
use gateway_proto::Service;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The walkthrough's load balancer type (`examples/resource-types/loadbalancer.json`).
fn loadbalancer() -> Value {
    let path = crate::common::repo_root().join("examples/resource-types/loadbalancer.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The walkthrough's driver program (`examples/drivers/loadbalancer.py`).
fn driver() -> std::path::PathBuf {
    crate::common::repo_root().join("examples/drivers/loadbalancer.py")
}

async fn put_type(app: &TestApp, def: &Value) -> Answer {
    let path = format!("/v1/resource-types/{}", def["kind"].as_str().unwrap());
    app.request(Method::PUT, &path, Some(&app.admin_key), Some(def))
        .await
}

/// A `network` worker pool in `zone-a` with the exec driver running [`driver`].
async fn exec_worker(app: &TestApp, stop: CancellationToken) {
    let service = Service::named("network");
    let key = gateway::app::worker_key(&app.pool, &service, "zone-a")
        .await
        .unwrap();
    let config = app.pool_config(service, key);
    let driver = workers::ExecDriver::new(driver(), vec![]);
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    tokio::spawn(async move {
        workers::run_pool(js, config, driver, stop).await.unwrap();
    });
}

async fn done(app: &TestApp, a: Answer) -> Value {
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    let op = app.wait_done(a.body["id"].as_str().unwrap()).await;
    assert_eq!(op["state"], "succeeded", "{op}");
    op
}

#[tokio::test]
async fn a_registered_kind_works_end_to_end_with_an_exec_worker() {
    let app = spawn_with(Options {
        parts: Parts {
            api: true,
            relay: true,
            reconciler: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let registered = put_type(&app, &loadbalancer()).await;
    assert_eq!(
        registered.status,
        StatusCode::CREATED,
        "{:?}",
        registered.body
    );
    assert_eq!(registered.body["version"], 1);
    let stop = CancellationToken::new();
    exec_worker(&app, stop.clone()).await;
    let t = app.tenant().await;
    let lbs = format!("/v1/tenants/{t}/load-balancers");
    // A VM to point at: live (still provisioning, no VM workers run here) is enough.
    let vm = app
        .post(
            &format!("/v1/tenants/{t}/vms"),
            json!({"name": "web", "zone": "zone-a",
            "spec": {"flavor": "m1.small", "image": "debian-12"}}),
        )
        .await;
    let vm_id = vm.body["resource_id"].as_str().unwrap().to_owned();

    // Bad specs name the failing field as a JSON pointer; nothing is written.
    let body = |spec: Value| json!({"name": "front", "zone": "zone-a", "spec": spec});
    for (spec, code, pointer) in [
        (
            json!({"vm": vm_id, "port": 0}),
            "invalid_spec",
            "/spec/port",
        ),
        (
            json!({"vm": vm_id, "port": "443"}),
            "invalid_spec",
            "/spec/port",
        ),
        (json!({"vm": vm_id}), "invalid_spec", "/spec"),
        (
            json!({"vm": vm_id, "port": 443, "tls": true}),
            "invalid_spec",
            "/spec",
        ),
        (
            json!({"vm": uuid::Uuid::now_v7(), "port": 443}),
            "invalid_reference",
            "/spec/vm",
        ),
        (
            json!({"vm": "not-an-id", "port": 443}),
            "invalid_spec",
            "/spec/vm",
        ),
    ] {
        let a = app.post(&lbs, body(spec.clone())).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{spec}: {:?}",
            a.body
        );
        assert_eq!(a.body["details"]["pointer"], pointer, "{spec}");
    }
    assert_eq!(app.count("resources").await, 1, "only the VM");

    // Create, patch, act, delete: each operation runs on the exec driver.
    let created = done(
        &app,
        app.post(&lbs, body(json!({"vm": vm_id, "port": 443})))
            .await,
    )
    .await;
    let id = created["resource_id"].as_str().unwrap();
    let lb = app.get(&format!("{lbs}/{id}")).await;
    assert_eq!(lb.body["kind"], "loadbalancer");
    assert_eq!(lb.body["phase"], "ready");
    assert_eq!(
        lb.body["spec"]["scheme"], "internal",
        "the default is filled in"
    );
    assert_eq!(
        lb.body["status"]["port"], 443,
        "the driver's status: {:?}",
        lb.body
    );
    let (app_ref, lbs_ref) = (&app, &lbs);
    let patch = |spec: Value| async move {
        let path = format!("{lbs_ref}/{id}");
        let body = json!({"spec": spec});
        app_ref
            .request(Method::PATCH, &path, Some(&app_ref.admin_key), Some(&body))
            .await
    };
    done(&app, patch(json!({"port": 8443})).await).await;
    // The operations semantics every kind has: If-Match, labels, Idempotency-Key.
    let path = format!("{lbs}/{id}");
    let stale = app
        .http
        .patch(format!("{}{path}", app.url))
        .bearer_auth(&app.admin_key)
        .header("If-Match", "\"999\"")
        .json(&json!({"labels": {"env": "prod"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let labelled = app
        .request(
            Method::PATCH,
            &path,
            Some(&app.admin_key),
            Some(&json!({"labels": {"env": "prod"}})),
        )
        .await;
    done(&app, labelled).await;
    assert_eq!(app.get(&path).await.body["labels"]["env"], "prod");
    let keyed = || {
        app.http
            .post(format!("{}{lbs}", app.url))
            .bearer_auth(&app.admin_key)
            .header("Idempotency-Key", "lb-twice")
            .json(&json!({"name": "twice", "zone": "zone-a", "spec": {"vm": vm_id, "port": 80}}))
            .send()
    };
    let first: Value = keyed().await.unwrap().json().await.unwrap();
    let second: Value = keyed().await.unwrap().json().await.unwrap();
    assert_eq!(
        first["id"], second["id"],
        "the same operation, one resource"
    );
    app.wait_done(first["id"].as_str().unwrap()).await;
    done(
        &app,
        app.delete(&format!("{lbs}/{}", first["resource_id"].as_str().unwrap()))
            .await,
    )
    .await;
    let immutable = patch(json!({"scheme": "public"})).await;
    assert_eq!(
        (immutable.status, immutable.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "immutable_field")
    );
    assert_eq!(immutable.body["details"]["pointer"], "/spec/scheme");
    let action = |name: &str, input: Value| {
        let path = format!("{lbs_ref}/{id}/actions/{name}");
        async move { app_ref.post(&path, input).await }
    };
    let drained = done(&app, action("drain", json!({})).await).await;
    assert_eq!(drained["result"]["draining"], true, "{drained}");
    done(&app, action("set_port", json!({"port": 9000})).await).await;
    let lb = app.get(&format!("{lbs}/{id}")).await;
    assert_eq!(
        (
            lb.body["spec"]["port"].clone(),
            lb.body["generation"].clone()
        ),
        (json!(9000), json!(3))
    );
    let bad_input = action("set_port", json!({"port": "x"})).await;
    assert_eq!(
        (bad_input.status, bad_input.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    let unknown = action("reboot", json!({})).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "unknown_action")
    );

    // Quotas and events cover the new kind as any other.
    let quota = json!({"limits": [{"dimension": "count", "kind": "loadbalancer", "limit": 1}]});
    let set = app
        .request(
            Method::PUT,
            &format!("/v1/tenants/{t}/quotas"),
            Some(&app.admin_key),
            Some(&quota),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let second = app
        .post(
            &lbs,
            json!({"name": "back", "zone": "zone-a", "spec": {"vm": vm_id, "port": 80}}),
        )
        .await;
    assert_eq!(
        (second.status, second.code()),
        (StatusCode::CONFLICT, "quota_exceeded")
    );
    let nodes = json!({"limits": [{"dimension": "nodes", "kind": "loadbalancer", "limit": 1}]});
    let wrong = app
        .request(
            Method::PUT,
            &format!("/v1/tenants/{t}/quotas"),
            Some(&app.admin_key),
            Some(&nodes),
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_quota")
    );

    done(&app, app.delete(&format!("{lbs}/{id}")).await).await;
    assert_eq!(
        app.get(&format!("{lbs}/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    let events = crate::common::eventually("the load balancer's events", || async {
        let page = app
            .get(&format!("/v1/tenants/{t}/events?kind=loadbalancer"))
            .await;
        let types: Vec<String> = page.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["type"].as_str().unwrap_or("").to_owned())
            .collect();
        types
            .contains(&"resource.deleted".to_string())
            .then_some(page)
    })
    .await;
    let first = &events.body["items"][0];
    assert_eq!(first["kind"], "loadbalancer");
    assert!(
        first["subject"]
            .as_str()
            .unwrap()
            .starts_with("operations/")
            || first["subject"]
                .as_str()
                .unwrap()
                .starts_with("load-balancers/")
    );

    // The served contract has the kind's schemas and routes.
    let doc = app.get("/v1/openapi.json").await.body;
    assert_eq!(
        doc["components"]["schemas"]["LoadbalancerSpec"]["properties"]["port"]["maximum"],
        65535
    );
    assert!(doc["components"]["schemas"]
        .get("LoadbalancerSetPortInput")
        .is_some());
    assert!(doc["paths"]
        .get("/v1/tenants/{tenant}/load-balancers/{id}/actions/drain")
        .is_some());
    stop.cancel();
}

#[tokio::test]
async fn a_type_may_only_widen_and_every_replica_serves_a_change_at_once() {
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let (a, b) = (Gateway::serve(&d.env).await, Gateway::serve(&d.env).await);
    let (ca, cb) = (d.client(&a.url()), d.client(&b.url()));
    let mut lb = loadbalancer();
    let put = |c: &crate::common::Client, def: Value| {
        let c = c.clone();
        async move {
            let path = format!("/v1/resource-types/{}", def["kind"].as_str().unwrap());
            c.request(Method::PUT, &path, Some(&c.admin_key), Some(&def))
                .await
        }
    };
    assert_eq!(put(&ca, lb.clone()).await.status, StatusCode::CREATED);
    let t = d.tenant(&b.url()).await;
    let vm = cb
        .post(
            &format!("/v1/tenants/{t}/vms"),
            json!({"name": "web", "zone": "zone-a",
        "spec": {"flavor": "m1.small", "image": "debian-12"}}),
        )
        .await;
    let vm_id = vm.body["resource_id"].as_str().unwrap().to_owned();
    let made = cb
        .post(
            &format!("/v1/tenants/{t}/load-balancers"),
            json!({"name": "one", "zone": "zone-a",
        "spec": {"vm": vm_id, "port": 443}}),
        )
        .await;
    assert_eq!(
        made.status,
        StatusCode::ACCEPTED,
        "replica B serves a kind registered on A: {:?}",
        made.body
    );

    // Breaking changes are refused, and change nothing.
    let mut removed = lb.clone();
    removed["spec_schema"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("scheme");
    let mut narrowed = lb.clone();
    narrowed["spec_schema"]["properties"]["port"]["maximum"] = json!(1024);
    let mut required = lb.clone();
    required["spec_schema"]["properties"]["tls"] = json!({"type": "boolean"});
    required["spec_schema"]["required"] = json!(["vm", "port", "tls"]);
    let mut no_action = lb.clone();
    no_action["actions"]
        .as_object_mut()
        .unwrap()
        .remove("drain");
    for (def, field) in [
        (removed, "spec_schema.properties.scheme"),
        (narrowed, "spec_schema.properties.port.maximum"),
        (required, "spec_schema.required"),
        (no_action, "actions.drain"),
    ] {
        let r = put(&ca, def).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "breaking_change"),
            "{:?}",
            r.body
        );
        assert_eq!(r.body["details"]["field"], field);
    }
    assert_eq!(
        cb.get("/v1/resource-types/loadbalancer").await.body["version"],
        1
    );

    // An additive change on A is served by B with no wait: a new optional field, a new
    // action.
    lb["spec_schema"]["properties"]["tls"] = json!({"type": "boolean", "default": false});
    lb["actions"]["restart"] = json!({"description": "Restart it."});
    let changed = put(&ca, lb.clone()).await;
    assert_eq!(
        (changed.status, changed.body["version"].clone()),
        (StatusCode::OK, json!(2)),
        "{:?}",
        changed.body
    );
    let with_tls = cb
        .post(
            &format!("/v1/tenants/{t}/load-balancers"),
            json!({"name": "two", "zone": "zone-a",
        "spec": {"vm": vm_id, "port": 443, "tls": true}}),
        )
        .await;
    assert_eq!(with_tls.status, StatusCode::ACCEPTED, "{:?}", with_tls.body);
    let id = made.body["resource_id"].as_str().unwrap();
    let restart = cb
        .post(
            &format!("/v1/tenants/{t}/load-balancers/{id}/actions/restart"),
            json!({}),
        )
        .await;
    assert_eq!(restart.status, StatusCode::ACCEPTED, "{:?}", restart.body);
    assert_eq!(
        put(&cb, lb).await.status,
        StatusCode::OK,
        "the same definition again changes nothing"
    );
    assert_eq!(
        ca.get("/v1/resource-types/loadbalancer").await.body["version"],
        2
    );
    let doc = cb.get("/v1/openapi.json").await.body;
    assert!(
        doc["components"]["schemas"]["LoadbalancerSpec"]["properties"]
            .get("tls")
            .is_some()
    );

    // A kind with live resources, or that another kind names, cannot go.
    let gone = ca
        .request(
            Method::DELETE,
            "/v1/resource-types/loadbalancer",
            Some(&ca.admin_key),
            None,
        )
        .await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::CONFLICT, "resource_type_in_use")
    );
    let vm_type = ca
        .request(
            Method::DELETE,
            "/v1/resource-types/vm",
            Some(&ca.admin_key),
            None,
        )
        .await;
    assert_eq!(
        (vm_type.status, vm_type.code()),
        (StatusCode::CONFLICT, "resource_type_in_use")
    );
}

#[tokio::test]
async fn registrations_are_checked_and_only_admins_make_them() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let owner = app
        .post(&format!("/v1/tenants/{t}/keys"), json!({"role": "owner"}))
        .await;
    let owner_key = owner.body["key"].as_str().unwrap().to_owned();
    let def = loadbalancer();
    let by_owner = app
        .request(
            Method::POST,
            "/v1/resource-types",
            Some(&owner_key),
            Some(&def),
        )
        .await;
    assert_eq!(by_owner.status, StatusCode::FORBIDDEN);
    let listed = app
        .request(Method::GET, "/v1/resource-types", Some(&owner_key), None)
        .await;
    let kinds: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["bm", "cluster", "vm", "volume"],
        "every key reads the registry"
    );

    let with = |f: &dyn Fn(&mut Value)| {
        let mut d = loadbalancer();
        f(&mut d);
        d
    };
    for (bad, code, field) in [
        (
            with(&|d| d["plural"] = json!("vms")),
            "plural_taken",
            "plural",
        ),
        (
            with(&|d| d["plural"] = json!("events")),
            "invalid_resource_type",
            "plural",
        ),
        (
            with(&|d| d["spec_schema"]["type"] = json!("array")),
            "invalid_resource_type",
            "spec_schema.type",
        ),
        (
            with(&|d| {
                d["spec_schema"]["properties"]["vm"]["x-reference"] = json!({"kind": "router"})
            }),
            "invalid_resource_type",
            "spec_schema.vm.x-reference.kind",
        ),
        (
            with(&|d| d["spec_schema"]["properties"]["port"]["minimum"] = json!("one")),
            "invalid_resource_type",
            "spec_schema",
        ),
        (
            with(&|d| d["spec_schema"]["$ref"] = json!("https://example.com/schema.json")),
            "invalid_resource_type",
            "spec_schema",
        ),
        (
            with(&|d| d["actions"]["create"] = json!({})),
            "invalid_resource_type",
            "actions.create",
        ),
        (
            with(&|d| d["kind"] = json!("Load-Balancer")),
            "invalid_body",
            "",
        ),
        (
            with(&|d| {
                d["actions"]["drain"]["requires"] =
                    json!([{"field": "/port", "is_not": 1, "code": "oops", "message": "m"}])
            }),
            "invalid_body",
            "",
        ),
    ] {
        let r = app.post("/v1/resource-types", bad.clone()).await;
        assert_eq!(r.code(), code, "{bad}: {:?}", r.body);
        assert!(
            r.body["details"]["field"]
                .as_str()
                .unwrap_or("")
                .starts_with(field),
            "{:?}",
            r.body
        );
    }
    // No kind may take the URL segment of another route under a tenant.
    let contract = gateway::api::openapi::document();
    for path in contract["paths"].as_object().unwrap().keys() {
        let Some(rest) = path.strip_prefix("/v1/tenants/{tenant}/") else {
            continue;
        };
        let segment = rest.split('/').next().unwrap();
        if segment.starts_with('{') {
            continue;
        }
        let taken = with(&|d| d["plural"] = json!(segment));
        let r = app.post("/v1/resource-types", taken).await;
        assert_eq!(
            r.code(),
            "invalid_resource_type",
            "plural {segment}: {:?}",
            r.body
        );
    }
    assert_eq!(
        app.post("/v1/resource-types", def.clone()).await.status,
        StatusCode::CREATED
    );
    let again = app.post("/v1/resource-types", def.clone()).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "resource_type_exists")
    );
    let mismatch = app
        .request(
            Method::PUT,
            "/v1/resource-types/other",
            Some(&app.admin_key),
            Some(&def),
        )
        .await;
    assert_eq!(mismatch.code(), "invalid_body");
    // Racing registrations of one new kind: one wins, the others are told it exists.
    let racer = with(&|d| {
        d["kind"] = json!("racer");
        d["plural"] = json!("racers");
    });
    let posts = (0..8).map(|_| app.post("/v1/resource-types", racer.clone()));
    let mut statuses: Vec<u16> = futures::future::join_all(posts)
        .await
        .iter()
        .map(|a| a.status.as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409]);
    // A worker key names a registered service.
    let key = |service: &str| json!({"role": "worker", "service": service, "zone": "zone-a"});
    assert_eq!(
        app.post(&format!("/v1/tenants/{t}/keys"), key("network"))
            .await
            .status,
        StatusCode::CREATED
    );
    let nobody = app
        .post(&format!("/v1/tenants/{t}/keys"), key("nothing"))
        .await;
    assert_eq!(
        (nobody.status, nobody.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_key")
    );
    // A type nobody uses goes, and its routes with it.
    assert_eq!(
        app.delete("/v1/resource-types/loadbalancer").await.status,
        StatusCode::NO_CONTENT
    );
    let gone = app.get(&format!("/v1/tenants/{t}/load-balancers")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.delete("/v1/resource-types/loadbalancer").await.status,
        StatusCode::NOT_FOUND
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Schemas are compiled once per type version: a reload keeps an unchanged type as it
/// was compiled, and compiles a changed one.
#[tokio::test]
async fn a_reload_compiles_only_the_types_that_changed() {
    let app = spawn_with(Options::api_only()).await;
    let types = gateway::registry::Registry::load(app.pool.clone())
        .await
        .unwrap();
    let (vm, bm) = (
        gateway_proto::Kind::named("vm"),
        gateway_proto::Kind::named("bm"),
    );
    let (vm_before, bm_before) = (types.get(&vm).unwrap(), types.get(&bm).unwrap());
    types.reload().await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&vm_before, &types.get(&vm).unwrap()));
    let mut def = app.get("/v1/resource-types/vm").await.body;
    def.as_object_mut().unwrap().remove("version");
    def["spec_schema"]["properties"]["hostname"] = json!({"type": "string"});
    assert_eq!(put_type(&app, &def).await.status, StatusCode::OK);
    types.reload().await.unwrap();
    let vm_after = types.get(&vm).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&vm_before, &vm_after));
    assert_eq!(vm_after.version, 2);
    assert!(std::sync::Arc::ptr_eq(&bm_before, &types.get(&bm).unwrap()));
}

/// Every local `$ref` of `doc` by JSON pointer (`#/…`) names something in it (outside
/// subschemas with an `$id` of their own, whose pointers are relative to them).
fn dangling_refs(doc: &Value) -> Vec<String> {
    fn walk(v: &Value, doc: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(fields) if fields.contains_key("$id") => {}
            Value::Object(fields) => {
                for (k, v) in fields {
                    match (k.as_str(), v.as_str()) {
                        ("$ref", Some(r)) if r.starts_with("#/") => {
                            if doc.pointer(&r[1..]).is_none() {
                                out.push(r.to_owned());
                            }
                        }
                        _ => walk(v, doc, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, doc, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, doc, &mut out);
    out
}

/// A type whose schemas refer to parts of themselves (`$defs`, even recursively) is
/// served in the contract with those references pointing where its schemas are placed
/// in the document, so the document stays whole; and its specs validate as written.
#[tokio::test]
async fn schemas_that_refer_to_themselves_keep_the_served_contract_whole() {
    let app = spawn_with(Options::api_only()).await;
    let mut def = loadbalancer();
    def["kind"] = json!("reftree");
    def["plural"] = json!("ref-trees");
    def["service"] = json!("reftrees");
    def["spec_schema"] = json!({
        "type": "object", "additionalProperties": false, "required": ["root"],
        "$defs": {
            "node": {"type": "object", "additionalProperties": false, "required": ["name"],
                     "properties": {"name": {"type": "string", "maxLength": 8},
                                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}},
            "loop": {"$ref": "#/$defs/loop"},
            "short": {"$anchor": "short", "type": "string", "maxLength": 3}
        },
        "properties": {"root": {"$ref": "#/$defs/node"}, "odd": {"$ref": "#/$defs/loop"},
                       "tag": {"$ref": "#short"},
                       "own": {"$id": "https://example.com/own", "$defs": {"a": {"type": "integer"}},
                               "properties": {"v": {"$ref": "#/$defs/a"}}}}
    });
    def["actions"] = json!({
        "rename": {"description": "Rename the root.",
                   "input_schema": {"type": "object", "$defs": {"n": {"type": "string", "maxLength": 8}},
                                    "required": ["name"], "properties": {"name": {"$ref": "#/$defs/n"}}},
                   "patch": {"root": {"name": {"$input": "/name"}}}}
    });
    let a = put_type(&app, &def).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let doc = app.get("/v1/openapi.json").await.body;
    assert_eq!(dangling_refs(&doc), Vec::<String>::new());
    let served = &doc["components"]["schemas"]["ReftreeSpec"]["properties"];
    assert_eq!(
        served["root"]["$ref"],
        "#/components/schemas/ReftreeSpec/$defs/node"
    );
    assert_eq!(
        served["tag"]["$ref"], "#short",
        "an anchor is no pointer: left alone"
    );
    assert_eq!(
        served["own"]["properties"]["v"]["$ref"], "#/$defs/a",
        "relative to its own `$id`: left alone"
    );
    // The references still work for validation: a deep bad name is found, and the
    // anchor's rule holds.
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/ref-trees");
    let tree = |spec: Value| app.post(&path, json!({"name": "t1", "zone": "zone-a", "spec": spec}));
    let deep =
        json!({"name": "a", "children": [{"name": "b", "children": [{"name": "far-too-long"}]}]});
    let shallow = json!({"name": "a", "children": [{"name": "b"}]});
    for spec in [
        json!({"root": deep, "odd": 1}),
        json!({"root": shallow, "odd": 1, "tag": "abcd"}),
    ] {
        let a = tree(spec.clone()).await;
        assert_eq!(a.code(), "invalid_spec", "{spec}: {:?}", a.body);
    }
    let a = tree(json!({"root": shallow, "odd": 1, "tag": "abc"})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
}

/// A registered kind whose quota field the schema leaves loose (`number`, no minimum):
/// a negative value is refused with `422`, not a `500` from the usage row's check, and
/// a fraction is refused rather than counted as nothing (both found by an outside
/// probe).
#[tokio::test]
async fn a_loose_quota_field_takes_only_whole_numbers_0_or_more() {
    let app = spawn_with(Options::api_only()).await;
    let mut def = loadbalancer();
    def["kind"] = json!("tank");
    def["plural"] = json!("tanks");
    def["service"] = json!("tanks");
    def["spec_schema"] = json!({"type": "object", "required": ["cap"], "properties": {
        "cap": {"type": "number", "x-quota": {"dimension": "storage_gb"}}}});
    def["actions"] = json!({});
    let a = put_type(&app, &def).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let tenant = app.tenant().await;
    let tank = |name: &'static str, cap: Value| {
        let (app, path) = (&app, format!("/v1/tenants/{tenant}/tanks"));
        async move {
            let body = json!({"name": name, "zone": "zone-a", "spec": {"cap": cap}});
            app.post(&path, body).await
        }
    };
    let path = format!("/v1/tenants/{tenant}/quotas");
    let quotas = || app.get(&path);
    for cap in [json!(-5), json!(-5.0), json!(50000.5), json!(0.5)] {
        let a = tank("t", cap.clone()).await;
        assert_eq!(
            (a.status, a.code(), a.body["details"]["field"].as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_spec",
                Some("spec.cap")
            ),
            "{cap}: {:?}",
            a.body
        );
    }
    let a = tank("t", json!(40.0)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    let usage = quotas().await;
    assert_eq!(usage.body["usage"][0]["storage_gb"], 40, "{:?}", usage.body);
    // Amounts that add up past a bigint saturate: the tenant's quotas still answer, and
    // so do its writes (an outside probe made every quota check of a tenant a `500`).
    for name in ["h0", "h1"] {
        let a = tank(name, json!(4611686018427387904i64)).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    }
    let usage = quotas().await;
    assert_eq!(usage.status, StatusCode::OK, "{:?}", usage.body);
    assert_eq!(
        usage.body["usage"][0]["storage_gb"],
        i64::MAX,
        "{:?}",
        usage.body
    );
    let limits = json!({"limits": [{"dimension": "count", "limit": 100}, {"dimension": "storage_gb", "limit": 10}]});
    let a = app
        .request(Method::PUT, &path, Some(&app.admin_key), Some(&limits))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(tank("h2", json!(1)).await.code(), "quota_exceeded");
    let vm = json!({"name": "web", "zone": "zone-a", "spec": crate::common::example_spec("vms")});
    let a = app.post(&format!("/v1/tenants/{tenant}/vms"), vm).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
}
