//! Operations: read one, list a tenant's, and workers' reports.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::resources::path_id;
use super::wire::{OperationOut, Page};
use super::{cursor, params, AppState};
use crate::auth::Principal;
use crate::domain::{Kind, OperationState};
use crate::lifecycle::report;
use crate::readcache::ReadCache;
use crate::store::{operations, operations::OperationRow};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_proto::{Report, ReportAck};
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;
use utoipa::IntoParams;
use uuid::Uuid;

/// The route of a worker's report on one operation. A report in a batch
/// (`POST /v1/reports`) is audited as a request to it.
pub(super) const REPORT_ROUTE: &str = "/v1/operations/{id}/reports";

/// The audit action of a request to [`REPORT_ROUTE`]: method and route template.
pub(super) const REPORT_ACTION: &str = "POST /v1/operations/{id}/reports";

/// Seconds a client should wait before polling an unfinished operation again.
pub const POLL_AFTER_SECS: u64 = 1;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/operations/{id}", get(read))
        .route(REPORT_ROUTE, post(report))
        .route("/v1/operations/{id}/cancel", post(cancel))
        .route("/v1/tenants/{tenant}/operations", get(list))
}

/// A lifecycle error about an operation addressed by ID: a missing one is
/// `404 not_found` ("operation not found").
pub(super) fn operation_error(e: crate::lifecycle::LifecycleError) -> ApiError {
    match e {
        crate::lifecycle::LifecycleError::NotFound => ApiError::not_found("operation"),
        e => e.into(),
    }
}

/// Whether `principal` may see `op`: its tenant's readers, and the workers of its pool.
fn visible(principal: &Principal, op: &OperationRow, engine: &crate::lifecycle::Engine) -> bool {
    principal.can_read(&op.tenant)
        || principal.can_report(&engine.service_label(&op.kind), &op.zone)
}

/// The longest `wait` a long-poll may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a long-poll re-reads even without a notification (a safety net for lost
/// notifications, not a busy loop).
const RECHECK: Duration = Duration::from_secs(5);

/// Query of `GET /v1/operations/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Long-poll: answer as soon as the operation's state changes (or, with
    /// `until=done`, as soon as it ends), or after this long (`500ms`, `30s`, `1m`; at
    /// most 60 s).
    pub wait: Option<String>,
    /// What `wait` waits for (without `wait`, nothing: the operation is read at once).
    /// `changed` (the default): any change of state, for progress displays. `done`: the
    /// end (`succeeded`, `failed` or `cancelled`), so a client waiting for the outcome
    /// makes one request instead of one per state.
    #[param(inline)]
    pub until: Option<Until>,
}

/// What a long-poll waits for (`GET /v1/operations/{id}?wait=…&until=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Until {
    /// Any change of state.
    #[default]
    Changed,
    /// A final state.
    Done,
}

/// Parses `500ms`, `30s`, `2m` or a plain number of seconds.
pub fn parse_wait(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    // At most 18 digits, as the contract's pattern says; within it every value parses.
    if number.len() > 18 {
        return None;
    }
    let n: u64 = number.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        // Capped at MAX_WAIT below, so a huge number of minutes is the longest wait.
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return None,
    };
    Some(d.min(MAX_WAIT))
}

/// Read one operation; with `?wait=`, wait for it to change state first (with
/// `&until=done`, for it to end). Unfinished ones carry `Retry-After`.
#[utoipa::path(
    get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = Uuid, Path, description = "Operation ID"), ReadQuery),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 200, description = "The operation", body = OperationOut),
        (status = 400, description = "`invalid_query`: bad wait or until", body = ErrorBody),
        (status = 404, description = "No such operation visible to this key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    credential: Option<axum::Extension<super::guard::Credential>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    let wait = q
        .wait
        .as_deref()
        .map(|w| {
            parse_wait(w).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("wait: not a duration: {w:?}"),
                )
            })
        })
        .transpose()?;
    let id = path_id(&id, "operation")?;
    // Interest before the first read, so no change between the two is missed.
    let interest = wait.map(|_| state.engine.changes.interest(id));
    let mut op = read_visible(&state, &super::read_cache(&state, &headers), &principal, id).await?;
    if let (Some(wait), Some(interest)) = (wait, interest) {
        let until = q.until.unwrap_or_default();
        op = wait_for(&state, &principal, interest, op, wait, until).await?;
        // The key may have been revoked (or have expired) while the request waited.
        if let Some(axum::Extension(credential)) = &credential {
            super::guard::still_valid(&state, credential).await?;
        }
    }
    let done = op.state.is_terminal();
    let mut res = Json(OperationOut::from(op)).into_response();
    if !done {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(POLL_AFTER_SECS));
    }
    Ok(res)
}

/// The long-poll of `op` (read once already, after `interest` was registered): waits
/// up to `wait` for its state to change (or, with `until=done`, for it to end) and
/// answers it as it is then.
///
/// Waiting for the end, a change that did not end the operation is not read; if one
/// came since the last read, the operation is read once more at the deadline, so the
/// answer is never older than the last change announced. An end announced since the
/// last read, even before the next wait began, is in the interest's count.
async fn wait_for(
    state: &AppState,
    principal: &crate::auth::Principal,
    interest: crate::changes::Interest,
    mut op: OperationRow,
    wait: Duration,
    until: Until,
) -> Result<OperationRow, ApiError> {
    let deadline = Instant::now() + wait;
    let initial = op.state;
    let mut unread = false;
    // Every re-read after the first reads the database, never the cache.
    let fresh = ReadCache::default();
    loop {
        let moved = until == Until::Changed && op.state != initial;
        if op.state.is_terminal() || moved {
            return Ok(op);
        }
        if Instant::now() >= deadline {
            if unread {
                op = read_visible(state, &fresh, principal, op.id).await?;
            }
            return Ok(op);
        }
        let changed = interest.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let recheck = tokio::time::sleep_until(deadline.min(Instant::now() + RECHECK));
        let reread = interest.may_have_ended()
            || tokio::select! {
                _ = changed => until == Until::Changed || interest.may_have_ended(),
                _ = recheck => true,
            };
        unread = !reread;
        if reread {
            op = read_visible(state, &fresh, principal, op.id).await?;
        }
    }
}

/// Operation `id` (through `cache`), if `principal` may see it.
async fn read_visible(
    state: &AppState,
    cache: &ReadCache,
    principal: &crate::auth::Principal,
    id: Uuid,
) -> Result<OperationRow, ApiError> {
    cache
        .operation(&state.engine.pool, id)
        .await?
        .filter(|op| visible(principal, op, &state.engine))
        .map(std::sync::Arc::unwrap_or_clone)
        .ok_or_else(|| ApiError::not_found("operation"))
}

/// Filters and paging of operation lists.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OperationQuery {
    /// Only operations in this state.
    pub state: Option<OperationState>,
    /// Only operations on resources of this kind (`vm`, `bm`, `cluster`, `volume`).
    pub kind: Option<Kind>,
    /// Only operations in this zone.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub zone: Option<String>,
    /// Only operations on this resource.
    pub resource_id: Option<Uuid>,
    /// Only operations submitted at or after this instant (RFC 3339).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
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
        (status = 307, description = "Another region's zone (`?zone=`): the same request at `Location`, that region's gateway (`other_region`)", body = ErrorBody),
        (status = 400, description = "Bad cursor or limit", body = ErrorBody),
        (status = 404, description = "Unknown tenant", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    uri: axum::http::Uri,
    Path(tenant): Path<String>,
    query: Result<Query<OperationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    let zone = params::label("zone", q.zone)?;
    // Another region's zone: its operations are there, as its resources are.
    if let Some(zone) = &zone {
        if let Some(elsewhere) = super::regions::zone_elsewhere(&state, zone, &uri).await? {
            return Ok(elsewhere);
        }
    }
    super::readable_tenant(&state, &principal, &tenant).await?;
    let limit = super::page_limit(q.limit)?;
    let before = q.cursor.as_deref().map(cursor::decode_seq).transpose()?;
    let filter = operations::OperationFilter {
        state: q.state,
        kind: params::registered_kind(&state.engine.types, q.kind)?,
        zone,
        resource_id: q.resource_id,
        since: params::instant("since", q.since)?,
    };
    let rows = super::read(&state, |db| {
        operations::list_for_tenant(db, &tenant, &filter, before, limit + 1)
    })
    .await?;
    Ok(Json(cursor::page(
        rows,
        limit,
        |o| cursor::encode_seq(o.seq),
        OperationOut::from,
    ))
    .into_response())
}

/// A worker reports progress or the outcome of an operation of its service and zone.
/// Repeating a report is harmless; a stale or contradicting one gets `409`.
#[utoipa::path(
    post, path = "/v1/operations/{id}/reports", tag = "workers",
    params(("id" = Uuid, Path, description = "Operation ID")),
    request_body = Report,
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
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
    meta: Meta,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Report>,
) -> Result<Json<ReportAck>, ApiError> {
    let id = path_id(&id, "operation")?;
    let audit = meta.audit(StatusCode::OK);
    let ack = report::apply(&state.engine, &principal, id, audit, &body)
        .await
        .map_err(operation_error)?;
    Ok(Json(ack))
}

/// Cancel an operation. One that no worker started is cancelled at once; a running one
/// is asked to stop, and its terminal state says whether it did (`cancelled`) or
/// finished first.
#[utoipa::path(
    post, path = "/v1/operations/{id}/cancel", tag = "operations",
    params(("id" = Uuid, Path, description = "Operation ID")),
    responses(
        (status = 307, description = "Another region's zone or resource: the same request at `Location`, that region's gateway (`other_region`)", body = super::error::ErrorBody),
        (status = 200, description = "Cancelled, or cancellation requested (`cancel_requested`)", body = OperationOut),
        (status = 403, description = "A read-only key", body = ErrorBody),
        (status = 404, description = "No such operation visible to this key", body = ErrorBody),
        (status = 409, description = "`operation_finished`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(id): Path<String>,
) -> Result<Json<OperationOut>, ApiError> {
    let id = path_id(&id, "operation")?;
    let audit = meta.audit(StatusCode::OK);
    let op = crate::lifecycle::cancel::cancel(&state.engine, &principal, id, audit)
        .await
        .map_err(operation_error)?;
    Ok(Json(op.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_with_units_and_are_capped() {
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_wait("5m"), Some(MAX_WAIT));
        // Any value the contract's pattern allows parses (found by schemathesis: this one
        // overflowed in minutes and answered 400).
        assert_eq!(parse_wait("472631541394091380m"), Some(MAX_WAIT));
        assert_eq!(parse_wait("999999999999999999s"), Some(MAX_WAIT));
        for bad in [
            "",
            "s",
            "-1s",
            "1h",
            "1.5s",
            "soon",
            "18446744073709551615m",
        ] {
            assert_eq!(parse_wait(bad), None, "{bad}");
        }
    }
}
