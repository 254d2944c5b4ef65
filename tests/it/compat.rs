//! The breaking-change check: the current contract (`openapi/v1.json`, generated from
//! the code) against the last released one (`openapi/v1.released.json`). Inside `v1`
//! the contract may only grow: a removed route or method, a removed parameter or
//! response field, a changed enum, a changed or narrowed type, or a new required input
//! fails the check. Releasing copies `v1.json` over `v1.released.json`.

use serde_json::Value;
use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// Every breaking change from `old` to `new`, one line each.
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let inputs = input_schemas(old);
    for (path, item) in old["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            let Some(old_op) = item.get(method) else {
                continue;
            };
            let Some(new_op) = new["paths"][path].get(method) else {
                out.push(format!("{} {path}: removed", method.to_uppercase()));
                continue;
            };
            let at = format!("{} {path}", method.to_uppercase());
            let old_params = params(old, old_op);
            let new_params = params(new, new_op);
            for (key, p) in &old_params {
                match new_params.iter().find(|(k, _)| k == key) {
                    None => out.push(format!("{at}: parameter {key} removed")),
                    Some((_, np)) => {
                        if np["required"] == true && p["required"] != true {
                            out.push(format!("{at}: parameter {key} became required"));
                        }
                        compare(
                            &p["schema"],
                            &np["schema"],
                            true,
                            &format!("{at}: parameter {key}"),
                            &mut out,
                        );
                    }
                }
            }
            for (key, p) in &new_params {
                if p["required"] == true && !old_params.iter().any(|(k, _)| k == key) {
                    out.push(format!("{at}: new required parameter {key}"));
                }
            }
            if new_op["requestBody"]["required"] == true
                && old_op["requestBody"]["required"] != true
            {
                out.push(format!("{at}: request body became required"));
            }
        }
    }
    let old_schemas = old["components"]["schemas"].as_object();
    for (name, schema) in old_schemas.into_iter().flatten() {
        match new["components"]["schemas"].get(name) {
            None => out.push(format!("schema {name}: removed")),
            Some(n) => compare(
                schema,
                n,
                inputs.contains(name),
                &format!("schema {name}"),
                &mut out,
            ),
        }
    }
    out
}

/// The parameters of an operation, `$ref`s resolved, keyed by `in:name`.
fn params(doc: &Value, op: &Value) -> Vec<(String, Value)> {
    op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let p = resolve(doc, p).clone();
            (
                format!(
                    "{}:{}",
                    p["in"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ),
                p,
            )
        })
        .collect()
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or(&Value::Null),
        None => v,
    }
}

/// Names of the component schemas a request may carry (bodies and parameters, and what
/// they refer to): only there is a new required field a breaking change.
fn input_schemas(doc: &Value) -> BTreeSet<String> {
    fn refs(v: &Value, doc: &Value, seen: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(name) = m
                    .get("$ref")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("#/components/schemas/"))
                {
                    if seen.insert(name.to_owned()) {
                        refs(&doc["components"]["schemas"][name], doc, seen);
                    }
                }
                m.values().for_each(|x| refs(x, doc, seen));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, doc, seen)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    for item in doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, i)| i)
    {
        for op in METHODS.iter().filter_map(|m| item.get(*m)) {
            refs(&op["requestBody"], doc, &mut seen);
            refs(&op["parameters"], doc, &mut seen);
        }
    }
    seen
}

fn types(s: &Value) -> BTreeSet<String> {
    match &s["type"] {
        Value::String(t) => [t.clone()].into(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Compares one schema with its new version; `input` says whether requests carry it.
fn compare(old: &Value, new: &Value, input: bool, at: &str, out: &mut Vec<String>) {
    if old.get("$ref").is_some() || new.get("$ref").is_some() {
        if old.get("$ref") != new.get("$ref") {
            out.push(format!(
                "{at}: type changed from {} to {}",
                old.get("$ref").unwrap_or(&old["type"]),
                new.get("$ref").unwrap_or(&new["type"])
            ));
        }
        return; // named schemas are compared by name
    }
    let (ot, nt) = (types(old), types(new));
    if !ot.is_empty() && ot != nt {
        out.push(format!("{at}: type changed from {ot:?} to {nt:?}"));
    }
    if old["enum"] != new["enum"] && !(old["enum"].is_null() && new["enum"].is_null()) {
        out.push(format!(
            "{at}: enum changed from {} to {}",
            old["enum"], new["enum"]
        ));
    }
    for key in ["format", "pattern"] {
        if old[key] != new[key] && !new[key].is_null() {
            out.push(format!(
                "{at}: {key} changed from {} to {}",
                old[key], new[key]
            ));
        }
    }
    let num = |v: &Value, k: &str| v[k].as_f64();
    for (key, narrower) in [
        ("minimum", 1.0),
        ("minLength", 1.0),
        ("minItems", 1.0),
        ("maximum", -1.0),
        ("maxLength", -1.0),
        ("maxItems", -1.0),
    ] {
        if let Some(n) = num(new, key) {
            if num(old, key).is_none_or(|o| (n - o) * narrower > 0.0) {
                out.push(format!("{at}: {key} narrowed to {n}"));
            }
        }
    }
    if new["additionalProperties"] == false && old["additionalProperties"] != false {
        out.push(format!("{at}: additional properties now refused"));
    }
    let old_props = old["properties"].as_object();
    for (name, prop) in old_props.into_iter().flatten() {
        match new["properties"].get(name) {
            None => out.push(format!("{at}: field {name} removed")),
            Some(np) => compare(prop, np, input, &format!("{at}.{name}"), out),
        }
    }
    if input {
        let old_required: BTreeSet<&str> = old["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for r in new["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !old_required.contains(r) {
                out.push(format!("{at}: field {r} became required"));
            }
        }
    }
    for key in ["items", "additionalProperties"] {
        if old[key].is_object() && new[key].is_object() {
            compare(&old[key], &new[key], input, &format!("{at}.{key}"), out);
        }
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if old[key] != new[key] && !old[key].is_null() {
            out.push(format!("{at}: {key} changed"));
        }
    }
}

fn released() -> Value {
    let text = std::fs::read_to_string(crate::common::repo_root().join("openapi/v1.released.json"))
        .expect("openapi/v1.released.json");
    serde_json::from_str(&text).expect("released contract parses")
}

fn current() -> Value {
    gateway::api::openapi::document().clone()
}

#[test]
fn the_contract_only_grows_since_the_last_release() {
    let changes = breaking_changes(&released(), &current());
    assert!(
        changes.is_empty(),
        "breaking changes to v1 (a new version is needed, or the change must be additive):\n{}",
        changes.join("\n")
    );
}

/// Applies `mutate` to a copy of the current contract and returns what the check says.
fn check_after(mutate: impl FnOnce(&mut Value)) -> Vec<String> {
    let old = current();
    let mut new = old.clone();
    mutate(&mut new);
    breaking_changes(&old, &new)
}

fn schema<'a>(doc: &'a mut Value, name: &str) -> &'a mut Value {
    &mut doc["components"]["schemas"][name]
}

#[test]
fn additive_changes_pass() {
    assert_eq!(check_after(|_| {}), Vec::<String>::new());
    let changes = check_after(|d| {
        d["paths"]["/v1/new-thing"] = serde_json::json!({"get": {"responses": {}}});
        schema(d, "OperationOut")["properties"]["extra"] = serde_json::json!({"type": "string"});
        schema(d, "TenantIn")["properties"]["note"] = serde_json::json!({"type": "string"});
    });
    assert_eq!(changes, Vec::<String>::new());
}

#[test]
fn a_removed_route_is_caught() {
    let changes = check_after(|d| {
        d["paths"]["/v1/operations/{id}/cancel"]
            .as_object_mut()
            .unwrap()
            .remove("post");
    });
    assert_eq!(changes, ["POST /v1/operations/{id}/cancel: removed"]);
}

#[test]
fn a_removed_response_field_is_caught() {
    let changes = check_after(|d| {
        schema(d, "OperationOut")["properties"]
            .as_object_mut()
            .unwrap()
            .remove("deadline");
    });
    assert_eq!(changes, ["schema OperationOut: field deadline removed"]);
}

#[test]
fn a_changed_enum_is_caught() {
    let changes = check_after(|d| {
        schema(d, "OperationState")["enum"]
            .as_array_mut()
            .unwrap()
            .retain(|v| v != "queued");
    });
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        changes[0].starts_with("schema OperationState: enum changed"),
        "{changes:?}"
    );
}

#[test]
fn a_narrowed_type_is_caught() {
    let changes = check_after(|d| {
        schema(d, "ResourceOut")["properties"]["generation"]["type"] = serde_json::json!("string");
    });
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        changes[0].starts_with("schema ResourceOut.generation: type changed"),
        "{changes:?}"
    );
    let changes = check_after(|d| {
        let limit = d["paths"]["/v1/audit"]["get"]["parameters"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["name"] == "limit")
            .unwrap();
        limit["schema"]["maximum"] = serde_json::json!(100);
    });
    assert_eq!(
        changes,
        ["GET /v1/audit: parameter query:limit: maximum narrowed to 100"]
    );
}

#[test]
fn a_new_required_input_is_caught() {
    let changes = check_after(|d| {
        let t = schema(d, "TenantIn");
        t["properties"]["region"] = serde_json::json!({"type": "string"});
        t["required"].as_array_mut().unwrap().push("region".into());
    });
    assert_eq!(changes, ["schema TenantIn: field region became required"]);
    let changes = check_after(|d| {
        d["paths"]["/v1/audit"]["get"]["parameters"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "reason", "in": "query", "required": true, "schema": {"type": "string"}}));
    });
    assert_eq!(
        changes,
        ["GET /v1/audit: new required parameter query:reason"]
    );
}
