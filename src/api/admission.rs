//! Admission control: a bound on the requests each class has in flight, so that a flood
//! of one kind of request neither starves the others nor grows memory without end.
//!
//! Requests are classed as Kubernetes' API Priority and Fairness does with its priority
//! levels, by what they do: workers' reports, polls of one operation (long-polls hold
//! their slot while they wait), other reads, and writes. Each class has its own limit
//! (`GATEWAY_MAX_IN_FLIGHT_*`); a request beyond its class's limit is answered at once
//! with `503 overloaded` and `Retry-After`, never queued, so admitted requests keep their
//! latency. Health, readiness and metrics are never refused; watch streams have their
//! own per-key cap.

use super::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The classes of requests, each with its own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A worker's report: ends operations; never starved by clients.
    Report,
    /// `GET /v1/operations/{id}`, with or without `?wait=`.
    Poll,
    /// Every other read.
    Read,
    /// Every write.
    Write,
}

impl Class {
    /// The class of a request, or `None` for those never refused.
    pub fn of(method: &Method, path: &str, accept: Option<&str>) -> Option<Self> {
        if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
            return None;
        }
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let reading = matches!(*method, Method::GET | Method::HEAD);
        match segments.as_slice() {
            ["", "v1", "operations", _, "reports"] | ["", "v1", "reports"]
                if *method == Method::POST =>
            {
                Some(Self::Report)
            }
            ["", "v1", "operations", _] if reading => Some(Self::Poll),
            ["", "v1", "tenants", _, "events"]
                if reading && accept.is_some_and(|a| a.contains("text/event-stream")) =>
            {
                None
            }
            _ if reading => Some(Self::Read),
            _ => Some(Self::Write),
        }
    }

    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::Poll => "poll",
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

pub use crate::config::AdmissionLimits as Limits;

/// The slots of each class, shared by every request of one gateway.
#[derive(Clone)]
pub struct Admission {
    writes: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    polls: Arc<Semaphore>,
    reports: Arc<Semaphore>,
    metrics: crate::metrics::Metrics,
}

impl Admission {
    /// Slots for `limits`.
    pub fn new(limits: Limits, metrics: crate::metrics::Metrics) -> Self {
        Self {
            writes: Arc::new(Semaphore::new(limits.writes)),
            reads: Arc::new(Semaphore::new(limits.reads)),
            polls: Arc::new(Semaphore::new(limits.polls)),
            reports: Arc::new(Semaphore::new(limits.reports)),
            metrics,
        }
    }

    fn slots(&self, class: Class) -> &Arc<Semaphore> {
        match class {
            Class::Write => &self.writes,
            Class::Read => &self.reads,
            Class::Poll => &self.polls,
            Class::Report => &self.reports,
        }
    }
}

/// The `503 overloaded` answer.
pub fn overloaded(class: Class) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
            "the gateway has as many {} requests in flight as it admits; retry",
            class.as_str()
        ),
    );
    e.retry_after = Some(1);
    e
}

/// The middleware: holds a slot of the request's class until its answer is made.
pub async fn admit(State(admission): State<Admission>, req: Request, next: Next) -> Response {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let Some(class) = Class::of(req.method(), req.uri().path(), accept) else {
        return next.run(req).await;
    };
    match admission.slots(class).clone().try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            admission.metrics.overloaded(class.as_str());
            overloaded(class).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classed_by_what_they_do() {
        let id = "0193a6c2-5b1e-7c3d-9a8b-1f2e3d4c5b6a";
        let of = |m: Method, p: &str| Class::of(&m, p, None);
        assert_eq!(
            of(Method::POST, &format!("/v1/operations/{id}/reports")),
            Some(Class::Report)
        );
        assert_eq!(of(Method::POST, "/v1/reports"), Some(Class::Report));
        assert_eq!(
            of(Method::GET, &format!("/v1/operations/{id}")),
            Some(Class::Poll)
        );
        assert_eq!(
            of(Method::POST, &format!("/v1/operations/{id}/cancel")),
            Some(Class::Write)
        );
        assert_eq!(of(Method::GET, "/v1/tenants/acme/vms"), Some(Class::Read));
        assert_eq!(of(Method::POST, "/v1/tenants/acme/vms"), Some(Class::Write));
        assert_eq!(
            of(Method::DELETE, "/v1/tenants/acme/vms/x"),
            Some(Class::Write)
        );
        assert_eq!(of(Method::GET, "/healthz"), None);
        assert_eq!(of(Method::GET, "/metrics"), None);
        assert_eq!(of(Method::GET, "/v1/openapi.json"), None);
        let sse = Some("text/event-stream");
        assert_eq!(
            Class::of(&Method::GET, "/v1/tenants/acme/events", sse),
            None
        );
        assert_eq!(
            of(Method::GET, "/v1/tenants/acme/events"),
            Some(Class::Read)
        );
    }
}
