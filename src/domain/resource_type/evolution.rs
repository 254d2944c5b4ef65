//! Safe evolution of a registered type: a new version may only accept more.
//!
//! Every spec stored under the old version, and every request a client built against
//! it, must stay valid under the new one. So, comparing the old and new definitions:
//! the plural and the service stay; no property, action or enum value goes away; no
//! type, bound or pattern narrows; a new required field needs a `default` (which fills
//! it in stored specs' next change and in requests that leave it out); `x-` rules may
//! not be added or changed, except that a field may stop being immutable or
//! only-growing; actions keep their patch and requirements, and their input only
//! widens. What this checker does not understand (a changed `oneOf`, `$ref`, …) counts
//! as breaking: it errs on the side of refusing.

use super::TypeDef;
use crate::domain::ValidationError;
use serde_json::{Map, Value};

/// Why a change is breaking, as a `409 breaking_change` with the field it is about.
fn breaking(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::new("breaking_change", field, message)
}

/// Accepts `new` as the next version of `old`, or says why not.
pub fn check(old: &TypeDef, new: &TypeDef) -> Result<(), ValidationError> {
    if old.plural != new.plural {
        return Err(breaking(
            "plural",
            "the URL segment of a kind cannot change",
        ));
    }
    if old.service != new.service {
        return Err(breaking("service", "the service of a kind cannot change"));
    }
    widens(&old.spec_schema, &new.spec_schema, "spec_schema")?;
    if let (Some(o), Some(n)) = (&old.status_schema, &new.status_schema) {
        widens(o, n, "status_schema")?;
    }
    for (name, o) in &old.actions {
        let field = format!("actions.{name}");
        let Some(n) = new.actions.get(name) else {
            return Err(breaking(field, "an action cannot be removed"));
        };
        if o.patch != n.patch || o.requires != n.requires {
            return Err(breaking(
                field,
                "what an action does cannot change; add another action",
            ));
        }
        widens(
            &o.input_schema,
            &n.input_schema,
            &format!("{field}.input_schema"),
        )?;
    }
    Ok(())
}

/// Keywords whose value may only loosen in the given direction.
const LOWER_BOUNDS: &[&str] = &[
    "minimum",
    "exclusiveMinimum",
    "minLength",
    "minItems",
    "minProperties",
];
const UPPER_BOUNDS: &[&str] = &[
    "maximum",
    "exclusiveMaximum",
    "maxLength",
    "maxItems",
    "maxProperties",
];
/// Keywords handled below, or free to change (annotations).
const HANDLED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "items",
    "default",
    "description",
    "title",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "x-catalog",
    "x-catalog-range",
    "x-immutable",
    "x-only-grows",
    "x-reference",
    "x-quota",
    "$schema",
];

fn types(s: &Map<String, Value>) -> Option<Vec<String>> {
    match s.get("type")? {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
        ),
        _ => Some(vec![]),
    }
}

/// Whether type `t` of the old schema is still accepted by the new types `new`.
fn type_kept(t: &str, new: &[String]) -> bool {
    new.iter()
        .any(|n| n == t || (t == "integer" && n == "number"))
}

/// Refuses when `new` accepts less than `old` (at `field`).
fn widens(old: &Value, new: &Value, field: &str) -> Result<(), ValidationError> {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return if old == new || new == &Value::Bool(true) {
            Ok(())
        } else {
            Err(breaking(
                field,
                "the schema changed in a way that may refuse what it took",
            ))
        };
    };
    if let Some(nt) = types(n) {
        match types(o) {
            Some(ot) if ot.iter().all(|t| type_kept(t, &nt)) => {}
            _ => return Err(breaking(format!("{field}.type"), "the type narrowed")),
        }
    }
    bounds(o, n, field)?;
    if let Some(ne) = n.get("enum").and_then(Value::as_array) {
        let oe = o.get("enum").and_then(Value::as_array);
        if !oe.is_some_and(|oe| oe.iter().all(|v| ne.contains(v))) {
            return Err(breaking(format!("{field}.enum"), "an enum value went away"));
        }
    }
    properties(o, n, field)?;
    if let (Some(oi), Some(ni)) = (o.get("items"), n.get("items")) {
        widens(oi, ni, &format!("{field}.items"))?;
    } else if n.contains_key("items") {
        return Err(breaking(format!("{field}.items"), "items gained a schema"));
    }
    x_rules(o, n, field)?;
    for (k, v) in n {
        let checked = HANDLED.contains(&k.as_str())
            || LOWER_BOUNDS.contains(&k.as_str())
            || UPPER_BOUNDS.contains(&k.as_str());
        if !checked && o.get(k) != Some(v) {
            return Err(breaking(
                format!("{field}.{k}"),
                format!("a change of {k} may refuse what the old schema took"),
            ));
        }
    }
    Ok(())
}

/// Lower bounds may only go down, upper bounds only up; none may appear.
fn bounds(
    o: &Map<String, Value>,
    n: &Map<String, Value>,
    field: &str,
) -> Result<(), ValidationError> {
    for (keys, looser) in [(LOWER_BOUNDS, true), (UPPER_BOUNDS, false)] {
        for k in keys {
            let Some(nv) = n.get(*k).and_then(Value::as_f64) else {
                continue;
            };
            let ok = o.get(*k).and_then(Value::as_f64).is_some_and(|ov| {
                if looser {
                    nv <= ov
                } else {
                    nv >= ov
                }
            });
            if !ok {
                return Err(breaking(format!("{field}.{k}"), format!("{k} narrowed")));
            }
        }
    }
    Ok(())
}

/// No property goes away or narrows; new required ones have a default; closed objects
/// stay open if they were.
fn properties(
    o: &Map<String, Value>,
    n: &Map<String, Value>,
    field: &str,
) -> Result<(), ValidationError> {
    let empty = Map::new();
    let op = o
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let np = n
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (name, os) in op {
        let at = format!("{field}.properties.{name}");
        let Some(ns) = np.get(name) else {
            return Err(breaking(at, "a field cannot be removed"));
        };
        widens(os, ns, &at)?;
    }
    let required = |m: &Map<String, Value>| -> Vec<String> {
        m.get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let old_required = required(o);
    for name in required(n) {
        let defaulted = np.get(&name).is_some_and(|p| p.get("default").is_some());
        if !old_required.contains(&name) && !defaulted {
            return Err(breaking(
                format!("{field}.required"),
                format!("{name:?} became required without a default"),
            ));
        }
    }
    let closed =
        |m: &Map<String, Value>| m.get("additionalProperties") == Some(&Value::Bool(false));
    if closed(n) && !closed(o) {
        return Err(breaking(
            format!("{field}.additionalProperties"),
            "the object was closed to other fields",
        ));
    }
    if let (Some(oa), Some(na)) = (o.get("additionalProperties"), n.get("additionalProperties")) {
        if oa.is_object() || na.is_object() {
            widens(oa, na, &format!("{field}.additionalProperties"))?;
        }
    }
    Ok(())
}

/// `x-` rules may not appear or change; immutability and only-growing may go.
fn x_rules(
    o: &Map<String, Value>,
    n: &Map<String, Value>,
    field: &str,
) -> Result<(), ValidationError> {
    for k in ["x-catalog", "x-catalog-range", "x-reference", "x-quota"] {
        if o.get(k) != n.get(k) {
            return Err(breaking(
                format!("{field}.{k}"),
                format!("{k} cannot change"),
            ));
        }
    }
    for k in ["x-immutable", "x-only-grows"] {
        let on = |m: &Map<String, Value>| m.get(k).is_some_and(|v| v != &Value::Bool(false));
        if on(n) && o.get(k) != n.get(k) {
            return Err(breaking(
                format!("{field}.{k}"),
                format!("{k} cannot be added or changed"),
            ));
        }
    }
    Ok(())
}
