//! The HTTP API. One module per resource group, each exposing `router()`; this module
//! merges them and adds the layers every request passes through.
//!
//! **Architecture invariant:** handlers parse, authorize and shape answers; they call
//! `lifecycle` for writes and `store` for reads, and hold no business rules.

pub mod admission;
pub mod audit;
pub mod catalog;
pub mod cursor;
pub mod drain;
pub mod error;
pub mod events;
pub mod extract;
pub mod guard;
pub mod health;
pub mod keys;
pub mod openapi;
pub mod operations;
pub mod params;
pub mod quotas;
pub mod regions;
pub mod reports;
pub mod request;
pub mod resource_types;
pub mod resources;
pub mod tenants;
pub mod webhooks;
pub mod wire;

use crate::lifecycle::Engine;
use crate::store::operations::OperationRow;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use error::ApiError;
use std::time::Duration;
use tower_http::trace::TraceLayer;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most items one page holds.
pub const MAX_PAGE: i64 = 500;

/// What handlers share: one allocation, so the clone every middleware and extractor
/// takes is one reference count (cloning the fields themselves — NATS client, caches,
/// pools — was a fifth of the gateway's CPU per request).
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl AppState {
    /// Shares `shared` with every request.
    pub fn new(shared: Shared) -> Self {
        Self(std::sync::Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The contents of [`AppState`].
pub struct Shared {
    /// Database, names and the relay's doorbell.
    pub engine: Engine,
    /// The NATS connection, for readiness.
    pub nats: async_nats::Client,
    /// Resolved API keys, cached (`keycache`).
    pub keys: crate::keycache::KeyCache,
    /// Rate limiters.
    pub limiter: std::sync::Arc<guard::Limiter>,
    /// Where audit entries go.
    pub audit: crate::audit::AuditWriter,
    /// Everything `GET /metrics` shows (the gateway's metrics, and in-process workers').
    pub registry: std::sync::Arc<prometheus_client::registry::Registry>,
    /// Whether the database is known to be down (API requests then answer `503` at once).
    pub db: crate::store::health::DbHealth,
    /// The events stream, for the watch API.
    pub events: crate::eventlog::EventLog,
    /// Open watch streams per key.
    pub watch_slots: std::sync::Arc<events::WatchSlots>,
    /// Watch limits and timings.
    pub watch_settings: crate::config::EventSettings,
    /// Cancelled when the process stops: watch streams end so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Which webhook URLs are allowed.
    pub webhook_policy: crate::domain::webhook::UrlPolicy,
    /// How long a rotated-out webhook secret keeps signing.
    pub webhook_secret_grace: std::time::Duration,
    /// Seal webhook signing secrets in the database (none: stored as they are).
    pub webhook_secret_keys: Option<crate::domain::sealing::SealKeys>,
    /// Requests in flight per class.
    pub admission: admission::Admission,
    /// The other regions, for redirects.
    pub regions: regions::Directory,
    /// This gateway's public URL (`GATEWAY_PUBLIC_URL`), for absolute `Location`s.
    pub public_base: Option<std::sync::Arc<str>>,
}

/// How long a request may take to be answered (the answer's headers: a watch stream
/// goes on after them). Longer than the longest long-poll, which answers first.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);
/// How long a request's whole body may take to arrive (`408 request_timeout` after;
/// every body is read through `extract`, which holds to it).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers `503 timed_out` (JSON, `Retry-After`) to a request not answered within
/// [`REQUEST_TIMEOUT`]; its handler is dropped where it stood, so a write may or may not
/// have committed (a retry with the same `Idempotency-Key` tells).
async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timed_out",
                format!(
                    "the request was not answered within {} s; a write may or may not have \
                     been recorded: retry with the same Idempotency-Key",
                    REQUEST_TIMEOUT.as_secs()
                ),
            );
            e.retry_after = Some(1);
            e.into_response()
        }
    }
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(resources::router())
        .merge(resource_types::router())
        .merge(operations::router())
        .merge(reports::router())
        .merge(tenants::router())
        .merge(catalog::router())
        .merge(keys::router())
        .merge(quotas::router())
        .merge(events::router())
        .merge(webhooks::router())
        .merge(audit::router())
        .merge(health::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            regions::follow_ids,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(deadline))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.admission.clone(),
            admission::admit,
        ))
        .layer(axum::middleware::from_fn(request::context))
        .layer(TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(drain::keep_alive))
        .with_state(state)
}

/// `202 Accepted` with the operation, `Location` (absolute when the gateway knows its
/// public URL, as every region's does) and `Retry-After`.
pub fn accepted(state: &AppState, op: OperationRow) -> Response {
    let base = state.public_base.as_deref().unwrap_or("");
    let location = format!("{}/v1/operations/{}", base.trim_end_matches('/'), op.id);
    let mut res = (StatusCode::ACCEPTED, Json(wire::OperationOut::from(op))).into_response();
    let headers = res.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("UUIDs are valid headers"),
    );
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(operations::POLL_AFTER_SECS),
    );
    res
}

/// The cache a read by ID goes through: none when the request says
/// `Cache-Control: no-cache` (or `no-store`, or `max-age=0`), or `Pragma: no-cache`,
/// as a client that must see a write just made through another replica does.
pub(crate) fn read_cache(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> crate::readcache::ReadCache {
    let says = |name, what: &[&str]| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| what.contains(&d.trim().to_ascii_lowercase().as_str()))
            })
        })
    };
    if says(
        header::CACHE_CONTROL,
        &["no-cache", "no-store", "max-age=0"],
    ) || says(header::PRAGMA, &["no-cache"])
    {
        crate::readcache::ReadCache::default()
    } else {
        state.engine.changes.reads()
    }
}

/// `400 invalid_query` for a query string that does not parse.
pub fn bad_query(e: &axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text())
}

/// `404 tenant_not_found` unless `tenant` exists and `principal` may read it (another
/// tenant's looks exactly like a missing one).
pub(crate) async fn readable_tenant(
    state: &AppState,
    principal: &crate::auth::Principal,
    tenant: &str,
) -> Result<(), error::ApiError> {
    if principal.can_read(tenant)
        && read(state, |db| state.engine.catalog.tenant_exists(db, tenant)).await?
    {
        Ok(())
    } else {
        Err(error::ApiError::tenant_not_found())
    }
}

/// Runs `read` (statements with no effect) on the database, and again on another
/// connection while the pooled one it got had been ended by the database
/// ([`crate::store::again_if_ended`]): a read just after the database restarted, or
/// after a proxy dropped its connections, is answered rather than refused once.
pub(crate) async fn read<'p, T, F, Fut>(state: &'p AppState, mut read: F) -> sqlx::Result<T>
where
    F: FnMut(&'p sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let pool = &state.engine.pool;
    crate::store::again_if_ended(pool, || read(pool)).await
}

/// Checks a requested page size.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(100) {
        l @ 1..=MAX_PAGE => Ok(l),
        l => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit must be between 1 and {MAX_PAGE}, got {l}"),
        )),
    }
}
