//! The OpenAPI 3.1 document, generated from the handlers' annotations and served at
//! `GET /v1/openapi.json`.
//!
//! utoipa describes the routes, bodies and handler-specific answers; [`document`] then
//! adds what every route shares and the annotations cannot say: the answers of the
//! layers in front of the handlers (`401`, `429`, `503` from `guard`, `400`/`413`/`415`
//! from `extract`), the headers (`X-Request-Id` on every answer, `Retry-After`,
//! `Location`, `ETag`, `Idempotency-Key`, `If-Match`), the wire spelling of the enums
//! defined in `gateway_proto`, and the path parameters' exact shapes. The committed copy
//! is `openapi/v1.json` (the `contract` integration tests keep them equal).

use super::{
    audit, catalog, error, events, health, keys, operations, quotas, reports, resource_types,
    resources, tenants, webhooks, wire,
};
use crate::domain::resource_type::ResourceType;
use crate::domain::OperationState;
use crate::registry::Snapshot;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API's contract, as utoipa derives it; [`document`] is the published form.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Control-plane gateway",
        version = "1",
        description = "One front door for VMs, bare-metal servers, Kubernetes clusters, volumes and every resource type registered at `/v1/resource-types`. Writes answer `202` with an operation to poll. `v1` grows only additively: see README, API contract and versioning. The document served at `/v1/openapi.json` adds, for each registered type, its schemas (`{Kind}Spec`, `{Kind}Status`, `{Kind}{Action}Input`) and its own routes under `/v1/tenants/{tenant}/{plural}`.",
    ),
    paths(
        resources::create, resources::read, resources::list, resources::delete,
        resources::patch, resources::action,
        operations::read, operations::list, operations::report, operations::cancel,
        reports::reports,
        tenants::create, tenants::list, tenants::read,
        catalog::zones, catalog::entries,
        keys::create, keys::list, keys::revoke, keys::list_platform, keys::revoke_any,
        audit::list, quotas::read, quotas::replace, events::events,
        webhooks::create, webhooks::list, webhooks::read, webhooks::change, webhooks::delete,
        webhooks::rotate, webhooks::deliveries, webhooks::delivery, webhooks::retry,
        resource_types::list, resource_types::read, resource_types::create,
        resource_types::replace, resource_types::remove,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(
        error::ErrorBody, wire::CreateResourceIn, wire::ResourceOut, wire::OperationOut,
        crate::domain::spec::Category, crate::domain::Phase, gateway_proto::Dispatch,
        gateway_proto::events::CloudEvent, events::EventPage,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// A DNS label, as `domain::names::validate_label` accepts it.
pub const LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// A label key and value, as `domain::names::validate_labels` accepts them.
const LABEL_KEY: &str = "[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?";
const LABEL_VALUE: &str = "[A-Za-z0-9._-]{0,63}";
/// `?wait=`, as `operations::parse_wait` accepts it.
const WAIT_PATTERN: &str = "^[0-9]{1,18}(ms|s|m)?$";
/// `If-Match`: `*` or a version, quoted or not, weak or not.
const IF_MATCH_PATTERN: &str = "^(\\*|(W/)?\"?[0-9]{1,18}\"?)$";
/// Cursors of lists ordered by sequence (operations, audit): hex of `s:{seq}`.
const SEQ_CURSOR: &str = "^733a(3[0-9]){1,18}$";
/// Cursors of resource lists: hex of `t:{micros}:{uuid}`.
const TIME_CURSOR: &str = "^743a(2d(3[0-9]){1,16}|(3[0-9]){1,17})3a(3[0-9]|6[1-6]){8}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){4}2d(3[0-9]|6[1-6]){12}$";
/// A kind's, service's or action's name (`gateway_proto::is_registered_name`).
const NAME_PATTERN: &str = "^[a-z][a-z0-9_]{0,31}$";
/// A kind's plural, as `domain::resource_type` accepts it.
const PLURAL_PATTERN: &str = crate::domain::resource_type::PLURAL_PATTERN;
/// An `Idempotency-Key`, as `extract::WriteHeaders` accepts it.
const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";

/// The published document: [`ApiDoc`] completed with what every route shares.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
        complete(&mut doc);
        doc
    })
}

fn strings<T: std::fmt::Display>(values: &[T]) -> Value {
    values
        .iter()
        .map(|v| Value::String(v.to_string()))
        .collect()
}

/// A response header (string or integer) with a description.
fn header(kind: &str, description: &str) -> Value {
    json!({"description": description, "schema": {"type": kind}})
}

/// An error answer: the error body, `X-Request-Id`, and `Retry-After` when given.
fn error_response(description: &str, retry_after: bool) -> Value {
    let mut headers = Map::new();
    headers.insert(
        "X-Request-Id".into(),
        json!({"$ref": "#/components/headers/X-Request-Id"}),
    );
    if retry_after {
        headers.insert(
            "Retry-After".into(),
            json!({"$ref": "#/components/headers/Retry-After"}),
        );
    }
    json!({
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    })
}

/// Adds to `doc` everything [`ApiDoc`] leaves out (see the module's documentation).
fn complete(doc: &mut Value) {
    doc["openapi"] = json!("3.1.0");
    let schemas = &mut doc["components"]["schemas"];
    enums(schemas);
    examples(schemas);
    strict(schemas);
    shared_components(doc["components"].as_object_mut().expect("components"));
    let paths = doc["paths"].as_object_mut().expect("paths");
    for (path, item) in paths.iter_mut() {
        let item = item.as_object_mut().expect("path item");
        for (method, op) in item.iter_mut() {
            complete_operation(path, method, op);
        }
    }
    event_type_filter(doc);
}

/// `?type=` of the events route: a comma-separated list of event types.
fn event_type_filter(doc: &mut Value) {
    let one = gateway_proto::events::EventType::ALL
        .iter()
        .map(|t| t.as_str().replace('.', "\\."))
        .collect::<Vec<_>>()
        .join("|");
    let pattern = format!("^({one})(,({one}))*$");
    let params = doc["paths"]["/v1/tenants/{tenant}/events"]["get"]["parameters"]
        .as_array_mut()
        .expect("the events route has parameters");
    for p in params.iter_mut().filter(|p| p["name"] == "type") {
        p["schema"]["pattern"] = json!(pattern);
    }
}

/// The enums' schemas.
fn enums(schemas: &mut Value) {
    // The enums of `gateway_proto` rename each variant; utoipa cannot see through the
    // macro that defines them, so their schemas are written from the values themselves.
    // Kinds, services and actions are registered as data: any well-formed name.
    for (name, description) in [
        (
            "Kind",
            "A kind of resource, as registered (`vm`, `bm`, `cluster`, `volume`, …).",
        ),
        (
            "Action",
            "What an operation does: `create`, `update`, `delete`, or an action of the kind.",
        ),
        (
            "Service",
            "A backend service, as its resource types name it (`vm`, `k8s`, …).",
        ),
    ] {
        schemas[name] =
            json!({"type": "string", "pattern": NAME_PATTERN, "description": description});
    }
    for (name, values, description) in [
        (
            "OperationState",
            strings(OperationState::ALL),
            "Where an operation is.",
        ),
        (
            "EventType",
            strings(gateway_proto::events::EventType::ALL),
            "What an event says happened.",
        ),
        (
            "Phase",
            strings(crate::domain::Phase::ALL),
            "Coarse lifecycle of a resource, derived from its operations.",
        ),
    ] {
        schemas[name] = json!({"type": "string", "enum": values, "description": description});
    }
    schemas["ErrorBody"]["properties"]["code"]["pattern"] = json!("^[a-z_]+$");
}

/// Examples of the main answers.
fn examples(schemas: &mut Value) {
    schemas["OperationOut"]["example"] = json!({
        "id": "0193a6c2-5b1e-7c3d-9a8b-1f2e3d4c5b6a", "tenant": "acme",
        "resource_id": "0193a6c2-5b1d-7aa0-8b2c-3d4e5f6a7b8c", "kind": "vm", "zone": "zone-a",
        "action": "create", "state": "pending", "done": false, "attempt": 0, "input": {},
        "target_generation": 1, "cancel_requested": false,
        "request_id": "0193a6c2-5b1c-7f00-a1b2-c3d4e5f6a7b8",
        "created_at": "2026-11-26T12:00:00Z", "updated_at": "2026-11-26T12:00:00Z",
        "deadline": "2026-11-26T13:00:00Z",
    });
    schemas["ResourceOut"]["example"] = json!({
        "id": "0193a6c2-5b1d-7aa0-8b2c-3d4e5f6a7b8c", "tenant": "acme", "kind": "vm",
        "zone": "zone-a", "name": "web-1", "labels": {"env": "prod"},
        "spec": {"flavor": "m1.small", "image": "debian-12", "power_state": "running"},
        "status": {"power_state": "running", "ip": "10.0.0.7"}, "phase": "ready",
        "generation": 1, "observed_generation": 1,
        "created_at": "2026-11-26T12:00:00Z", "updated_at": "2026-11-26T12:00:02Z",
    });
    schemas["ErrorBody"]["example"] = json!({
        "code": "invalid_name", "message": "name: \"Web_1\" has a character that is not allowed",
        "details": {"field": "name"}, "request_id": "0193a6c2-5b1c-7f00-a1b2-c3d4e5f6a7b8",
    });
}

/// Bounds and patterns the server checks and utoipa cannot derive.
fn strict(schemas: &mut Value) {
    schemas["Report"]["properties"]["attempt"]["minimum"] = json!(1);
    let batch = &mut schemas["ReportBatch"]["properties"]["reports"];
    batch["minItems"] = json!(1);
    batch["maxItems"] = json!(gateway_proto::MAX_BATCH_REPORTS);
    schemas["BatchedReport"]["properties"]["request_id"]["pattern"] = json!("^[!-~]{1,128}$");
    schemas["LimitIn"]["properties"]["limit"]["minimum"] = json!(0);
    // A patch needs `spec` or `labels` (`null` counts as absent).
    let patch = &mut schemas["PatchIn"];
    patch["properties"]["spec"]["type"] = json!(["object", "null"]);
    patch["properties"]["labels"] = json!({
        "type": ["object", "null"],
        "description": "Labels to set (a string) or remove (`null`); the others stay.",
        "propertyNames": {"pattern": format!("^{LABEL_KEY}$")},
        "additionalProperties": {"type": ["string", "null"], "pattern": format!("^{LABEL_VALUE}$")},
    });
    patch["anyOf"] = json!([
        {"required": ["spec"], "properties": {"spec": {"type": "object"}}},
        {"required": ["labels"], "properties": {"labels": {"type": "object"}}},
    ]);
    let labels = json!({
        "type": "object", "maxProperties": 32,
        "propertyNames": {"pattern": format!("^{LABEL_KEY}$")},
        "additionalProperties": {"type": "string", "pattern": format!("^{LABEL_VALUE}$")},
    });
    schemas["CreateResourceIn"]["properties"]["labels"] = labels;
    // Names the server checks as DNS labels (`invalid_name` otherwise).
    for (schema, field) in [
        ("CreateResourceIn", "name"),
        ("CreateResourceIn", "zone"),
        ("TenantIn", "id"),
        ("KeyIn", "name"),
        ("KeyIn", "zone"),
    ] {
        let property = &mut schemas[schema]["properties"][field];
        if property["type"].is_array() {
            property["type"] = json!(["string", "null"]);
        }
        property["pattern"] = json!(LABEL_PATTERN);
    }
}

/// The headers, parameters and error answers operations share.
fn shared_components(components: &mut Map<String, Value>) {
    components.insert(
        "headers".into(),
        json!({
            "X-Request-Id": header("string", "The request's ID: the client's `X-Request-Id` if it sent a sane one, else a new one. Every answer carries it."),
            "Retry-After": header("integer", "Seconds to wait before retrying or polling again."),
            "Location": header("string", "Where the created thing (or the operation to poll) is."),
            "ETag": header("string", "The resource's version, quoted; send it back in `If-Match`."),
        }),
    );
    components.insert(
        "parameters".into(),
        json!({
            "X-Request-Id": {"name": "X-Request-Id", "in": "header", "required": false,
                "description": "The client's request ID, echoed in the answer and the logs (kept if 1-200 visible ASCII characters).",
                "schema": {"type": "string"}},
            "Idempotency-Key": {"name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Makes retries safe: the same key with the same request returns the same operation; with another request `409 idempotency_key_reused`.",
                "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}, "example": "5b0c1f9e-create-web-1"},
            "Cache-Control": {"name": "Cache-Control", "in": "header", "required": false,
                "description": "`no-cache` (or `no-store`, `max-age=0`): read the database rather than this gateway's read cache, whose entries every change drops on every gateway within about a millisecond and which live `GATEWAY_READ_CACHE_MS` at most.",
                "schema": {"type": "string"}, "example": "no-cache"},
            "If-None-Match": {"name": "If-None-Match", "in": "header", "required": false,
                "description": "The ETag you hold (`\"3\"`, or a list of them), or `*`: if it is the current version, the answer is `304 Not Modified` with no body.",
                "schema": {"type": "string"}, "example": "\"3\""},
            "If-Match": {"name": "If-Match", "in": "header", "required": false,
                "description": "The ETag this change is based on (`\"3\"`), or `*`; a stale one answers `412 precondition_failed`.",
                "schema": {"type": "string", "pattern": IF_MATCH_PATTERN}, "example": "\"3\""},
        }),
    );
    components.insert(
        "responses".into(),
        json!({
            "BadRequest": error_response("`malformed_json`, `body_too_complex`, `invalid_idempotency_key`, `invalid_query` or `invalid_cursor`", false),
            "Unauthenticated": error_response("`unauthenticated`: no key, or an unknown, revoked or expired key", false),
            "Forbidden": error_response("`forbidden`: the key's role does not allow this", false),
            "NotFound": error_response("`not_found`, `tenant_not_found`: nothing visible to this key", false),
            "Conflict": error_response("`idempotency_key_reused`, `resource_deleting`, `invalid_state`, `name_taken` (`details.resource_id`: the live resource that has the name) or `quota_exceeded`", false),
            "PreconditionFailed": error_response("`precondition_failed`: `If-Match` does not name the current version (`details.current_etag`)", false),
            "PayloadTooLarge": error_response("`payload_too_large`: body over 64 KiB", false),
            "RequestTimeout": error_response("`request_timeout`: the body did not arrive within 10 s", false),
            "UnsupportedMediaType": error_response("`unsupported_media_type`: the body is not `application/json`", false),
            "Unprocessable": error_response("`invalid_body` and other validation codes; `details.field` names the field", false),
            "RateLimited": error_response("`rate_limited`: over the key's (or the address's) rate", true),
            "Internal": error_response("`internal`: an unexpected failure, logged with the request ID; nothing is said about it", false),
            "Unavailable": error_response("`database_unavailable`: retry after `Retry-After`; nothing was written, unless the connection was lost as the write committed, which a retry with the same `Idempotency-Key` finds; `timed_out`: not answered within 70 s, so a write may or may not have been recorded (a retry with the same `Idempotency-Key` tells)", true),
        }),
    );
}

/// The reads answered through the read cache (`readcache`), which take `Cache-Control`.
const READ_CACHED: [&str; 2] = ["/v1/operations/{id}", "/v1/tenants/{tenant}/{kind}/{id}"];

/// The header parameters defined once (`components/parameters`) and referenced by the
/// operations that take them ([`shared_headers`]).
const SHARED_HEADERS: [&str; 5] = [
    "X-Request-Id",
    "Cache-Control",
    "If-None-Match",
    "Idempotency-Key",
    "If-Match",
];

/// The shared header parameters (`components/parameters`) an operation takes.
fn shared_headers(path: &str, method: &str, api: bool, operation_write: bool) -> Vec<&'static str> {
    let mut names = Vec::new();
    if api {
        names.push("X-Request-Id");
    }
    if method == "get" && READ_CACHED.contains(&path) {
        names.push("Cache-Control");
    }
    if method == "get" && path == "/v1/tenants/{tenant}/{kind}/{id}" {
        names.push("If-None-Match");
    }
    if operation_write {
        names.push("Idempotency-Key");
        if method != "post" || path.ends_with("{action}") {
            names.push("If-Match");
        }
    }
    names
}

/// What decides an operation's shared parameters and answers.
struct Shape {
    api: bool,
    has_body: bool,
    has_query: bool,
    /// A write that makes an operation (`Idempotency-Key`, `409`).
    operation_write: bool,
    /// Takes `If-Match`.
    conditional: bool,
}

/// Completes one operation: parameters, shared answers, headers.
fn complete_operation(path: &str, method: &str, op: &mut Value) {
    let shape = parameters(path, method, op);
    shared_responses(path, &shape, op);
    response_headers(path, method, shape.api, op);
}

/// Fixes the operation's ID and parameters (shapes of path parameters, patterns of
/// query parameters, the shared headers).
fn parameters(path: &str, method: &str, op: &mut Value) -> Shape {
    let api = path.starts_with("/v1/");
    let has_body = op.get("requestBody").is_some();
    let is_write = matches!(method, "post" | "put" | "patch" | "delete");
    let operation_write = path.starts_with("/v1/tenants/{tenant}/{kind}") && is_write;
    // utoipa names operations after their handlers (`list`, `read`, …), which repeat
    // across modules; the tag makes them unique.
    if let (Some(tag), Some(id)) = (op["tags"][0].as_str(), op["operationId"].as_str()) {
        op["operationId"] = json!(format!("{tag}_{id}"));
    }
    let mut params: Vec<Value> = op["parameters"].as_array().cloned().unwrap_or_default();
    // The shared headers are added below, by reference; a handler's own stay.
    params.retain(|p| {
        let name = p["name"].as_str().unwrap_or_default();
        p["in"] != "header" || !SHARED_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name))
    });
    for p in params.iter_mut().filter(|p| p["name"] == "Last-Event-ID") {
        // Empty: no resume point (an `EventSource` that has not had an `id` yet).
        p["schema"] = json!({"type": "string", "pattern": r"^([0-9]{1,19})?$"});
    }
    for p in params.iter_mut() {
        if p["in"] == "path" {
            p["schema"] = match p["name"].as_str() {
                Some("tenant") => json!({"type": "string", "pattern": LABEL_PATTERN}),
                Some("kind") if path.starts_with("/v1/resource-types") => {
                    json!({"type": "string", "pattern": NAME_PATTERN})
                }
                Some("kind") => json!({"type": "string", "pattern": PLURAL_PATTERN}),
                Some("action") => json!({"type": "string", "pattern": NAME_PATTERN}),
                Some("category") => json!({"$ref": "#/components/schemas/Category"}),
                _ => p["schema"].take(),
            };
        }
    }
    for p in params.iter_mut().filter(|p| p["in"] == "query") {
        match p["name"].as_str() {
            Some("tenant") => p["schema"]["pattern"] = json!(LABEL_PATTERN),
            Some("outcome") => p["schema"]["enum"] = strings(&crate::audit::OUTCOMES),
            Some("wait") => p["schema"]["pattern"] = json!(WAIT_PATTERN),
            Some("label") => {
                let pair = format!("{LABEL_KEY}={LABEL_VALUE}");
                // No key twice (a lookahead with a back-reference: ECMA-262 regexes).
                let twice = r"(?!(?:.*,)?([a-z0-9._-]+)=[^,]*,(?:.*,)?\1=)";
                p["schema"]["pattern"] = json!(format!("^{twice}{pair}(,{pair}){{0,31}}$"));
            }
            Some("cursor")
                if path == "/v1/tenants/{tenant}/{kind}" || path.ends_with("/deliveries") =>
            {
                p["schema"]["pattern"] = json!(TIME_CURSOR)
            }
            Some("cursor") => p["schema"]["pattern"] = json!(SEQ_CURSOR),
            _ => {}
        }
    }
    let has_query = params.iter().any(|p| p["in"] == "query");
    if path.ends_with("/actions/{action}") {
        // Actions without input take an empty body as well as `{}`.
        op["requestBody"]["required"] = json!(false);
    }
    params.extend(
        shared_headers(path, method, api, operation_write)
            .into_iter()
            .map(|name| json!({"$ref": format!("#/components/parameters/{name}")})),
    );
    let conditional = params
        .iter()
        .any(|p| p["$ref"] == "#/components/parameters/If-Match");
    if params.is_empty() {
        op.as_object_mut().expect("operation").remove("parameters");
    } else {
        op["parameters"] = Value::Array(params);
    }
    Shape {
        api,
        has_body,
        has_query,
        operation_write,
        conditional,
    }
}

/// Adds the answers of the layers in front of the handler.
fn shared_responses(path: &str, shape: &Shape, op: &mut Value) {
    let responses = op["responses"].as_object_mut().expect("responses");
    let mut shared = |status: &str, name: &str| {
        responses
            .entry(status)
            .or_insert_with(|| json!({"$ref": format!("#/components/responses/{name}")}));
    };
    if !shape.api {
        return;
    }
    shared("401", "Unauthenticated");
    shared("403", "Forbidden");
    shared("429", "RateLimited");
    if shape.operation_write {
        shared("409", "Conflict");
    }
    if shape.conditional {
        shared("412", "PreconditionFailed");
    }
    shared("500", "Internal");
    shared("503", "Unavailable");
    if path.contains('{') {
        shared("404", "NotFound");
    }
    if shape.has_body || shape.has_query || shape.operation_write {
        shared("400", "BadRequest");
    }
    if shape.has_body {
        shared("408", "RequestTimeout");
        shared("413", "PayloadTooLarge");
        shared("415", "UnsupportedMediaType");
        shared("422", "Unprocessable");
    }
}

/// Names the headers of each answer the handler describes.
fn response_headers(path: &str, method: &str, api: bool, op: &mut Value) {
    let responses = op["responses"].as_object_mut().expect("responses");
    for (status, response) in responses.iter_mut() {
        if response.get("$ref").is_some() {
            continue;
        }
        let headers = response
            .as_object_mut()
            .expect("response")
            .entry("headers")
            .or_insert_with(|| json!({}));
        let headers = headers.as_object_mut().expect("headers");
        let mut add = |name: &str| {
            headers.insert(
                name.into(),
                json!({"$ref": format!("#/components/headers/{name}")}),
            );
        };
        if api {
            add("X-Request-Id");
        }
        match (status.as_str(), method) {
            ("202", _) => {
                add("Location");
                add("Retry-After");
            }
            ("201", "post") if path.ends_with("/keys") => add("Location"),
            ("200", "get") if path == "/v1/operations/{id}" => add("Retry-After"),
            ("200" | "304", "get") if path == "/v1/tenants/{tenant}/{kind}/{id}" => add("ETag"),
            ("503", _) | ("429", _) => add("Retry-After"),
            _ => {}
        }
        if headers.is_empty() {
            response
                .as_object_mut()
                .expect("response")
                .remove("headers");
        }
    }
}

/// The document as served: [`document`] with each registered type's schemas and routes.
pub fn document_for(types: &Snapshot) -> Value {
    let mut doc = document().clone();
    for t in types.types() {
        add_type(&mut doc, &t);
    }
    doc
}

/// `vm` → `Vm`, `load_balancer` → `LoadBalancer`: the prefix of a type's schema names.
fn pascal(name: &str) -> String {
    name.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Adds type `t`'s schemas, and its routes (copies of the generic `{kind}` routes with
/// its plural and its schemas in place).
fn add_type(doc: &mut Value, t: &ResourceType) {
    let (name, plural) = (pascal(t.kind().as_str()), t.def.plural.as_str());
    let schemas = &mut doc["components"]["schemas"];
    let spec_ref = json!({"$ref": format!("#/components/schemas/{name}Spec")});
    let mut place = |schema_name: String, schema: &Value| {
        schemas[&schema_name] = rebased(schema, &format!("#/components/schemas/{schema_name}"));
    };
    place(format!("{name}Spec"), &t.def.spec_schema);
    if let Some(status) = &t.def.status_schema {
        place(format!("{name}Status"), status);
    }
    schemas[format!("{name}CreateIn")] = json!({"allOf": [
        {"$ref": "#/components/schemas/CreateResourceIn"},
        {"properties": {"spec": spec_ref}},
    ]});
    let generic = "/v1/tenants/{tenant}/{kind}";
    let mut collection = doc["paths"][generic].clone();
    let mut item = doc["paths"][format!("{generic}/{{id}}")].clone();
    let action = doc["paths"][format!("{generic}/{{id}}/actions/{{action}}")]["post"].clone();
    specialize(&mut collection, t, &name);
    specialize(&mut item, t, &name);
    collection["post"]["requestBody"]["content"]["application/json"]["schema"] =
        json!({"$ref": format!("#/components/schemas/{name}CreateIn")});
    let paths = doc["paths"].as_object_mut().expect("paths");
    paths.insert(format!("/v1/tenants/{{tenant}}/{plural}"), collection);
    paths.insert(format!("/v1/tenants/{{tenant}}/{plural}/{{id}}"), item);
    for (action_name, def) in &t.def.actions {
        let input = format!("{name}{}Input", pascal(action_name.as_str()));
        let mut op = json!({"post": action.clone()});
        specialize(&mut op, t, &name);
        let post = &mut op["post"];
        post["operationId"] = json!(format!("{}_{}", t.kind(), action_name));
        if !def.description.is_empty() {
            post["summary"] = json!(def.description);
        }
        post["parameters"]
            .as_array_mut()
            .expect("parameters")
            .retain(|p| p["name"] != "action");
        post["requestBody"]["content"]["application/json"]["schema"] =
            json!({"$ref": format!("#/components/schemas/{input}")});
        doc["components"]["schemas"][&input] =
            rebased(&def.input_schema, &format!("#/components/schemas/{input}"));
        let path = format!("/v1/tenants/{{tenant}}/{plural}/{{id}}/actions/{action_name}");
        doc["paths"][path] = op;
    }
}

/// `schema` as placed at `at` in the document: its references within itself by JSON
/// pointer (`#/$defs/…`, `#`) point into its place there, since a reference in the
/// document is resolved against the document.
fn rebased(schema: &Value, at: &str) -> Value {
    rebase(schema, at, true)
}

fn rebase(schema: &Value, at: &str, root: bool) -> Value {
    match schema {
        // A subschema with an `$id` of its own is a resource of its own: its pointers
        // are relative to it, not to the type's schema, and stay as they are.
        Value::Object(fields) if !root && fields.contains_key("$id") => schema.clone(),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| match (k.as_str(), v.as_str()) {
                    // JSON pointers only: `#name` names an `$anchor`, wherever it is.
                    ("$ref" | "$dynamicRef", Some(r)) if r == "#" || r.starts_with("#/") => {
                        (k.clone(), json!(format!("{at}{}", &r[1..])))
                    }
                    _ => (k.clone(), rebase(v, at, false)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| rebase(v, at, false)).collect()),
        other => other.clone(),
    }
}

/// Makes a copy of a generic path item about type `t`: no `kind` parameter, its own
/// operation IDs and tag.
fn specialize(item: &mut Value, t: &ResourceType, name: &str) {
    let Some(methods) = item.as_object_mut() else {
        return;
    };
    for (method, op) in methods.iter_mut() {
        if let Some(params) = op["parameters"].as_array_mut() {
            params.retain(|p| p["name"] != "kind");
        }
        let id = op["operationId"]
            .as_str()
            .unwrap_or(method)
            .replace("resources_", "");
        op["operationId"] = json!(format!("{}_{id}", t.kind()));
        op["tags"] = json!([t.def.plural]);
        if method == "patch" {
            op["requestBody"]["content"]["application/json"]["schema"] = json!({"allOf": [
                {"$ref": "#/components/schemas/PatchIn"},
                {"properties": {"spec": {"description": format!("A JSON merge patch of a {name}Spec.")}}},
            ]});
        }
        if let Some(status) = t.def.status_schema.as_ref().map(|_| name) {
            op["x-status-schema"] = json!(format!("#/components/schemas/{status}Status"));
        }
    }
}

/// The routes of this module.
pub fn router() -> Router<super::AppState> {
    Router::new().route(
        "/v1/openapi.json",
        get(
            |axum::extract::State(state): axum::extract::State<super::AppState>| async move {
                Json(document_for(&state.engine.types.snapshot()))
            },
        ),
    )
}
