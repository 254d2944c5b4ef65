//! The client's wire types against the gateway's committed contract (`openapi/v1.json`).
//!
//! The types in [`crate::types`] are written by hand (they reuse the workers' shared
//! enums and add conveniences a generated client would not), so nothing but this test
//! keeps them equal to what the gateway sends and accepts. Each type's schema is derived
//! from the Rust type itself (its serde attributes included) and compared with the
//! gateway's component: the same fields, each of the same type (enums with the same
//! values), and nothing the client insists on that the gateway may leave out. The query
//! builders are compared with the routes' query parameters. A field added, renamed,
//! retyped or made optional on either side fails here, naming it.

use crate::types::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use utoipa::ToSchema;

/// Which way a type travels, and so which differences would break a client.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// The client reads it: a field it requires must be one the gateway always sends,
    /// and a field the gateway may send as `null` must be optional in the client.
    Reads,
    /// The client sends it: every field the gateway requires must be there.
    Sends,
}

/// The gateway's contract, `openapi/v1.json`.
fn contract() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/v1.json");
    let text = std::fs::read_to_string(path).expect("openapi/v1.json");
    serde_json::from_str(&text).expect("the contract is JSON")
}

/// The contract's components.
fn gateway() -> Map<String, Value> {
    contract()["components"]["schemas"]
        .as_object()
        .expect("components.schemas")
        .clone()
}

/// A client type's schema and every schema it refers to, under the client's names.
fn client<T: ToSchema>(into: &mut Map<String, Value>) -> String {
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    for (name, schema) in nested {
        into.insert(name, serde_json::to_value(schema).expect("schema"));
    }
    let name = T::name().into_owned();
    into.insert(
        name.clone(),
        serde_json::to_value(T::schema()).expect("schema"),
    );
    name
}

fn referenced<'a>(doc: &'a Map<String, Value>, schema: &Value) -> Option<(&'a str, &'a Value)> {
    let name = schema.get("$ref")?.as_str()?.rsplit('/').next()?;
    doc.get_key_value(name).map(|(k, v)| (k.as_str(), v))
}

/// A property: its schema, and whether the object requires it.
type Fields = BTreeMap<String, (Value, bool)>;

/// An object schema's properties, `allOf` parts and references followed.
fn fields(doc: &Map<String, Value>, schema: &Value) -> Fields {
    if let Some((_, target)) = referenced(doc, schema) {
        return fields(doc, target);
    }
    let mut out = Fields::new();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(fields(doc, part));
    }
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        out.insert(
            name.clone(),
            (property.clone(), required.contains(name.as_str())),
        );
    }
    out
}

/// Whether the schema admits `null` (a schema that admits anything does).
fn nullable(doc: &Map<String, Value>, schema: &Value) -> bool {
    if let Some((_, target)) = referenced(doc, schema) {
        return nullable(doc, target);
    }
    if shape(doc, &BTreeMap::new(), schema) == ANY {
        return true;
    }
    let null = |s: &Value| s["type"] == "null";
    match &schema["type"] {
        Value::Array(types) => types.iter().any(|t| t == "null"),
        _ => ["oneOf", "anyOf"]
            .iter()
            .any(|k| schema[*k].as_array().is_some_and(|v| v.iter().any(null))),
    }
}

/// What `shape` calls a schema that admits anything (a `serde_json::Value`).
const ANY: &str = "any";

/// Whether a client field of shape `ours` works with the contract's `theirs`.
fn compatible(ours: &str, theirs: &str, way: Way) -> bool {
    let inner = |prefix: &str| match (ours.strip_prefix(prefix), theirs.strip_prefix(prefix)) {
        (Some(a), Some(b)) => compatible(a, b, way),
        _ => false,
    };
    ours == theirs
        // A `serde_json::Value` takes, and may carry, whatever the contract says.
        || ours == ANY
        // A string reads every value of an enum.
        || (way == Way::Reads && ours == "string" && theirs.starts_with("enum["))
        // The contract inlines some objects (a page's items): the named type is
        // compared on its own.
        || (theirs == "object" && ours.starts_with(|c: char| c.is_ascii_uppercase()))
        || inner("array of ")
        || inner("map of ")
}

/// A schema's type, coarsely, in words both documents share: an object type by the
/// gateway's name for it (`names` maps the client's), an enum by its values.
fn shape(doc: &Map<String, Value>, names: &BTreeMap<String, String>, schema: &Value) -> String {
    if let Some((name, target)) = referenced(doc, schema) {
        let object = target.get("properties").is_some() || target.get("allOf").is_some();
        if !object {
            return shape(doc, names, target);
        }
        return names.get(name).map_or(name, String::as_str).to_owned();
    }
    if let Some(values) = schema["enum"].as_array() {
        let mut v: Vec<String> = values
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| v.to_string())
            .collect();
        v.sort();
        return format!("enum[{}]", v.join(","));
    }
    for k in ["oneOf", "anyOf"] {
        if let Some(parts) = schema[k].as_array() {
            let mut v: Vec<String> = parts
                .iter()
                .filter(|p| p["type"] != "null")
                .map(|p| shape(doc, names, p))
                .collect();
            v.sort();
            v.dedup();
            return if v.len() == 1 {
                v.remove(0)
            } else {
                format!("one of [{}]", v.join(" | "))
            };
        }
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => {
            let v: Vec<&str> = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            match v.as_slice() {
                [one] => one.to_string(),
                _ => return ANY.into(),
            }
        }
        _ => return ANY.into(),
    };
    match ty.as_str() {
        "array" => format!("array of {}", shape(doc, names, &schema["items"])),
        "object" => match schema.get("additionalProperties") {
            Some(v) if v.is_object() => format!("map of {}", shape(doc, names, v)),
            _ => "object".into(),
        },
        "integer" => format!("integer {}", schema["format"].as_str().unwrap_or("")),
        "string" => match schema["format"].as_str() {
            Some(f @ ("date-time" | "uuid")) => format!("string {f}"),
            _ => "string".into(),
        },
        other => other.into(),
    }
}

/// The differences between a client type and the gateway's component.
struct Comparison {
    ours: Map<String, Value>,
    theirs: Map<String, Value>,
    /// Client schema name → gateway component name.
    names: BTreeMap<String, String>,
    problems: Vec<String>,
}

impl Comparison {
    fn new() -> Self {
        Self {
            ours: Map::new(),
            theirs: gateway(),
            names: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    /// Names `T`'s counterpart, before the comparisons (so references map).
    fn pair<T: ToSchema>(&mut self, component: &'static str) -> (String, &'static str) {
        let name = client::<T>(&mut self.ours);
        self.names.insert(name.clone(), component.to_owned());
        (name, component)
    }

    /// Compares the client's `name` with the gateway's `component`; `extra` lists the
    /// fields that only one side's schema has, by design (each with its reason where
    /// it is listed).
    fn compare(&mut self, (name, component): (String, &str), way: Way, extra: &[&str]) {
        let Some(theirs) = self.theirs.get(component).cloned() else {
            self.problems
                .push(format!("{name}: the contract has no component {component}"));
            return;
        };
        let ours = self.ours[&name].clone();
        if theirs.get("enum").is_some() || ours.get("enum").is_some() {
            let (a, b) = (
                shape(&self.ours, &self.names, &ours),
                shape(&self.theirs, &self.names, &theirs),
            );
            if a != b {
                self.problems.push(format!(
                    "the client's {name} is {a}, the contract's {component} {b}"
                ));
            }
            return;
        }
        let (ours, theirs) = (fields(&self.ours, &ours), fields(&self.theirs, &theirs));
        for (field, (schema, required)) in &ours {
            let at = format!("{name}.{field} ({component})");
            let Some((their, they_require)) = theirs.get(field) else {
                if !extra.contains(&field.as_str()) {
                    self.problems.push(format!("{at}: not in the contract"));
                }
                continue;
            };
            let (a, b) = (
                shape(&self.ours, &self.names, schema),
                shape(&self.theirs, &self.names, their),
            );
            if !compatible(&a, &b, way) {
                self.problems
                    .push(format!("{at}: the client has {a}, the contract {b}"));
            }
            if way == Way::Reads && *required && !they_require {
                self.problems.push(format!(
                    "{at}: the client requires it, the gateway may leave it out"
                ));
            }
            if way == Way::Reads && nullable(&self.theirs, their) && !nullable(&self.ours, schema) {
                self.problems.push(format!(
                    "{at}: the gateway may send null, the client does not take it"
                ));
            }
        }
        for (field, (_, required)) in &theirs {
            if !ours.contains_key(field) && !extra.contains(&field.as_str()) {
                let what = if *required && way == Way::Sends {
                    "required by the gateway"
                } else {
                    "in the contract"
                };
                self.problems.push(format!(
                    "{name}.{field} ({component}): {what}, missing in the client"
                ));
            }
        }
        for field in extra {
            if ours.contains_key(*field) == theirs.contains_key(*field) {
                self.problems.push(format!(
                    "{name}.{field}: listed as on one side only, but it is not"
                ));
            }
        }
    }
}

#[test]
fn every_wire_type_matches_the_contract() {
    let mut c = Comparison::new();
    let pairs = [
        (c.pair::<ErrorBody>("ErrorBody"), Way::Reads, &[][..]),
        (c.pair::<Operation>("OperationOut"), Way::Reads, &[]),
        // `etag` is the answer's `ETag` header, kept beside the body.
        (c.pair::<Resource>("ResourceOut"), Way::Reads, &["etag"]),
        (c.pair::<NewResource>("CreateResourceIn"), Way::Sends, &[]),
        (c.pair::<ResourcePatch>("PatchIn"), Way::Sends, &[]),
        (c.pair::<NewTenant>("TenantIn"), Way::Sends, &[]),
        (c.pair::<Tenant>("TenantOut"), Way::Reads, &[]),
        (c.pair::<Role>("Role"), Way::Reads, &[]),
        (c.pair::<NewKeyRequest>("KeyIn"), Way::Sends, &[]),
        (c.pair::<KeyInfo>("KeyOut"), Way::Reads, &[]),
        (c.pair::<NewKey>("NewKeyOut"), Way::Reads, &[]),
        (c.pair::<QuotaLimit>("LimitIn"), Way::Sends, &[]),
        (c.pair::<QuotaLimitUsed>("LimitOut"), Way::Reads, &[]),
        (c.pair::<Usage>("UsageOut"), Way::Reads, &[]),
        (c.pair::<QuotaLimits>("QuotasIn"), Way::Sends, &[]),
        (c.pair::<Quotas>("QuotasOut"), Way::Reads, &[]),
        (c.pair::<Zone>("ZoneOut"), Way::Reads, &[]),
        // `version` is read but never serialized: a definition printed by `gwctl` can
        // be registered again, and registration refuses unknown fields.
        (
            c.pair::<ResourceType>("ResourceTypeOut"),
            Way::Reads,
            &["version"],
        ),
        (c.pair::<CatalogEntry>("CatalogEntryOut"), Way::Reads, &[]),
        (c.pair::<AuditEntry>("AuditOut"), Way::Reads, &[]),
        (c.pair::<EventPage>("EventPage"), Way::Reads, &[]),
        (c.pair::<NewWebhook>("WebhookIn"), Way::Sends, &[]),
        (c.pair::<WebhookPatch>("WebhookPatch"), Way::Sends, &[]),
        (c.pair::<Webhook>("WebhookOut"), Way::Reads, &[]),
        (
            c.pair::<WebhookWithSecret>("WebhookWithSecret"),
            Way::Reads,
            &[],
        ),
        (c.pair::<DeliveryAttempt>("AttemptOut"), Way::Reads, &[]),
        (c.pair::<Delivery>("DeliveryOut"), Way::Reads, &[]),
        (
            c.pair::<Page<Operation>>("Page_OperationOut"),
            Way::Reads,
            &[],
        ),
    ];
    for (pair, way, extra) in pairs {
        c.compare(pair, way, extra);
    }
    assert!(
        c.problems.is_empty(),
        "the client's types differ from openapi/v1.json:\n{}",
        c.problems.join("\n")
    );
}

#[test]
fn every_query_matches_its_route() {
    let doc = contract();
    let id = uuid::Uuid::nil();
    let since = Some(chrono::Utc::now());
    let (limit, cursor) = (Some(1), Some("c".to_owned()));
    // Every field set, so that every parameter the client can send is named.
    let queries = [
        (
            "/v1/tenants/{tenant}/{kind}",
            ResourceQuery {
                zone: Some("z".into()),
                phase: Some(gateway_proto::Phase::Ready),
                since,
                label: Some("a=b".into()),
                limit,
                cursor: cursor.clone(),
            }
            .pairs(),
        ),
        (
            "/v1/tenants/{tenant}/operations",
            OperationQuery {
                state: Some(gateway_proto::OperationState::Running),
                kind: Some(gateway_proto::Kind::new("vm").unwrap()),
                zone: Some("z".into()),
                resource_id: Some(id),
                since,
                limit,
                cursor: cursor.clone(),
            }
            .pairs(),
        ),
        (
            "/v1/audit",
            AuditQuery {
                tenant: Some("t".into()),
                principal_id: Some(id),
                outcome: Some("allowed".into()),
                since,
                limit,
                cursor: cursor.clone(),
            }
            .pairs(),
        ),
        (
            "/v1/tenants/{tenant}/events",
            EventQuery {
                kind: Some(gateway_proto::Kind::new("vm").unwrap()),
                zone: Some("z".into()),
                resource: Some(id),
                operation: Some(id),
                types: vec!["operation.succeeded".into()],
                after: Some("a".into()),
                limit,
            }
            .pairs(),
        ),
    ];
    let mut problems = Vec::new();
    for (route, pairs) in queries {
        let ours: BTreeSet<&str> = pairs.iter().map(|(name, _)| *name).collect();
        let theirs: BTreeSet<&str> = doc["paths"][route]["get"]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str())
            .collect();
        for name in ours.difference(&theirs) {
            problems.push(format!(
                "GET {route}: the client sends ?{name}, the contract has no such parameter"
            ));
        }
        for name in theirs.difference(&ours) {
            problems.push(format!(
                "GET {route}: the contract takes ?{name}, the client cannot send it"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The routes the client leaves to others, each with the reason.
const NOT_IN_THE_CLIENT: [(&str, &str); 4] = [
    ("GET /metrics", "Prometheus scrapes it"),
    ("GET /healthz", "the orchestrator's liveness probe"),
    (
        "POST /v1/reports",
        "workers batch their reports with `workers::batch`",
    ),
    (
        "POST /v1/resource-types",
        "`put_resource_type` registers a type or changes it",
    ),
];

/// Every route of the contract has a client method, which names it in its doc comment
/// ("`GET /v1/zones`"), or is one the client leaves to others on purpose.
#[test]
fn every_route_has_a_client_method() {
    let doc = contract();
    // `{tenant}` and `{plural}` name the same segment: compare without the names.
    let shape = |route: &str| {
        let mut out = String::new();
        let mut inside = false;
        for c in route.chars() {
            match c {
                '{' => inside = true,
                '}' => {
                    inside = false;
                    out.push_str("{}");
                }
                _ if !inside => out.push(c),
                _ => {}
            }
        }
        out
    };
    let source = include_str!("lib.rs");
    let named: BTreeSet<String> = source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("///"))
        .flat_map(|l| l.split('`').skip(1).step_by(2))
        .filter(|quoted| quoted.contains(" /"))
        .map(|quoted| shape(quoted.split('?').next().unwrap_or(quoted)))
        .collect();
    let mut missing = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let route = format!("{} {path}", method.to_uppercase());
            let excused = NOT_IN_THE_CLIENT.iter().any(|(r, _)| *r == route);
            if !named.contains(&shape(&route)) && !excused {
                missing.push(route);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "routes without a client method:\n{}",
        missing.join("\n")
    );
    for (route, _) in NOT_IN_THE_CLIENT {
        let (method, path) = route.split_once(' ').unwrap();
        assert!(
            doc["paths"][path].get(method.to_lowercase()).is_some(),
            "{route} is excused but no longer in the contract"
        );
    }
}
