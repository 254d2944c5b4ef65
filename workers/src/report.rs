//! The worker's only way to change anything: `POST /v1/operations/{id}/reports` on the
//! gateway, and the sorting of its answers into accepted, refused, retry or give up.

use gateway_proto::{Report, ReportAck, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode};
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// How long one report request may take before it counts as a transient failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the gateway may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Headers a message carried from the client's request, forwarded on every report so
/// one request can be followed end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    /// The `X-Request-Id` of the request that created the operation.
    pub request_id: Option<String>,
    /// The W3C `traceparent`.
    pub traceparent: Option<String>,
}

/// The gateway's verdict on a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// `200`: the report was applied (or repeated one already applied).
    Accepted(ReportAck),
    /// `409`: the operation already ended, the attempt is stale or the operation was
    /// never dispatched: it is not this delivery's to act on any more.
    Refused {
        /// The gateway's machine-readable code, e.g. `operation_finished`.
        code: String,
        /// Its explanation.
        message: String,
    },
}

/// A report that did not get a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The gateway is unreachable, overloaded (`429`) or failing (`5xx`): send it again.
    #[error("gateway unavailable: {0}")]
    Transient(String),
    /// The gateway will never accept it (`401`, `403`, `404`, `422`, …).
    #[error("report rejected: {0}")]
    Permanent(String),
}

impl ReportError {
    /// Whether sending the same report again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ReportError::Transient(_))
    }
}

/// Sends reports; the consume loop is generic over it so its decisions can be tested
/// without a gateway.
pub trait Reporter: Send + Sync + 'static {
    /// Sends one report, once.
    fn report(
        &self,
        operation: Uuid,
        report: &Report,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<ReportOutcome, ReportError>> + Send;
}

/// HTTP client for the gateway, authenticated as a worker principal: reports, and the
/// reads of other resources in [`crate::peers`].
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    base_url: String,
    /// `Bearer {key}`, marked sensitive so it never shows in debug output.
    authorization: HeaderValue,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl GatewayClient {
    /// A client for the gateway at `base_url` (e.g. `http://127.0.0.1:8080`) using the
    /// bearer key `key`.
    pub fn new(base_url: &str, key: &str) -> anyhow::Result<Self> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            anyhow::anyhow!("the gateway key holds characters not allowed in a header")
        })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("gateway-worker/", env!("CARGO_PKG_VERSION")))
            // A worker gets only its own region's dispatches, so a redirect
            // (`307 other_region`) means it reports to the wrong region's gateway.
            // Followed, it would reach the other region without the key (`reqwest`
            // drops `Authorization` across origins) and end as a puzzling `401`; not
            // followed, it ends as a permanent error that names the region and address.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization,
        })
    }

    /// The gateway's base URL, without a trailing slash.
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A request to `url` with the worker's key and the forwarded trace headers: what
    /// every call to the gateway starts from.
    pub(crate) fn request(
        &self,
        method: Method,
        url: impl reqwest::IntoUrl,
        trace: &TraceHeaders,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, url)
            .header(AUTHORIZATION, self.authorization.clone());
        for (name, value) in [
            (REQUEST_ID_HEADER, &trace.request_id),
            (TRACEPARENT_HEADER, &trace.traceparent),
        ] {
            if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                request = request.header(name, value);
            }
        }
        request
    }

    /// Sends `report` about `operation` once and sorts the answer.
    pub async fn send(
        &self,
        operation: Uuid,
        report: &Report,
        trace: &TraceHeaders,
    ) -> Result<ReportOutcome, ReportError> {
        let url = format!("{}/v1/operations/{operation}/reports", self.base_url);
        let (status, body) = self.post(url, report, trace).await?;
        classify(status, &body)
    }

    /// POSTs `body` as JSON to `url` with the worker's key and `trace`; the answer's
    /// status and body, or a transient error if there was no answer.
    pub(crate) async fn post(
        &self,
        url: String,
        body: &impl serde::Serialize,
        trace: &TraceHeaders,
    ) -> Result<(StatusCode, bytes::Bytes), ReportError> {
        let response = self
            .request(Method::POST, url, trace)
            .json(body)
            .send()
            .await
            .map_err(|e| ReportError::Transient(error_chain(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ReportError::Transient(error_chain(&e)))?;
        Ok((status, bytes))
    }
}

impl Reporter for GatewayClient {
    fn report(
        &self,
        operation: Uuid,
        report: &Report,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<ReportOutcome, ReportError>> + Send {
        self.send(operation, report, trace)
    }
}

/// Whether an error answer of the gateway may go away by itself (timeouts, rate
/// limits, server errors), so the request is worth sending again.
pub(crate) fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
    ) || status.is_server_error()
}

/// Sorts the gateway's answer.
pub(crate) fn classify(status: StatusCode, body: &[u8]) -> Result<ReportOutcome, ReportError> {
    if status.is_success() {
        return serde_json::from_slice::<ReportAck>(body)
            .map(ReportOutcome::Accepted)
            // A contract violation, not an outage: retrying would not fix it.
            .map_err(|e| {
                ReportError::Permanent(format!("{status} with a body that is not a ReportAck: {e}"))
            });
    }
    let (code, message) = error_body(body);
    refusal(status, code, message)
}

/// Sorts an answer that accepted nothing: `409` is a refusal, what may go away by itself
/// a transient error, anything else permanent.
pub(crate) fn refusal(
    status: StatusCode,
    code: String,
    message: String,
) -> Result<ReportOutcome, ReportError> {
    match status {
        StatusCode::CONFLICT => Ok(ReportOutcome::Refused { code, message }),
        s if retryable(s) => Err(ReportError::Transient(format!(
            "{status}: {code}: {message}"
        ))),
        _ => Err(ReportError::Permanent(format!(
            "{status}: {code}: {message}"
        ))),
    }
}

/// `{code, message}` of an error body, or placeholders when it is not one.
pub(crate) fn error_body(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let code = field("code").unwrap_or_else(|| "unknown".into());
    let message = field("message").unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        text.chars().take(200).collect()
    });
    (code, message)
}

/// An error and its sources on one line (reqwest hides the interesting part in sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_proto::OperationState;
    use serde_json::json;

    #[test]
    fn a_200_with_a_report_ack_is_accepted() {
        let id = Uuid::now_v7();
        let body =
            json!({"operation_id": id, "state": "running", "attempt": 2, "cancel_requested": true});
        let outcome = classify(StatusCode::OK, body.to_string().as_bytes()).unwrap();
        assert_eq!(
            outcome,
            ReportOutcome::Accepted(ReportAck {
                operation_id: id,
                state: OperationState::Running,
                attempt: 2,
                cancel_requested: true,
            })
        );
        assert!(!classify(StatusCode::OK, b"<html>")
            .unwrap_err()
            .is_transient());
    }

    #[test]
    fn a_409_is_a_refusal_with_the_gateways_code() {
        let body =
            json!({"code": "stale_attempt", "message": "attempt 1 is older", "request_id": "r"});
        let outcome = classify(StatusCode::CONFLICT, body.to_string().as_bytes()).unwrap();
        assert_eq!(
            outcome,
            ReportOutcome::Refused {
                code: "stale_attempt".into(),
                message: "attempt 1 is older".into()
            }
        );
    }

    #[test]
    fn outages_are_transient_and_refusals_of_the_principal_permanent() {
        for status in [429, 408, 500, 502, 503, 504] {
            let err = classify(StatusCode::from_u16(status).unwrap(), b"").unwrap_err();
            assert!(err.is_transient(), "{status}");
        }
        for status in [400, 401, 403, 404, 422] {
            let body = json!({"code": "forbidden", "message": "not your zone"}).to_string();
            let err = classify(StatusCode::from_u16(status).unwrap(), body.as_bytes()).unwrap_err();
            assert!(!err.is_transient(), "{status}");
            assert!(err.to_string().contains("not your zone"));
        }
    }

    /// Sends a `running` report to the gateway at `url`, which must fail.
    async fn running_report_fails(url: &str) -> ReportError {
        let client = GatewayClient::new(url, "k").unwrap();
        let report = Report {
            attempt: 1,
            state: gateway_proto::ReportState::Running,
            status: None,
            error: None,
        };
        client
            .send(Uuid::now_v7(), &report, &TraceHeaders::default())
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_report_redirected_to_another_region_fails_naming_it() {
        let body = json!({
            "code": "other_region",
            "message": "this is served by region r2; send the same request to http://r2/v1/operations/x/reports",
        });
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(reqwest::header::LOCATION, "http://127.0.0.1:9/elsewhere")],
                    axum::Json(body),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let err = running_report_fails(&url).await;
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("region r2"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_transient() {
        let port = crate::testing::closed_port();
        let err = running_report_fails(&format!("http://127.0.0.1:{port}/")).await;
        assert!(err.is_transient(), "{err}");
    }
}
