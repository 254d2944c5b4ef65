//! `/healthz` (the process answers) and `/readyz` (its dependencies answer too).

use super::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;

/// The routes of this module, for a process serving the API: ready while the database
/// answers. With NATS down it still serves reads and takes writes into the outbox, so
/// `/readyz` says so in its body and stays `200`: taking every replica out of its load
/// balancer for a broker outage would turn a delay into an outage.
pub fn router() -> Router<AppState> {
    liveness().route("/readyz", get(readyz))
}

/// The routes of this module, for a process without the API (a relay), whose work needs
/// NATS: `/readyz` fails while either is down.
pub fn router_needing_nats() -> Router<AppState> {
    liveness().route("/readyz", get(|state| readiness(state, true)))
}

/// `/healthz` and `/metrics`.
fn liveness() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// Prometheus metrics, OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        crate::metrics::render(&state.registry),
    )
}

/// Readiness of each dependency: `ok` or what is wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// PostgreSQL.
    pub database: String,
    /// NATS.
    pub nats: String,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// The database is reachable (`503` otherwise); the body also says whether NATS is. A
/// gateway with NATS down stays ready: it serves reads and takes writes into the outbox,
/// which the relay publishes once NATS is back.
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready: the database answers (`nats` may say `unavailable`: writes wait in the outbox)", body = Readiness),
        (status = 503, description = "Not ready: the database does not answer", body = Readiness),
    )
)]
pub async fn readyz(state: State<AppState>) -> (StatusCode, Json<Readiness>) {
    readiness(state, false).await
}

/// Readiness: the database, and NATS too when `needs_nats`.
async fn readiness(
    State(state): State<AppState>,
    needs_nats: bool,
) -> (StatusCode, Json<Readiness>) {
    let database = if state.db.is_down() {
        // Known down: the prober says when it is back; no need to wait on the pool.
        "unavailable: unreachable (probing)".to_owned()
    } else {
        let ping = crate::store::ping(&state.engine.pool);
        match tokio::time::timeout(Duration::from_secs(2), ping).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => {
                state.db.suspect();
                // The error may name the database's host and user: the log has it.
                tracing::warn!(error = %e, "readiness: the database does not answer");
                format!("unavailable: {}", crate::store::health::reason(&e))
            }
            Err(_) => {
                state.db.suspect();
                "unavailable: timed out".to_owned()
            }
        }
    };
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_owned(),
        other => format!("unavailable: {other}"),
    };
    let status = if database == "ok" && (nats == "ok" || !needs_nats) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { database, nats }))
}
