//! Operations: read one, list a tenant's, and workers' reports.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody};
use super::resources::resource_id;
use super::wire::{OperationOut, Page};
use super::{cursor, AppState};
use crate::auth::Principal;
use crate::lifecycle::report;
use crate::store::{operations, operations::OperationRow, tenants};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_proto::{Report, ReportAck};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

/// Seconds a client should wait before polling an unfinished operation again.
pub const POLL_AFTER_SECS: u64 = 1;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/operations/{id}", get(read))
        .route("/v1/operations/{id}/reports", post(report))
        .route("/v1/tenants/{tenant}/operations", get(list))
}

/// Whether `principal` may see `op`: its tenant's readers, and the workers of its pool.
fn visible(principal: &Principal, op: &OperationRow) -> bool {
    principal.can_read(&op.tenant) || principal.can_report(op.kind.service(), &op.zone)
}

/// Read one operation. Unfinished ones carry `Retry-After`.
#[utoipa::path(
    get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = Uuid, Path, description = "Operation ID")),
    responses(
        (status = 200, description = "The operation", body = OperationOut),
        (status = 404, description = "No such operation visible to this key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = resource_id(&id).map_err(|_| ApiError::not_found("operation"))?;
    let op = operations::get(&state.engine.pool, id)
        .await?
        .filter(|op| visible(&principal, op))
        .ok_or_else(|| ApiError::not_found("operation"))?;
    let done = op.state.is_terminal();
    let mut res = Json(OperationOut::from(op)).into_response();
    if !done {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECS));
    }
    Ok(res)
}

/// Filters and paging of operation lists.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OperationQuery {
    /// Only operations on this resource.
    pub resource_id: Option<Uuid>,
    /// Page size, 1–500 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List a tenant's operations, newest first.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/operations", tag = "operations",
    params(("tenant" = String, Path, description = "Tenant ID"), OperationQuery),
    responses(
        (status = 200, description = "One page", body = Page<OperationOut>),
        (status = 400, description = "Bad cursor or limit", body = ErrorBody),
        (status = 404, description = "Unknown tenant", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(tenant): Path<String>,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<OperationOut>>, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    if !principal.can_read(&tenant) || tenants::get(&state.engine.pool, &tenant).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            "tenant not found",
        ));
    }
    let limit = super::page_limit(q.limit)?;
    let before = q.cursor.as_deref().map(cursor::decode_seq).transpose()?;
    let rows = operations::list_for_tenant(
        &state.engine.pool,
        &tenant,
        q.resource_id,
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(cursor::page(
        rows,
        limit,
        |o| cursor::encode_seq(o.seq),
        OperationOut::from,
    )))
}

/// A worker reports progress or the outcome of an operation of its service and zone.
/// Repeating a report is harmless; a stale or contradicting one gets `409`.
#[utoipa::path(
    post, path = "/v1/operations/{id}/reports", tag = "workers",
    params(("id" = Uuid, Path, description = "Operation ID")),
    request_body = Report,
    responses(
        (status = 200, description = "Accepted (or a repeat of an accepted report)", body = ReportAck),
        (status = 403, description = "Not this worker's service or zone", body = ErrorBody),
        (status = 404, description = "No such operation", body = ErrorBody),
        (status = 409, description = "`operation_finished`, `stale_attempt` or `operation_not_dispatched`", body = ErrorBody),
        (status = 422, description = "`invalid_report` or `invalid_body`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn report(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Report>,
) -> Result<Json<ReportAck>, ApiError> {
    let id = resource_id(&id).map_err(|_| ApiError::not_found("operation"))?;
    let ack = report::apply(&state.engine, &principal, id, &body)
        .await
        .map_err(|e| match e {
            crate::lifecycle::LifecycleError::NotFound => ApiError::not_found("operation"),
            e => e.into(),
        })?;
    Ok(Json(ack))
}
