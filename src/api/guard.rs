//! The front door every API request passes: authentication, rate limiting and the
//! audit trail, in one middleware so no route can forget any of them.
//!
//! - **Authentication** resolves `Authorization: Bearer <key>` to a principal (or notes
//!   that the key is missing or bad); handlers take it through the `Caller` extractor,
//!   which answers `401` when there is none.
//! - **Rate limiting** is a token bucket per principal and class of request (writes,
//!   reads, and operation polls, so polling cannot starve writes), and a stricter one
//!   per source address for requests without a valid key. Over the limit: `429` with
//!   `Retry-After` and code `rate_limited`.
//! - **Audit**: every mutating request, whatever its outcome, and every denied request
//!   (`401`, `403`, `429`) queues one row for the hash-chained audit log as it is
//!   answered (written in batches by `audit::AuditWriter`).

use super::error::ApiError;
use super::request::RequestId;
use super::AppState;
use crate::audit::{AuditSlot, Entry};
use crate::auth::{self, Principal};
use crate::metrics::{BucketLabels, HttpLabels, Metrics, RouteLabels};
use crate::store::principals;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use uuid::Uuid;

/// What authentication found, for the `Caller` extractor.
#[derive(Debug, Clone)]
pub enum Authn {
    /// A live key.
    Principal(Principal),
    /// No `Authorization` header.
    Missing,
    /// A key that is unknown, revoked or expired.
    Invalid,
}

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Anything that changes state.
    Write,
    /// Reads other than operation polls.
    Read,
    /// `GET /v1/operations/{id}`: polling has its own bucket.
    Poll,
}

pub use crate::config::RateLimits;

/// The limiters.
pub struct Limiter {
    principals: DefaultKeyedRateLimiter<(Uuid, Bucket)>,
    anonymous: DefaultKeyedRateLimiter<IpAddr>,
}

impl Limiter {
    /// Limiters with `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            principals: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(limits.per_second).allow_burst(limits.burst),
            ),
            anonymous: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(limits.anonymous_per_second).allow_burst(limits.anonymous_burst),
            ),
        }
    }

    /// Forgets buckets that are full again, so memory follows active callers only.
    pub fn forget_idle(&self) {
        self.principals.retain_recent();
        self.anonymous.retain_recent();
    }

    /// `Err(seconds to wait)` when the caller is over its limit.
    fn check(&self, authn: &Authn, bucket: Bucket, source: Option<IpAddr>) -> Result<(), u64> {
        let verdict = match (authn, source) {
            (Authn::Principal(p), _) => self.principals.check_key(&(p.id, bucket)),
            (_, Some(ip)) => self.anonymous.check_key(&ip),
            (_, None) => Ok(()),
        };
        verdict.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

fn bucket(method: &Method, route: &str) -> Bucket {
    match *method {
        Method::GET | Method::HEAD if route == "/v1/operations/{id}" => Bucket::Poll,
        Method::GET | Method::HEAD => Bucket::Read,
        _ => Bucket::Write,
    }
}

async fn authenticate(state: &AppState, authorization: Option<Vec<u8>>) -> Result<Authn, ApiError> {
    let Some(value) = authorization else {
        return Ok(Authn::Missing);
    };
    let key = std::str::from_utf8(&value)
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Ok(Authn::Invalid);
    };
    let Some(row) = principals::find_live_by_hash(&state.engine.pool, &auth::hash_key(key)).await?
    else {
        return Ok(Authn::Invalid);
    };
    Ok(Authn::Principal(Principal {
        id: row.id,
        name: row.name,
        role: row.role,
        tenant: row.tenant,
        scope: row.scope,
    }))
}

/// The tenant a request acts on, as far as its path says.
fn path_tenant(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/tenants/")?;
    let tenant = rest.split('/').next().filter(|t| !t.is_empty())?;
    Some(tenant.to_owned())
}

/// A handler's note for the audit row: the tenant of what it acted on, when the path
/// does not say (operations are addressed by ID alone).
#[derive(Debug, Clone)]
pub struct AuditTenant(pub String);

/// Counts a request in flight until dropped, even when the client goes away mid-way.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn enter(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `429 rate_limited` with `Retry-After`, counted by bucket.
fn rate_limited(metrics: &Metrics, authn: &Authn, class: Bucket, wait: u64) -> Response {
    let bucket = match (authn, class) {
        (Authn::Principal(_), Bucket::Write) => "write",
        (Authn::Principal(_), Bucket::Read) => "read",
        (Authn::Principal(_), Bucket::Poll) => "poll",
        _ => "anonymous",
    };
    metrics
        .rate_limited
        .get_or_create(&BucketLabels {
            bucket: bucket.into(),
        })
        .inc();
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; retry in {wait} s"),
    );
    e.retry_after = Some(wait.max(1));
    e.into_response()
}

/// Counts an answered request and its duration by route template.
fn count(metrics: &Metrics, route: &str, method: &Method, status: u16, started: Instant) {
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: route.to_owned(),
            method: method.to_string(),
            status: format!("{}xx", status / 100),
        })
        .inc();
    metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route: route.to_owned(),
            method: method.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
}

/// What the guard knows of a request before it is answered.
struct Seen {
    method: Method,
    path: String,
    route: String,
    source: Option<IpAddr>,
    request_id: String,
}

impl Seen {
    fn of(req: &Request) -> Self {
        let ext = req.extensions();
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            route: ext
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "(unmatched)".to_owned()),
            source: ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()),
            request_id: ext
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
        }
    }

    fn mutating(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    /// The request's audit entry, its status to be set when it is written.
    fn entry(&self, authn: Option<&Authn>) -> Entry {
        Entry {
            at: chrono::Utc::now(),
            principal: match authn {
                Some(Authn::Principal(p)) => Some((p.id, p.name.clone())),
                _ => None,
            },
            tenant: path_tenant(&self.path),
            action: format!("{} {}", self.method, self.route),
            target: self.path.clone(),
            status: 0,
            request_id: self.request_id.clone(),
            source: self.source.map(|ip| ip.to_string()),
        }
    }
}

/// The middleware.
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let seen = Seen::of(&req);
    let started = Instant::now();
    let metrics = state.engine.metrics.clone();
    let _in_flight = InFlight::enter(&metrics.http_in_flight);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let (response, slot) = match authenticate(&state, authorization).await {
        // The database is down: refused, and audited once it is back (the spool).
        Err(e) => (e.into_response(), AuditSlot::new(seen.entry(None))),
        Ok(authn) => {
            let slot = AuditSlot::new(seen.entry(Some(&authn)));
            // Probes and scrapes outside the API are never throttled.
            let class = bucket(&seen.method, &seen.route);
            let limited = if seen.path.starts_with("/v1/") {
                state.limiter.check(&authn, class, seen.source)
            } else {
                Ok(())
            };
            let response = match limited {
                Err(wait) => rate_limited(&metrics, &authn, class, wait),
                Ok(()) => {
                    req.extensions_mut().insert(authn);
                    if seen.mutating() {
                        // A write that commits records the entry in its transaction.
                        req.extensions_mut().insert(slot.clone());
                    }
                    next.run(req).await
                }
            };
            (response, slot)
        }
    };
    let status = response.status().as_u16();
    count(&metrics, &seen.route, &seen.method, status, started);
    if seen.mutating() || matches!(status, 401 | 403 | 429) {
        // Left in the slot unless a committed transaction recorded it.
        if let Some(mut entry) = slot.remaining() {
            entry.status = status;
            entry.at = chrono::Utc::now();
            if entry.tenant.is_none() {
                entry.tenant = response
                    .extensions()
                    .get::<AuditTenant>()
                    .map(|t| t.0.clone());
            }
            state.audit.record(entry);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn polls_reads_and_writes_draw_from_their_own_buckets() {
        assert_eq!(bucket(&Method::GET, "/v1/operations/{id}"), Bucket::Poll);
        assert_eq!(
            bucket(&Method::GET, "/v1/tenants/{tenant}/{kind}"),
            Bucket::Read
        );
        assert_eq!(
            bucket(&Method::POST, "/v1/operations/{id}/cancel"),
            Bucket::Write
        );
    }

    #[test]
    fn the_tenant_comes_from_the_path() {
        assert_eq!(path_tenant("/v1/tenants/acme/vms"), Some("acme".into()));
        assert_eq!(path_tenant("/v1/tenants"), None);
        assert_eq!(path_tenant("/v1/operations/x"), None);
    }

    #[test]
    fn an_exhausted_bucket_says_how_long_to_wait() {
        let one = NonZeroU32::new(1).unwrap();
        let limiter = Limiter::new(RateLimits {
            per_second: one,
            burst: one,
            anonymous_per_second: one,
            anonymous_burst: one,
        });
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(limiter
            .check(&Authn::Missing, Bucket::Read, Some(ip))
            .is_ok());
        assert_eq!(
            limiter.check(&Authn::Missing, Bucket::Read, Some(ip)),
            Err(1)
        );
    }
}
