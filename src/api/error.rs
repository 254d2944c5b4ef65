//! One error shape for every answer: `{code, message, details, request_id}`.
//!
//! Handlers return [`ApiError`]; it renders its status and a marker, and the request
//! middleware (see `api::request`) writes the JSON body with the request ID, so no
//! handler has to thread the ID through. 5xx bodies say nothing internal; the cause is
//! logged with the request ID.

use crate::domain::report::Rejection;
use crate::lifecycle::LifecycleError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code; see the table in README.md.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured details (for example the offending `field`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// The request's ID, as in the `X-Request-Id` header.
    pub request_id: String,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: std::borrow::Cow<'static, str>,
    /// Human-readable explanation.
    pub message: String,
    /// Structured details.
    pub details: Option<Value>,
    /// Seconds for `Retry-After`, when retrying later may help.
    pub retry_after: Option<u64>,
}

/// Marker left on an error response for the request middleware to render.
#[derive(Debug, Clone)]
pub(crate) struct PendingError(pub ApiError);

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(
        status: StatusCode,
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `404 not_found`.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// `404 tenant_not_found`: no such tenant visible to this key.
    pub fn tenant_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            "tenant not found",
        )
    }

    /// `403 forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `503 database_unavailable`, retry in a second.
    pub fn database_unavailable() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable; retry shortly (a write whose answer was lost is found again by a retry with the same Idempotency-Key)",
        );
        e.retry_after = Some(1);
        e
    }

    /// `500 internal`, with the cause logged but not shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// The JSON body for `request_id`.
    pub(crate) fn body(&self, request_id: &str) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
            details: self.details.clone(),
            request_id: request_id.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = self.status.into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(PendingError(self));
        res
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::store::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            Self::database_unavailable()
        } else {
            Self::internal(&e)
        }
    }
}

impl From<crate::domain::ValidationError> for ApiError {
    fn from(e: crate::domain::ValidationError) -> Self {
        LifecycleError::Invalid(e).into()
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Invalid(v) => {
                // A request that is fine in itself but not for the resource's current
                // state conflicts with it.
                let status = match v.code.as_ref() {
                    "invalid_state" => StatusCode::CONFLICT,
                    "breaking_change"
                    | "resource_type_in_use"
                    | "resource_type_exists"
                    | "plural_taken" => StatusCode::CONFLICT,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                let details = json!({ "field": v.field, "pointer": v.json_pointer() });
                let message = v.to_string();
                Self::new(status, v.code, message).with_details(details)
            }
            LifecycleError::TenantNotFound => Self::tenant_not_found(),
            LifecycleError::NotFound => Self::not_found("resource"),
            LifecycleError::NameTaken { existing, .. } => {
                let taken = Self::new(StatusCode::CONFLICT, "name_taken", e.to_string());
                match existing {
                    Some(id) => taken.with_details(json!({ "resource_id": id })),
                    None => taken,
                }
            }
            LifecycleError::UnknownAction { .. } => {
                Self::new(StatusCode::NOT_FOUND, "unknown_action", e.to_string())
            }
            LifecycleError::TenantExists(_) => {
                Self::new(StatusCode::CONFLICT, "tenant_exists", e.to_string())
            }
            LifecycleError::Forbidden(why) => Self::forbidden(why),
            LifecycleError::IdempotencyKeyReused => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                e.to_string(),
            ),
            LifecycleError::PreconditionFailed { current } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                e.to_string(),
            )
            .with_details(json!({ "current_etag": format!("\"{current}\"") })),
            LifecycleError::ResourceDeleting => {
                Self::new(StatusCode::CONFLICT, "resource_deleting", e.to_string())
            }
            LifecycleError::OperationFinished(state) => {
                Self::new(StatusCode::CONFLICT, "operation_finished", e.to_string())
                    .with_details(json!({ "state": state }))
            }
            LifecycleError::QuotaExceeded(q) => {
                // The request is fine in itself; the tenant's usage leaves no room for
                // it now (a delete may make room), as with other state conflicts.
                let details = serde_json::to_value(&q).expect("details serialize");
                Self::new(StatusCode::CONFLICT, "quota_exceeded", q.to_string())
                    .with_details(details)
            }
            LifecycleError::Report(r) => {
                let status = match r {
                    Rejection::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::CONFLICT,
                };
                let details = match &r {
                    Rejection::Finished { state } => Some(json!({ "state": state })),
                    Rejection::StaleAttempt { current, .. } => {
                        Some(json!({ "current_attempt": current }))
                    }
                    _ => None,
                };
                let mut err = Self::new(status, r.code(), r.to_string());
                err.details = details;
                err
            }
            LifecycleError::Database(e) => e.into(),
        }
    }
}
