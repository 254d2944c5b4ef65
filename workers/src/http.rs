//! The worker's own HTTP endpoints, on `WORKER_LISTEN` (see [`crate::config`]):
//!
//! - `GET /metrics`: the registry as OpenMetrics text ([`crate::metrics`]);
//! - `GET /healthz`: `200 ok` while the process answers;
//! - `GET /readyz`: `200` when NATS is connected, the gateway answers
//!   `GET {GATEWAY_URL}/healthz` with `200` within [`GATEWAY_CHECK_TIMEOUT`], and the
//!   gateway does not refuse the worker's key (`401` on `GET /v1/zones`: revoked,
//!   expired or unknown); else `503`. Either way the body says how each stands, e.g.
//!   `{"nats": "ok", "gateway": "unavailable: connection refused"}`.
//!
//! [`serve`] takes a bound listener, so tests serve on `127.0.0.1:0`.

use crate::metrics::{render, CONTENT_TYPE};
use crate::report::error_chain;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for the gateway's `/healthz`.
pub const GATEWAY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoints need; cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    /// What `/metrics` encodes.
    registry: Arc<Registry>,
    /// The worker's NATS connection, whose state `/readyz` reports.
    nats: async_nats::Client,
    /// `{GATEWAY_URL}/healthz`, asked by `/readyz`.
    gateway_health_url: String,
    /// `{GATEWAY_URL}/v1/zones`, asked with the worker's key by `/readyz`.
    gateway_key_url: String,
    /// The worker's key.
    gateway_key: String,
    /// The client asking it, with [`GATEWAY_CHECK_TIMEOUT`].
    http: reqwest::Client,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("gateway_health_url", &self.gateway_health_url)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// Serves `registry`, and reports on `nats`, the gateway at `gateway_url` (e.g.
    /// `http://127.0.0.1:8080`) and whether it takes `gateway_key`.
    pub fn new(
        registry: Arc<Registry>,
        nats: async_nats::Client,
        gateway_url: &str,
        gateway_key: &str,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(GATEWAY_CHECK_TIMEOUT)
            .user_agent(concat!("gateway-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            registry,
            nats,
            gateway_health_url: format!("{}/healthz", gateway_url.trim_end_matches('/')),
            gateway_key_url: format!("{}/v1/zones", gateway_url.trim_end_matches('/')),
            gateway_key: gateway_key.to_owned(),
            http,
        })
    }
}

/// The routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match render(&state.registry) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

/// How each dependency stands: `ok`, or `unavailable: …` saying why.
#[derive(Debug, Serialize)]
struct Readiness {
    /// The NATS connection, where work comes from.
    nats: String,
    /// The gateway, where reports go.
    gateway: String,
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<Readiness>) {
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_owned(),
        other => format!("unavailable: {other}"),
    };
    let health = state.http.get(&state.gateway_health_url).send();
    let key = state
        .http
        .get(&state.gateway_key_url)
        .bearer_auth(&state.gateway_key)
        .send();
    let (health, key) = tokio::join!(health, key);
    let key_refused = key.is_ok_and(|r| r.status() == StatusCode::UNAUTHORIZED);
    let gateway = match health {
        Ok(response) if response.status() == StatusCode::OK && key_refused => {
            "unavailable: the gateway refuses this worker's key (revoked, expired or unknown)"
                .to_owned()
        }
        Ok(response) if response.status() == StatusCode::OK => "ok".to_owned(),
        Ok(response) => format!("unavailable: {}", response.status()),
        Err(e) if e.is_timeout() => format!(
            "unavailable: no answer within {} s",
            GATEWAY_CHECK_TIMEOUT.as_secs()
        ),
        Err(e) => format!("unavailable: {}", error_chain(&e)),
    };
    let status = if nats == "ok" && gateway == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { nats, gateway }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerMetrics;
    use crate::testing::closed_port;
    use gateway_proto::Service;

    /// Serves on port 0 with a NATS client that cannot connect and the gateway at
    /// `gateway_url`; returns the base URL.
    async fn spawn(registry: Registry, gateway_url: &str) -> (String, CancellationToken) {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(format!("nats://127.0.0.1:{}", closed_port()))
            .await
            .unwrap();
        let state = HttpState::new(Arc::new(registry), nats, gateway_url, "k").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, state, shutdown.clone()));
        (url, shutdown)
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text_that_promtool_accepts() {
        let mut registry = Registry::default();
        let metrics = WorkerMetrics::register(&mut registry);
        let pool = metrics.pool(&Service::named("vm"), "zone-a");
        pool.message(crate::metrics::MessageOutcome::Succeeded);
        let (url, shutdown) = spawn(registry, "http://127.0.0.1:1").await;

        let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let body = response.text().await.unwrap();
        assert!(
            body.contains(
                "worker_messages_total{service=\"vm\",zone=\"zone-a\",outcome=\"succeeded\"} 1\n"
            ),
            "{body}"
        );
        assert!(body.contains("# TYPE worker_in_flight gauge\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        promtool_accepts(&body);
        shutdown.cancel();
    }

    /// `promtool check metrics`, when promtool is installed, finds no error in `body`.
    ///
    /// promtool (2.x) parses the Prometheus text format, which reads OpenMetrics as well
    /// (`# UNIT` and `# EOF` are comments to it) but sees the OpenMetrics counter
    /// `worker_messages` (samples `worker_messages_total`) as an untyped family without
    /// help. It exits `1` on a parse error and `3` on lint findings only; only the
    /// former fails the test.
    fn promtool_accepts(body: &str) {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("promtool is not installed: skipping the exposition check");
                return;
            }
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            matches!(output.status.code(), Some(0 | 3)) && !stderr.contains("error"),
            "promtool check metrics: {:?}\n{stderr}",
            output.status
        );
    }

    #[tokio::test]
    async fn healthz_answers_while_the_process_lives() {
        let (url, shutdown) = spawn(Registry::default(), "http://127.0.0.1:1").await;
        let response = reqwest::get(format!("{url}/healthz")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn readyz_is_503_naming_the_gateway_when_nothing_listens_there() {
        let gateway = format!("http://127.0.0.1:{}", closed_port());
        let (url, shutdown) = spawn(Registry::default(), &gateway).await;
        let response = reqwest::get(format!("{url}/readyz")).await.unwrap();
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        let gateway = body["gateway"].as_str().unwrap();
        assert!(gateway.starts_with("unavailable: "), "{body}");
        assert!(gateway.contains("connect"), "{body}");
        assert!(
            body["nats"].as_str().unwrap().starts_with("unavailable: "),
            "{body}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn readyz_says_what_the_gateway_answered_when_it_is_not_200() {
        // A gateway that answers every request with 503.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = format!("http://{}", listener.local_addr().unwrap());
        let unhealthy = Router::new().fallback(|| async { StatusCode::SERVICE_UNAVAILABLE });
        tokio::spawn(async move { axum::serve(listener, unhealthy).await });

        let (url, shutdown) = spawn(Registry::default(), &gateway).await;
        let response = reqwest::get(format!("{url}/readyz")).await.unwrap();
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["gateway"], "unavailable: 503 Service Unavailable");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn readyz_fails_when_the_gateway_refuses_the_workers_key() {
        // A healthy gateway that no longer takes the key (revoked or expired).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = format!("http://{}", listener.local_addr().unwrap());
        let revoked = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .fallback(|| async { StatusCode::UNAUTHORIZED });
        tokio::spawn(async move { axum::serve(listener, revoked).await });

        let (url, shutdown) = spawn(Registry::default(), &gateway).await;
        let response = reqwest::get(format!("{url}/readyz")).await.unwrap();
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["gateway"]
                .as_str()
                .unwrap()
                .contains("refuses this worker's key"),
            "{body}"
        );
        shutdown.cancel();
    }
}
