//! `POST /v1/reports`: a worker's reports in one request and one transaction, each
//! accepted or refused on its own.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::AppState;
use crate::lifecycle::{report, LifecycleError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use gateway_proto::{BatchedReportResult, ReportBatch, ReportBatchResult, MAX_BATCH_REPORTS};

/// The route.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/reports", post(reports))
}

/// A worker reports on several operations of its service and zone at once. The reports
/// apply in order, in one transaction; each result says what
/// `POST /v1/operations/{id}/reports` would have answered that report alone (`200` with
/// its acknowledgement, or the refusal's status and code; `307 other_region` for an
/// operation another region made, its message naming the address to report to). A
/// refused report changes nothing; the others still apply.
#[utoipa::path(
    post, path = "/v1/reports", tag = "workers",
    request_body = ReportBatch,
    responses(
        (status = 200, description = "Every report's result, in order", body = ReportBatchResult),
        (status = 422, description = "`invalid_batch` (no reports, or more than 100), `invalid_report` (an attempt below 1) or `invalid_body`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn reports(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    JsonBody(body): JsonBody<ReportBatch>,
) -> Result<Json<ReportBatchResult>, ApiError> {
    if body.reports.is_empty() || body.reports.len() > MAX_BATCH_REPORTS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_batch",
            format!(
                "a batch carries 1 to {MAX_BATCH_REPORTS} reports, not {}",
                body.reports.len()
            ),
        ));
    }
    // What the contract's schema forbids fails the whole request, as it does alone.
    for (i, r) in body.reports.iter().enumerate() {
        if r.request_id
            .as_deref()
            .is_some_and(|id| !super::request::is_request_id(id))
        {
            return Err(invalid_item(
                i,
                "invalid_body",
                "request_id",
                "1 to 128 visible ASCII characters",
            ));
        }
        if r.report.attempt < 1 {
            return Err(invalid_item(
                i,
                "invalid_report",
                "report.attempt",
                "must be 1 or more",
            ));
        }
    }
    let audit = meta.audit(StatusCode::OK);
    let refuse = |e: LifecycleError| {
        let e = super::operations::operation_error(e);
        (e.status.as_u16(), e)
    };
    let each = report::AuditedAs {
        action: super::operations::REPORT_ACTION,
        target: |id| super::operations::REPORT_ROUTE.replace("{id}", &id.to_string()),
    };
    let outcomes = report::apply_batch(
        &state.engine,
        &principal,
        audit,
        &body.reports,
        each,
        refuse,
    )
    .await?;
    let mut results = Vec::with_capacity(outcomes.len());
    for (item, outcome) in body.reports.iter().zip(outcomes) {
        let id = item.operation_id;
        let outcome = match outcome {
            // Alone, the report would have been redirected to the region that made the
            // operation: its result says so, naming that region's address.
            Err(e) if e.status == StatusCode::NOT_FOUND => {
                let route = super::operations::REPORT_ROUTE.replace("{id}", &id.to_string());
                Err(super::regions::made_elsewhere(&state, id, &route)
                    .await
                    .unwrap_or(e))
            }
            other => other,
        };
        results.push(result(id, outcome));
    }
    Ok(Json(ReportBatchResult { results }))
}

/// `422 {code}` about `field` of the batch's report `i`.
fn invalid_item(i: usize, code: &'static str, field: &str, rule: &str) -> ApiError {
    let field = format!("reports[{i}].{field}");
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        code,
        format!("{field}: {rule}"),
    )
    .with_details(serde_json::json!({ "field": field }))
}

/// One report's result, as the single-report endpoint would have answered it.
fn result(
    operation_id: uuid::Uuid,
    outcome: Result<gateway_proto::ReportAck, ApiError>,
) -> BatchedReportResult {
    match outcome {
        Ok(ack) => BatchedReportResult {
            operation_id,
            status: StatusCode::OK.as_u16(),
            ack: Some(ack),
            code: None,
            message: None,
        },
        Err(e) => BatchedReportResult {
            operation_id,
            status: e.status.as_u16(),
            ack: None,
            code: Some(e.code.into_owned()),
            message: Some(e.message),
        },
    }
}
