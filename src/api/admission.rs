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
//!
//! The write limit follows the admitted writes' latency ([`WriteSlots`]) when a target
//! is set (`GATEWAY_WRITE_LATENCY_TARGET_MS`): a fixed limit right for one machine lets
//! a slower one queue that many writes for the database and the CPU, and their time to
//! answer grows with the queue. This is additive increase, multiplicative decrease on a
//! window's 90th percentile, as TCP and Netflix's `concurrency-limits` do; written here
//! because it is a few lines on an atomic counter, where the crates that offer it are
//! young and built around a `tower` service or a client, not a middleware's permit.

use super::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// Writes whose times to answer make one decision of [`WriteSlots`].
const WINDOW: usize = 32;

/// The write limit never goes below this (nor above `GATEWAY_MAX_IN_FLIGHT_WRITES`):
/// enough for a group-commit batch to form while another is recorded.
const FLOOR: usize = 4;

/// The limit after a window of writes whose 90th percentile took `p90`: four fifths of
/// it (not below [`FLOOR`]) when that is over `target`; one more (up to `ceiling`) when
/// it is not and the limit was reached in the window (it may be what holds writes
/// back); else as it is.
pub fn next_limit(
    limit: usize,
    ceiling: usize,
    p90: Duration,
    target: Duration,
    reached: bool,
) -> usize {
    if p90 > target {
        (limit * 4 / 5).max(FLOOR).min(ceiling)
    } else if reached {
        (limit + 1).min(ceiling)
    } else {
        limit
    }
}

/// The write class's slots: at most `limit` writes in flight, a limit that follows their
/// latency ([`next_limit`], each [`WINDOW`] writes) when there is a target.
pub struct WriteSlots {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    ceiling: usize,
    target: Option<Duration>,
    /// The times to answer of the writes answered since the last decision.
    window: Mutex<Vec<Duration>>,
    /// A write was admitted to the last slot, or refused, since the last decision (an
    /// atomic: a refusal, under overload, takes no lock).
    reached: AtomicBool,
    metrics: crate::metrics::Metrics,
}

/// A write's slot, free again when dropped (its answer made); counts its time.
pub struct WritePermit {
    slots: Arc<WriteSlots>,
    since: Instant,
}

impl WriteSlots {
    /// Up to `ceiling` writes in flight; a limit that follows `target` if set.
    pub fn new(ceiling: usize, target: Option<Duration>, metrics: crate::metrics::Metrics) -> Self {
        metrics.write_limit.set(ceiling as i64);
        Self {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(ceiling),
            ceiling,
            target,
            window: Mutex::new(Vec::with_capacity(WINDOW)),
            reached: AtomicBool::new(false),
            metrics,
        }
    }

    /// The writes admitted at once now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A slot, if fewer than the limit are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<WritePermit> {
        let limit = self.limit();
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            });
        if !matches!(taken, Ok(n) if n + 1 < limit) && self.target.is_some() {
            self.reached.store(true, Ordering::Relaxed);
        }
        taken.ok().map(|_| WritePermit {
            slots: self.clone(),
            since: Instant::now(),
        })
    }

    /// Counts a write answered after `took`; decides the limit at the end of a window.
    pub fn answered(&self, took: Duration) {
        let Some(target) = self.target else { return };
        let mut window = self.window.lock().expect("write slots' window");
        window.push(took);
        if window.len() < WINDOW {
            return;
        }
        let at = window.len() * 9 / 10;
        let (_, p90, _) = window.select_nth_unstable(at);
        let reached = self.reached.swap(false, Ordering::Relaxed);
        let next = next_limit(self.limit(), self.ceiling, *p90, target, reached);
        window.clear();
        drop(window);
        self.limit.store(next, Ordering::Relaxed);
        self.metrics.write_limit.set(next as i64);
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        self.slots.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.slots.answered(self.since.elapsed());
    }
}

/// The slots of each class, shared by every request of one gateway.
#[derive(Clone)]
pub struct Admission {
    writes: Arc<WriteSlots>,
    reads: Arc<Semaphore>,
    polls: Arc<Semaphore>,
    reports: Arc<Semaphore>,
    metrics: crate::metrics::Metrics,
}

impl Admission {
    /// Slots for `limits`.
    pub fn new(limits: Limits, metrics: crate::metrics::Metrics) -> Self {
        Self {
            writes: Arc::new(WriteSlots::new(
                limits.writes,
                limits.write_latency_target,
                metrics.clone(),
            )),
            reads: Arc::new(Semaphore::new(limits.reads)),
            polls: Arc::new(Semaphore::new(limits.polls)),
            reports: Arc::new(Semaphore::new(limits.reports)),
            metrics,
        }
    }

    /// A slot of `class`, if it has one free.
    fn try_acquire(&self, class: Class) -> Option<Permit> {
        let slots = match class {
            Class::Write => return self.writes.try_acquire().map(Permit::Write),
            Class::Read => &self.reads,
            Class::Poll => &self.polls,
            Class::Report => &self.reports,
        };
        slots.clone().try_acquire_owned().ok().map(Permit::Other)
    }
}

/// A request's slot, held until its answer is made.
enum Permit {
    Write(#[allow(dead_code)] WritePermit),
    Other(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
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
    match admission.try_acquire(class) {
        Some(_permit) => next.run(req).await,
        None => {
            admission.metrics.overloaded(class.as_str());
            overloaded(class).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_limit_shrinks_while_writes_are_slow_and_grows_back_when_reached() {
        let ms = Duration::from_millis;
        let target = ms(50);
        assert_eq!(next_limit(32, 32, ms(80), target, true), 25);
        assert_eq!(next_limit(5, 32, ms(80), target, false), FLOOR);
        assert_eq!(next_limit(4, 32, ms(80), target, true), FLOOR);
        assert_eq!(
            next_limit(2, 2, ms(80), target, true),
            2,
            "above the ceiling"
        );
        assert_eq!(next_limit(25, 32, ms(10), target, true), 26);
        assert_eq!(next_limit(32, 32, ms(10), target, true), 32);
        assert_eq!(next_limit(25, 32, ms(10), target, false), 25, "not reached");
    }

    /// A permit's drop counts its write as answered (here at once): each window below is
    /// filled up to [`WINDOW`] with `answered`.
    #[test]
    fn write_slots_admit_up_to_the_limit_and_follow_the_latency() {
        let ms = Duration::from_millis;
        let metrics = crate::metrics::Metrics::default();
        let slots = Arc::new(WriteSlots::new(8, Some(ms(50)), metrics.clone()));
        let fill = |n: usize, took: Duration| (0..n).for_each(|_| slots.answered(took));
        let held: Vec<_> = (0..8)
            .map(|_| slots.try_acquire().expect("a slot"))
            .collect();
        assert!(slots.try_acquire().is_none(), "a ninth write admitted");
        drop(held);
        // Eight quick writes and 24 slow ones: nine in ten over the target, four fifths.
        fill(WINDOW - 8, ms(200));
        assert_eq!(slots.limit(), 6);
        assert_eq!(metrics.write_limit.get(), 6);
        let held: Vec<_> = (0..6)
            .map(|_| slots.try_acquire().expect("a slot"))
            .collect();
        assert!(
            slots.try_acquire().is_none(),
            "a write beyond the lowered limit"
        );
        drop(held);
        // Quick writes that reached the limit: one more.
        fill(WINDOW - 6, ms(1));
        assert_eq!(slots.limit(), 7);
        // Quick writes that never reached it: as it is.
        fill(WINDOW, ms(1));
        assert_eq!(slots.limit(), 7);
    }

    #[test]
    fn without_a_target_the_write_limit_stays() {
        let metrics = crate::metrics::Metrics::default();
        let slots = Arc::new(WriteSlots::new(8, None, metrics));
        for _ in 0..WINDOW * 4 {
            slots.answered(Duration::from_secs(1));
        }
        assert_eq!(slots.limit(), 8);
    }

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
