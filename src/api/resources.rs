//! `/v1/tenants/{tenant}/{kind}`: create, read, list and delete resources of the four
//! kinds (`vms`, `bare-metal`, `clusters`, `volumes`).

use super::error::ApiError;
use super::extract::{Caller, JsonBody, Meta};
use super::wire::{CreateResourceIn, OperationOut, Page, ResourceOut};
use super::{accepted, cursor, AppState};
use crate::domain::{kind_from_path, Kind};
use crate::lifecycle::submit::{self, CreateRequest, RequestMeta};
use crate::store::{resources, tenants};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants/{tenant}/{kind}", get(list).post(create))
        .route("/v1/tenants/{tenant}/{kind}/{id}", get(read).delete(delete))
}

fn kind(segment: &str) -> Result<Kind, ApiError> {
    kind_from_path(segment).ok_or_else(|| ApiError::not_found("route"))
}

/// A resource ID from the path; a malformed one cannot name anything.
pub(crate) fn resource_id(segment: &str) -> Result<Uuid, ApiError> {
    segment.parse().map_err(|_| ApiError::not_found("resource"))
}

/// Create a resource. The answer is the `create` operation; poll it until `done`.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/{kind}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "`vms`, `bare-metal`, `clusters` or `volumes`"),
    ),
    request_body = CreateResourceIn,
    responses(
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
    Path((tenant, kind_segment)): Path<(String, String)>,
    JsonBody(body): JsonBody<CreateResourceIn>,
) -> Result<Response, ApiError> {
    let kind = kind(&kind_segment)?;
    let meta = RequestMeta {
        principal: &principal,
        request_id: &meta.request_id,
        traceparent: meta.traceparent.as_deref(),
    };
    let req = CreateRequest {
        name: body.name,
        zone: body.zone,
        spec: body.spec,
    };
    let op = submit::create(&state.engine, meta, &tenant, kind, req).await?;
    Ok(accepted(op))
}

/// Read one resource.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/{kind}/{id}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "`vms`, `bare-metal`, `clusters` or `volumes`"),
        ("id" = Uuid, Path, description = "Resource ID"),
    ),
    responses(
        (status = 200, description = "The resource; `ETag` is its version", body = ResourceOut),
        (status = 404, description = "No such resource in this tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, kind_segment, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let kind = kind(&kind_segment)?;
    let id = resource_id(&id)?;
    if !principal.can_read(&tenant) {
        return Err(ApiError::not_found("resource"));
    }
    let row = resources::get_live(&state.engine.pool, &tenant, kind, id)
        .await?
        .ok_or_else(|| ApiError::not_found("resource"))?;
    let etag = format!("\"{}\"", row.version);
    let mut res = Json(ResourceOut::from(row)).into_response();
    res.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("digits are a valid header"),
    );
    Ok(res)
}

/// Filters and paging of resource lists.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only resources in this zone.
    pub zone: Option<String>,
    /// Page size, 1–500 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List live resources of one kind, newest first.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/{kind}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "`vms`, `bare-metal`, `clusters` or `volumes`"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "One page", body = Page<ResourceOut>),
        (status = 400, description = "Bad cursor or limit", body = super::error::ErrorBody),
        (status = 404, description = "Unknown tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, kind_segment)): Path<(String, String)>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<ResourceOut>>, ApiError> {
    let kind = kind(&kind_segment)?;
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    if !principal.can_read(&tenant) || tenants::get(&state.engine.pool, &tenant).await?.is_none() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "tenant_not_found",
            "tenant not found",
        ));
    }
    let limit = super::page_limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(cursor::decode_time_id)
        .transpose()?;
    let rows = resources::list_live(
        &state.engine.pool,
        &tenant,
        kind,
        q.zone.as_deref(),
        after,
        limit + 1,
    )
    .await?;
    Ok(Json(cursor::page(
        rows,
        limit,
        |r| cursor::encode_time_id(r.created_at, r.id),
        ResourceOut::from,
    )))
}

/// Delete a resource. The answer is the `delete` operation; deleting twice returns the
/// same operation.
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/{kind}/{id}", tag = "resources",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("kind" = String, Path, description = "`vms`, `bare-metal`, `clusters` or `volumes`"),
        ("id" = Uuid, Path, description = "Resource ID"),
    ),
    responses(
        (status = 202, description = "Accepted; `Location` names the operation", body = OperationOut),
        (status = 404, description = "No such resource in this tenant", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, kind_segment, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let kind = kind(&kind_segment)?;
    let id = resource_id(&id)?;
    let meta = RequestMeta {
        principal: &principal,
        request_id: &meta.request_id,
        traceparent: meta.traceparent.as_deref(),
    };
    let op = submit::delete(&state.engine, meta, &tenant, kind, id).await?;
    Ok(accepted(op))
}
