//! `/v1/tenants/{tenant}/{kind}`: create, read, list, change and delete resources of
//! every registered kind; `{kind}` is the kind's plural (`vms`, `bare-metal`,
//! `clusters`, `volumes`, or any registered through `/v1/resource-types`).

use super::error::ApiError;
use super::extract::{fingerprint, Caller, JsonBody, MaybeJsonBody, Meta, WriteHeaders};
use super::wire::{CreateResourceIn, OperationOut, Page, ResourceOut};
use super::{accepted, cursor, params, AppState};
use crate::domain::resource_type::ResourceType;
use crate::domain::{Action, Phase};
use crate::lifecycle::submit::{self, Change, CreateRequest, Idempotency, RequestMeta};
use crate::store::resources;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;
use utoipa::ToSchema;
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants/{tenant}/{kind}", get(list).post(create))
        .route(
            "/v1/tenants/{tenant}/{kind}/{id}",
            get(read).delete(delete).patch(patch),
        )
        .route(
            "/v1/tenants/{tenant}/{kind}/{id}/actions/{action}",
            post(action),
        )
}

/// Body of `PATCH /v1/tenants/{tenant}/{kind}/{id}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchIn {
    /// A JSON merge patch (RFC 7386) of the spec.
    #[serde(default)]
    #[schema(example = json!({"flavor": "m1.large"}))]
    pub spec: Option<serde_json::Value>,
    /// Labels to set (a string) or remove (`null`); the others stay.
    #[serde(default)]
    #[schema(example = json!({"env": "prod", "team": null}))]
    pub labels: Option<std::collections::BTreeMap<String, Option<String>>>,
}

/// Builds the lifecycle's view of a write request.
fn request_meta<'a>(
    principal: &'a crate::auth::Principal,
    meta: &'a Meta,
    headers: &'a WriteHeaders,
    fingerprint: &'a str,
) -> RequestMeta<'a> {
    RequestMeta {
        principal,
        request_id: &meta.request_id,
        traceparent: meta.traceparent.as_deref(),
        idempotency: headers
            .idempotency_key
            .as_deref()
            .map(|key| Idempotency { key, fingerprint }),
        audit: meta.audit(axum::http::StatusCode::ACCEPTED),
    }
}

/// The registered type whose plural is `segment`; none is a `404` like any unknown
/// route.
async fn resource_type(state: &AppState, segment: &str) -> Result<Arc<ResourceType>, ApiError> {
    state
        .engine
        .types
        .by_plural(segment)
        .await?
        .ok_or_else(|| ApiError::not_found("route"))
}

/// An ID from the path: a malformed one cannot name anything, so it is `404` for
/// `what` (`resource`, `operation`, …) like any unknown ID.
pub(crate) fn path_id(segment: &str, what: &str) -> Result<Uuid, ApiError> {
    segment.parse().map_err(|_| ApiError::not_found(what))
}

/// Create a resource. The answer is the `create` operation; poll it until `done`.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/{kind}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
    ),
    request_body = CreateResourceIn,
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 202, description = "Accepted; `Location` names the operation", body = OperationOut),
        (status = 400, description = "Malformed JSON", body = super::error::ErrorBody),
        (status = 404, description = "Unknown tenant", body = super::error::ErrorBody),
        (status = 409, description = "Name taken", body = super::error::ErrorBody),
        (status = 422, description = "Invalid body or spec", body = super::error::ErrorBody),
        (status = 503, description = "Database unavailable", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    headers: WriteHeaders,
    uri: axum::http::Uri,
    Path((tenant, kind_segment)): Path<(String, String)>,
    JsonBody(body): JsonBody<CreateResourceIn>,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    if let Some(elsewhere) = super::regions::zone_elsewhere(&state, &body.zone, &uri).await? {
        return Ok(elsewhere);
    }
    let print = fingerprint(
        "POST",
        &format!("/v1/tenants/{tenant}/{kind_segment}"),
        &serde_json::json!({"name": body.name, "zone": body.zone, "spec": body.spec, "labels": body.labels}),
    );
    let meta = request_meta(&principal, &meta, &headers, &print);
    let req = CreateRequest {
        name: body.name,
        zone: body.zone,
        spec: body.spec,
        labels: body.labels,
    };
    let op = submit::create(&state.engine, meta, &tenant, &rt, req).await?;
    Ok(accepted(&state, op))
}

/// Read one resource. Workers may read what their work needs: resources of their own
/// kind in their zone, and (storage workers) the VMs in their zone.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/{kind}/{id}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
        ("id" = Uuid, Path, description = "Resource ID"),
    ),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 200, description = "The resource; `ETag` is its version", body = ResourceOut),
        (status = 304, description = "Not modified: `If-None-Match` names the current version (`ETag`, no body)"),
        (status = 404, description = "No such resource in this tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, kind_segment, id)): Path<(String, String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    let kind = rt.kind();
    let id = path_id(&id, "resource")?;
    let types = state.engine.types.snapshot();
    let row = super::read_cache(&state, &headers)
        .resource(&state.engine.pool, &tenant, kind, id)
        .await?
        .filter(|r| principal.can_read(&tenant) || principal.reads_for_work(kind, &r.zone, &types))
        .map(std::sync::Arc::unwrap_or_clone)
        .ok_or_else(|| ApiError::not_found("resource"))?;
    let etag = format!("\"{}\"", row.version);
    let mut res = if names_version(&headers, row.version) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(ResourceOut::from(row)).into_response()
    };
    res.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("digits are a valid header"),
    );
    Ok(res)
}

/// Whether the request's `If-None-Match` names `version` (`"7"`, `W/"7"`, `7`, one of
/// a list) or is `*`: the client holds the current version, so the read answers `304 Not
/// Modified` with no body (RFC 9110, weak comparison). Anything else there, malformed
/// or not, names another version.
fn names_version(headers: &axum::http::HeaderMap, version: i64) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| {
            // Quotes optional, as `If-Match` takes them.
            let named = tag.trim_start_matches("W/").trim_matches('"');
            tag == "*" || named.parse::<i64>().ok() == Some(version)
        })
}

/// Filters and paging of resource lists.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only resources in this zone.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub zone: Option<String>,
    /// Only resources in this phase.
    pub phase: Option<Phase>,
    /// Only resources created at or after this instant (RFC 3339).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only resources carrying these labels: `env=prod` or `env=prod,team=db`.
    pub label: Option<String>,
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List live resources of one kind, newest first.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/{kind}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
        ListQuery,
    ),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 200, description = "One page", body = Page<ResourceOut>),
        (status = 400, description = "Bad cursor or limit", body = super::error::ErrorBody),
        (status = 404, description = "Unknown tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    uri: axum::http::Uri,
    Path((tenant, kind_segment)): Path<(String, String)>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    let zone = params::label("zone", q.zone)?;
    if let Some(zone) = &zone {
        if let Some(elsewhere) = super::regions::zone_elsewhere(&state, zone, &uri).await? {
            return Ok(elsewhere);
        }
    }
    super::readable_tenant(&state, &principal, &tenant).await?;
    let limit = super::page_limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(cursor::decode_time_id)
        .transpose()?;
    let filter = resources::ResourceFilter {
        zone,
        phase: q.phase,
        since: params::instant("since", q.since)?,
        labels: q.label.as_deref().map(params::selector).transpose()?,
    };
    let rows = super::read(&state, |db| {
        resources::list_live(db, &tenant, rt.kind(), &filter, after, limit + 1)
    })
    .await?;
    Ok(Json(cursor::page(
        rows,
        limit,
        |r| cursor::encode_time_id(r.created_at, r.id),
        ResourceOut::from,
    ))
    .into_response())
}

/// Delete a resource. The answer is the `delete` operation; deleting twice returns the
/// same operation.
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/{kind}/{id}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
        ("id" = Uuid, Path, description = "Resource ID"),
    ),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 202, description = "Accepted; `Location` names the operation", body = OperationOut),
        (status = 404, description = "No such resource in this tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    headers: WriteHeaders,
    Path((tenant, kind_segment, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    let id = path_id(&id, "resource")?;
    let print = fingerprint(
        "DELETE",
        &format!("/v1/tenants/{tenant}/{kind_segment}/{id}"),
        &serde_json::Value::Null,
    );
    let meta = request_meta(&principal, &meta, &headers, &print);
    let op = submit::delete(&state.engine, meta, &tenant, &rt, id, headers.if_match).await?;
    Ok(accepted(&state, op))
}

/// Change a resource's spec with a JSON merge patch. Bumps `generation`; the answer is
/// the `update` operation, which runs after the resource's earlier operations.
#[utoipa::path(
    patch, path = "/v1/tenants/{tenant}/{kind}/{id}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
        ("id" = Uuid, Path, description = "Resource ID"),
        ("If-Match" = Option<String>, Header, description = "The ETag this change is based on"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body = PatchIn,
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 202, description = "Accepted; `Location` names the operation", body = OperationOut),
        (status = 404, description = "No such resource in this tenant", body = super::error::ErrorBody),
        (status = 409, description = "`resource_deleting` or `idempotency_key_reused`", body = super::error::ErrorBody),
        (status = 412, description = "`precondition_failed`: If-Match is stale", body = super::error::ErrorBody),
        (status = 422, description = "The patched spec is invalid", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn patch(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    headers: WriteHeaders,
    Path((tenant, kind_segment, id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<PatchIn>,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    let id = path_id(&id, "resource")?;
    if body.spec.is_none() && body.labels.is_none() {
        let why = "a patch needs `spec`, `labels` or both";
        return Err(crate::domain::ValidationError::new("invalid_body", "spec", why).into());
    }
    let print = fingerprint(
        "PATCH",
        &format!("/v1/tenants/{tenant}/{kind_segment}/{id}"),
        &serde_json::json!({"spec": body.spec, "labels": body.labels}),
    );
    let meta = request_meta(&principal, &meta, &headers, &print);
    let change = Change::Patch {
        spec: body.spec.unwrap_or_else(|| serde_json::json!({})),
        labels: body.labels,
    };
    let op = submit::update(
        &state.engine,
        meta,
        &tenant,
        &rt,
        id,
        change,
        headers.if_match,
    )
    .await?;
    Ok(accepted(&state, op))
}

/// Run an action on a resource: one its type registers (`GET /v1/resource-types`). The
/// built-in kinds have: vms `start`, `stop`, `reboot`, `resize {"flavor"}`;
/// bare-metal `power_on`, `power_off`, `reprovision {"image"?}`; clusters
/// `scale {"node_count"}`, `upgrade {"version"}`; volumes `resize {"size_gb"}` (grow
/// only), `attach {"vm_id"}`, `detach`.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/{kind}/{id}/actions/{action}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "A registered kind's plural: `vms`, `bare-metal`, `clusters`, `volumes`, …"),
        ("id" = Uuid, Path, description = "Resource ID"),
        ("action" = String, Path, description = "An action of the kind"),
        ("If-Match" = Option<String>, Header, description = "The ETag this change is based on"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body(content = Object, description = "The action's input; empty or `{}` for actions without one"),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 202, description = "Accepted; `Location` names the operation", body = OperationOut),
        (status = 404, description = "No such resource, or no such action for the kind", body = super::error::ErrorBody),
        (status = 409, description = "`invalid_state`, `resource_deleting` or `idempotency_key_reused`", body = super::error::ErrorBody),
        (status = 412, description = "`precondition_failed`", body = super::error::ErrorBody),
        (status = 422, description = "Invalid input", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn action(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    headers: WriteHeaders,
    Path((tenant, kind_segment, id, action)): Path<(String, String, String, String)>,
    MaybeJsonBody(body): MaybeJsonBody,
) -> Result<Response, ApiError> {
    let rt = resource_type(&state, &kind_segment).await?;
    let id = path_id(&id, "resource")?;
    let action = action
        .parse::<Action>()
        .ok()
        .filter(|a| !a.is_core())
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "unknown_action",
                format!("a {} has no action {action:?}", rt.kind()),
            )
        })?;
    let input = body.unwrap_or_else(|| serde_json::json!({}));
    let print = fingerprint(
        "POST",
        &format!("/v1/tenants/{tenant}/{kind_segment}/{id}/actions/{action}"),
        &input,
    );
    let meta = request_meta(&principal, &meta, &headers, &print);
    let change = Change::Action(action, input);
    let op = submit::update(
        &state.engine,
        meta,
        &tenant,
        &rt,
        id,
        change,
        headers.if_match,
    )
    .await?;
    Ok(accepted(&state, op))
}
