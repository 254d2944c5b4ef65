//! Per-request context: the request ID (the client's `X-Request-Id` if it sent a sane
//! one, else a new UUID), its tracing span, and the rendering of error bodies.

use super::error::PendingError;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

/// The request's ID, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The longest client-supplied request ID kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

fn client_request_id(req: &Request) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    is_request_id(v).then(|| v.to_owned())
}

/// Whether a client's request ID is kept: 1 to 128 visible ASCII characters.
pub fn is_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Middleware: assigns the request ID, runs the request in a span, echoes the ID and
/// renders any pending `ApiError` as the JSON error body.
pub async fn context(mut req: Request, next: Next) -> Response {
    let id = client_request_id(&req).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let span =
        tracing::info_span!("http", request_id = %id, method = %req.method(), route = %route);
    let mut res = next.run(req).instrument(span).await;
    if let Some(PendingError(err)) = res.extensions_mut().remove::<PendingError>() {
        let (mut parts, _) = res.into_parts();
        let body = serde_json::to_vec(&err.body(&id)).expect("error bodies serialize");
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        res = Response::from_parts(parts, Body::from(body));
    } else if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The body-limit layer answers before any handler runs.
        let err = super::error::ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        );
        let (mut parts, _) = err.clone().into_response().into_parts();
        parts.extensions.remove::<PendingError>();
        let body = serde_json::to_vec(&err.body(&id)).expect("error bodies serialize");
        res = Response::from_parts(parts, Body::from(body));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}
