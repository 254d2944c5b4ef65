//! Checks every answer the test client receives against the published OpenAPI document
//! (`gateway::api::openapi::document()`): the status must be listed for the operation
//! (found by method and matched path template), and a JSON body must match the
//! answer's schema. A small validator for the JSON Schema subset the document uses:
//! `$ref`, `type` (also as a list), `enum`, `properties`, `required`,
//! `additionalProperties`, `items`, `oneOf`/`anyOf`/`allOf`, bounds and `pattern`.

use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn doc() -> &'static Value {
    gateway::api::openapi::document()
}

/// The operation template `path` (without its query) matches: literal segments win
/// over parameters, as in the router.
fn template(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let paths = doc()["paths"].as_object()?;
    paths
        .keys()
        .filter_map(|t| {
            let parts: Vec<&str> = t.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut params = 0;
            for (p, s) in parts.iter().zip(&segments) {
                if p.starts_with('{') {
                    if s.is_empty() {
                        return None;
                    }
                    params += 1;
                } else if p != s {
                    return None;
                }
            }
            Some((params, t.as_str()))
        })
        .min()
        .map(|(_, t)| t)
}

fn resolve(v: &Value) -> &Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            doc()
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {r}")),
        ),
        None => v,
    }
}

fn regex(pattern: &str) -> Regex {
    static CACHE: OnceLock<Mutex<HashMap<String, Regex>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache
        .entry(pattern.to_owned())
        .or_insert_with(|| Regex::new(pattern).expect("the document's patterns compile"))
        .clone()
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    }
}

/// Errors of `v` against `schema`, each with its JSON path.
pub fn validate(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(schema);
    if let Some(t) = schema.get("type") {
        let ok = match t {
            Value::String(t) => type_matches(t, v),
            Value::Array(ts) => ts
                .iter()
                .filter_map(Value::as_str)
                .any(|t| type_matches(t, v)),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            errors.push(format!("{at}: {v} is not one of {values:?}"));
        }
    }
    for all in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        validate(all, v, at, errors);
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let passing = options
                .iter()
                .filter(|o| {
                    let mut e = Vec::new();
                    validate(o, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if passing == 0 || (exactly_one && passing > 1) {
                errors.push(format!("{at}: {v} matches {passing} of the {key} schemas"));
            }
        }
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !map.contains_key(r.as_str().unwrap_or_default()) {
                    errors.push(format!("{at}: required field {r} missing"));
                }
            }
            for (k, item) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(s, item, &format!("{at}.{k}"), errors),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            errors.push(format!("{at}: field {k} is not in the schema"))
                        }
                        Some(s @ Value::Object(_)) => {
                            validate(s, item, &format!("{at}.{k}"), errors)
                        }
                        _ => {}
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(s, item, &format!("{at}[{i}]"), errors);
                }
            }
        }
        Value::String(s) => {
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                if !regex(p).is_match(s) {
                    errors.push(format!("{at}: {s:?} does not match {p}"));
                }
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if schema
                .get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n < m)
            {
                errors.push(format!("{at}: {n} is below the minimum"));
            }
            if schema
                .get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n > m)
            {
                errors.push(format!("{at}: {n} is above the maximum"));
            }
        }
        _ => {}
    }
}

/// Panics unless the document lists `status` for `method path` and `body` (when the
/// answer has a JSON schema) matches it. Paths the document does not describe (unknown
/// routes, the document itself) and methods it lists for no path are not checked.
pub fn check(method: &str, path: &str, status: u16, body: &Value) {
    let Some(t) = template(path) else { return };
    let Some(op) = doc()["paths"][t].get(method.to_ascii_lowercase()) else {
        return;
    };
    let Some(response) = op["responses"].get(status.to_string()) else {
        panic!(
            "{method} {path} answered {status}, which the document does not list for {t}: {body}"
        );
    };
    let response = resolve(response);
    if let Some(schema) = response.pointer("/content/application~1json/schema") {
        let mut errors = Vec::new();
        validate(schema, body, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} answered {status} with a body its schema refuses: {errors:#?}\n{body:#}"
        );
    }
}
