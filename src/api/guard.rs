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
//! - **Database outages**: an answer `503 database_unavailable` makes the database
//!   suspect (`store::health`); while it is known to be down, API requests with a key
//!   get that `503` at once.
//! - **Audit**: every mutating request, whatever its outcome, and every denied request
//!   (`401`, `403`, `429`) queues one row for the hash-chained audit log as it is
//!   answered (written in batches by `audit::AuditWriter`).

use super::error::{ApiError, PendingError};
use super::request::RequestId;
use super::AppState;
use crate::audit::{AuditSlot, Entry};
use crate::auth::{self, Principal};
use crate::metrics::{BucketLabels, HttpLabels, Metrics, RouteLabels};
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::RequestExt;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use uuid::Uuid;

/// The hash of the key a request was let in with, for a handler that keeps answering
/// after the request began (a watch stream, a long-poll) to check it again
/// ([`still_valid`]).
#[derive(Debug, Clone)]
pub struct Credential(Vec<u8>);

/// Whether the key of `credential` still lets its holder in (not revoked, not
/// expired), through the key cache as every request: `401 unauthenticated` if not,
/// `503` if the database cannot say.
pub async fn still_valid(state: &AppState, credential: &Credential) -> Result<(), ApiError> {
    match state.keys.resolve(credential.0.clone()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the API key was revoked or has expired",
        )),
        Err(e) => Err(e.into()),
    }
}

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

/// The token of `Bearer <token>`; the scheme's name is case-insensitive (RFC 9110,
/// section 11.1), so `bearer` and `BEARER` do too.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn authenticate(
    state: &AppState,
    authorization: Option<Vec<u8>>,
) -> Result<(Authn, Option<Credential>), ApiError> {
    let Some(value) = authorization else {
        return Ok((Authn::Missing, None));
    };
    let key = std::str::from_utf8(&value)
        .ok()
        .and_then(bearer_token)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Ok((Authn::Invalid, None));
    };
    let hash = auth::hash_key(key);
    let Some(row) = state.keys.resolve(hash.clone()).await? else {
        return Ok((Authn::Invalid, None));
    };
    let principal = Authn::Principal(Principal {
        id: row.id,
        name: row.name.clone(),
        role: row.role,
        tenant: row.tenant.clone(),
        scope: row.scope.clone(),
    });
    Ok((principal, Some(Credential(hash))))
}

/// The `{tenant}` segment of the route a request matched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathTenant {
    /// The route has no `{tenant}` segment (or no route matched).
    Absent,
    /// A tenant ID as handlers see it: percent-decoded, and a DNS label.
    Valid(String),
    /// Something no tenant can be called (not a DNS label once decoded): no such tenant
    /// exists, and the value must not reach the database.
    Invalid,
    /// A path segment does not decode to UTF-8: the path names nothing.
    Undecodable,
}

impl PathTenant {
    /// Reads what the router matched, decoded as the handlers' `Path` extractor sees it
    /// (never the raw path: `/v1/tenants/%61cme` acts on, and is audited under, `acme`).
    async fn of(req: &mut Request) -> Self {
        match req.extract_parts::<RawPathParams>().await {
            Ok(params) => params
                .iter()
                .find(|(name, _)| *name == "tenant")
                .map_or(Self::Absent, |(_, value)| Self::parse(value)),
            Err(_) => Self::Undecodable,
        }
    }

    fn parse(value: &str) -> Self {
        match crate::domain::names::validate_label("tenant", value) {
            Ok(()) => Self::Valid(value.to_owned()),
            Err(_) => Self::Invalid,
        }
    }

    /// The answer for a path that names nothing, before any handler looks it up.
    fn refusal(&self) -> Option<ApiError> {
        match self {
            Self::Invalid => Some(ApiError::tenant_not_found()),
            Self::Undecodable => Some(ApiError::not_found("route")),
            Self::Absent | Self::Valid(_) => None,
        }
    }

    /// The tenant to audit the request under, when the path names one.
    fn audited(&self) -> Option<String> {
        match self {
            Self::Valid(t) => Some(t.clone()),
            Self::Absent | Self::Invalid | Self::Undecodable => None,
        }
    }
}

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

/// What the guard notes of a request before it runs, for metrics and the audit row.
struct Seen {
    method: Method,
    /// The raw path, as the audit row's target.
    path: String,
    /// The route template, `(unmatched)` when none matched.
    route: String,
    tenant: PathTenant,
    source: Option<IpAddr>,
    request_id: String,
}

impl Seen {
    async fn of(req: &mut Request) -> Self {
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            route: req
                .extensions()
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "(unmatched)".to_owned()),
            tenant: PathTenant::of(req).await,
            source: req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            request_id: req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
        }
    }

    /// Whether the request may change something (audited whatever its answer).
    fn mutating(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    /// Whether the request is to the API (`/v1/…`), as opposed to probes and scrapes.
    fn api(&self) -> bool {
        self.path.starts_with("/v1/")
    }
}

/// The middleware.
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let seen = Seen::of(&mut req).await;
    let started = Instant::now();
    let _in_flight = InFlight::enter(&state.engine.metrics.http_in_flight);
    let (principal, response, slot) = answer(&state, req, next, &seen).await;
    if response
        .extensions()
        .get::<PendingError>()
        .is_some_and(|e| e.0.code == "database_unavailable")
    {
        state.db.suspect();
    }
    let audit = Audited { principal, slot };
    record(&state, seen, audit, response.status(), started);
    response
}

/// Authenticates, rate-limits and refuses paths that name nothing; else runs the
/// handler. Returns the caller, when a valid key named one, the answer, and the audit
/// slot a write that ran could record its entry in.
async fn answer(
    state: &AppState,
    mut req: Request,
    next: Next,
    seen: &Seen,
) -> (Option<Principal>, Response, Option<AuditSlot>) {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    // Every API request with a key needs the database, where its key is looked up:
    // while the database is known to be down, answer at once, not after the pool's
    // acquire timeout. Requests without a key still get their `401`.
    if authorization.is_some() && seen.api() && state.db.is_down() {
        return (None, ApiError::database_unavailable().into_response(), None);
    }
    let (authn, credential) = match authenticate(state, authorization).await {
        Ok(a) => a,
        Err(e) => return (None, e.into_response(), None),
    };
    let principal = match &authn {
        Authn::Principal(p) => Some(p.clone()),
        _ => None,
    };
    // Probes and scrapes outside the API are never throttled.
    let class = bucket(&seen.method, &seen.route);
    if seen.api() {
        if let Err(wait) = state.limiter.check(&authn, class, seen.source) {
            let response = rate_limited(&state.engine.metrics, &authn, class, wait);
            return (principal, response, None);
        }
    }
    // A tenant that cannot exist is not looked up: `404` as for any unknown tenant.
    // Requests without a valid key still get their `401` from the handler.
    if let (Some(_), Some(refusal)) = (&principal, seen.tenant.refusal()) {
        return (principal, refusal.into_response(), None);
    }
    req.extensions_mut().insert(authn);
    if let Some(credential) = credential {
        req.extensions_mut().insert(credential);
    }
    if seen.mutating() {
        // A write that commits records this entry in its own transaction.
        let slot = AuditSlot::new(entry(seen, principal.as_ref()));
        req.extensions_mut().insert(slot.clone());
        return (principal, next.run(req).await, Some(slot));
    }
    (principal, next.run(req).await, None)
}

/// `429 rate_limited`, counted by bucket.
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

/// What the guard knows of a request's audit entry once it is answered.
struct Audited {
    /// The caller, when a valid key named one.
    principal: Option<Principal>,
    /// The slot a write could record its entry in (see [`AuditSlot`]). A write on an
    /// operation addressed by ID alone records the operation's tenant there.
    slot: Option<AuditSlot>,
}

/// The audit entry of a request, its status set when it is written.
fn entry(seen: &Seen, principal: Option<&Principal>) -> Entry {
    Entry {
        at: chrono::Utc::now(),
        principal: principal.map(|p| (p.id, p.name.clone())),
        // The tenant the router matched (decoded).
        tenant: seen.tenant.audited(),
        action: format!("{} {}", seen.method, seen.route),
        target: seen.path.clone(),
        status: 0,
        request_id: seen.request_id.clone(),
        source: seen.source.map(|ip| ip.to_string()),
    }
}

/// Counts the answer and queues its audit row, when it needs one and no committed
/// transaction wrote it.
fn record(state: &AppState, seen: Seen, audit: Audited, status: StatusCode, started: Instant) {
    let metrics = &state.engine.metrics;
    let status = status.as_u16();
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: seen.route.clone(),
            method: seen.method.to_string(),
            status: format!("{}xx", status / 100),
        })
        .inc();
    metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route: seen.route.clone(),
            method: seen.method.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    if !seen.mutating() && !matches!(status, 401 | 403 | 429) {
        return;
    }
    let entry = match &audit.slot {
        // Empty: the write's transaction recorded it.
        Some(slot) => slot.remaining(),
        None => Some(entry(&seen, audit.principal.as_ref())),
    };
    if let Some(mut entry) = entry {
        entry.status = status;
        entry.at = chrono::Utc::now();
        state.audit.record(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn the_bearer_scheme_is_named_in_any_case() {
        for header in ["Bearer k1", "bearer k1", "BEARER  k1 ", "bEaReR k1"] {
            assert_eq!(bearer_token(header), Some("k1"), "{header:?}");
        }
        for header in ["Basic k1", "Bearerk1", "k1", "Token k1"] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }

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
    fn a_path_tenant_is_a_dns_label_or_no_tenant_at_all() {
        assert_eq!(PathTenant::parse("acme"), PathTenant::Valid("acme".into()));
        for bad in ["", "Acme", "a\0b", "a/b", "-a"] {
            assert_eq!(PathTenant::parse(bad), PathTenant::Invalid, "{bad:?}");
        }
        assert_eq!(PathTenant::Invalid.audited(), None);
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
