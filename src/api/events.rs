//! `GET /v1/tenants/{tenant}/events`: a tenant's events, as a server-sent-events stream
//! (`Accept: text/event-stream`) that resumes from `Last-Event-ID`, or as a JSON page.
//!
//! The cursor is the event's sequence in the events stream ([`crate::eventlog`]), the
//! same on every gateway replica, so a client that reconnects anywhere with its last
//! cursor continues with no gap and no duplicate.

use super::error::ApiError;
use super::extract::Caller;
use super::{params, AppState};
use crate::auth::Principal;
use crate::domain::Role;
use crate::eventlog::{ReadError, Reader, Scope};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gateway_proto::events::{CloudEvent, EventType};
use gateway_proto::Kind;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/tenants/{tenant}/events", get(events))
}

/// Filters, resume point and page size of an events read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events of resources of this registered kind (`vm`, `bm`, `cluster`, `volume`, …).
    pub kind: Option<Kind>,
    /// Only events in this zone.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub zone: Option<String>,
    /// Only events of this resource (its own, and its operations').
    pub resource: Option<Uuid>,
    /// Only events of this operation (its transitions, and the resource changes it made).
    pub operation: Option<Uuid>,
    /// Only these event types, comma-separated (`operation.succeeded,operation.failed`).
    #[serde(rename = "type")]
    #[param(rename = "type", pattern = r"^[a-z_.]+(,[a-z_.]+)*$")]
    pub types: Option<String>,
    /// Resume after this cursor (an event's `cursor`, or a bookmark's); the
    /// `Last-Event-ID` header does the same, and wins when both are sent. Without
    /// either, a stream starts now and a page at the oldest event kept.
    #[param(pattern = r"^[0-9]{1,19}$")]
    pub after: Option<String>,
    /// Page size, 1–500 (default 100); pages only.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// A page of events, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// The events.
    pub items: Vec<CloudEvent>,
    /// Where the next page starts: pass it as `after`. Always present; a short page's
    /// moves past other tenants' events too, so it may move while `items` is empty.
    pub next_cursor: String,
}

/// Read a tenant's events: a stream with `Accept: text/event-stream`, else a page.
///
/// The stream sends each event as `id: <cursor>`, `event: <type>`, `data: <CloudEvent>`;
/// a `bookmark` event (`id` and data `{"cursor": …}`) first when it starts without a
/// resume point and after a quiet spell, so a client resumes cheaply; keep-alive
/// comments meanwhile. A resume point older than the stream's retention gets one
/// `error` event with data `{"code": "events_expired", …}` and the stream ends: list
/// again, then watch from a new bookmark (a page answers `410` with the same code).
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/events", tag = "events",
    params(
        ("tenant" = String, Path, description = "Tenant ID"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this cursor (as `after`, which it wins over); empty: none"),
        EventQuery,
    ),
    responses(
        (status = 200, description = "A page of events (JSON), or the stream (`text/event-stream`)", content(
            (EventPage = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "`invalid_query`, `invalid_cursor`: a malformed filter or cursor", body = super::error::ErrorBody),
        (status = 403, description = "Workers may not read events", body = super::error::ErrorBody),
        (status = 404, description = "Unknown tenant", body = super::error::ErrorBody),
        (status = 422, description = "`invalid_cursor`: the cursor is past the newest event", body = super::error::ErrorBody),
        (status = 410, description = "`events_expired`: events after the cursor are no longer kept; list again", body = super::error::ErrorBody),
        (status = 429, description = "`too_many_streams`: this key has as many streams open as allowed", body = super::error::ErrorBody),
        (status = 503, description = "`events_unavailable`: the events stream cannot be read now", body = super::error::ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    Caller(principal): Caller,
    credential: Option<axum::Extension<super::guard::Credential>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    if principal.role == Role::Worker {
        return Err(ApiError::forbidden("worker keys may not read events"));
    }
    super::readable_tenant(&state, &principal, &tenant).await?;
    let filter = Filter::parse(&q)?;
    let after = resume_point(&headers, q.after.as_deref())?;
    let scope = Scope {
        tenant,
        kind: params::registered_kind(&state.engine.types, q.kind)?,
        zone: params::label("zone", q.zone)?,
    };
    if wants_stream(&headers) {
        let credential = credential.map(|axum::Extension(c)| c);
        watch(state, &principal, credential, scope, filter, after).await
    } else {
        let limit = super::page_limit(q.limit)? as usize;
        page(&state, &scope, &filter, after, limit).await
    }
}

/// The filters the gateway applies to what the stream's subject filter lets through.
#[derive(Debug, Clone, Default)]
struct Filter {
    resource: Option<Uuid>,
    operation: Option<Uuid>,
    types: Option<Vec<EventType>>,
}

impl Filter {
    fn parse(q: &EventQuery) -> Result<Self, ApiError> {
        let types = q
            .types
            .as_deref()
            .map(|t| {
                t.split(',')
                    .map(|one| {
                        one.parse::<EventType>().map_err(|_| {
                            params::invalid(format!("type: unknown event type {one:?}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Self {
            resource: q.resource,
            operation: q.operation,
            types,
        })
    }

    fn matches(&self, e: &CloudEvent) -> bool {
        self.resource.is_none_or(|r| e.resourceid == r)
            && self.operation.is_none_or(|o| e.operationid == Some(o))
            && self
                .types
                .as_ref()
                .is_none_or(|t| t.contains(&e.event_type))
    }
}

fn invalid_cursor(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", message)
}

/// The cursor to resume after: `Last-Event-ID`, else `?after=`. The header wins: a
/// browser's `EventSource` reconnects to the URL it was opened on (with its `after`)
/// and says in the header how far it got.
fn resume_point(headers: &HeaderMap, after: Option<&str>) -> Result<Option<u64>, ApiError> {
    let parse = |what: &str, v: &str| {
        // Any number the contract allows (19 digits) fits a `u64`; one past the newest
        // event is the reader's `422`, quoting it as given. Digits only, as the
        // contract's pattern says (`u64::from_str` takes a `+`).
        let digits = (1..=19).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| v.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| invalid_cursor(format!("{what}: not a cursor: {v:?}")))
    };
    let header = headers
        .get("last-event-id")
        // An empty one says nothing (an `EventSource` that got no `id` yet).
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.to_str()
                .map_err(|_| invalid_cursor("Last-Event-ID: not a cursor".into()))
                .and_then(|v| parse("Last-Event-ID", v))
        })
        .transpose()?;
    let query = after.map(|a| parse("after", a)).transpose()?;
    Ok(header.or(query))
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

fn read_error(e: ReadError) -> ApiError {
    match e {
        ReadError::Expired { .. } => {
            ApiError::new(StatusCode::GONE, "events_expired", e.to_string())
        }
        // Well-formed, but names no event yet: the stream's end is past what was read.
        ReadError::Unknown { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_cursor",
            e.to_string(),
        ),
        ReadError::Unavailable(_) => {
            tracing::warn!(error = %e, "events: cannot read the events stream");
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "events_unavailable",
                "the events stream cannot be read now; retry",
            );
            err.retry_after = Some(1);
            err
        }
    }
}

async fn page(
    state: &AppState,
    scope: &Scope,
    filter: &Filter,
    after: Option<u64>,
    limit: usize,
) -> Result<Response, ApiError> {
    let mut reader = state
        .events
        .read(scope, Some(after.unwrap_or(0)))
        .await
        .map_err(read_error)?;
    let items = reader.page(limit).await.map_err(read_error)?;
    // A short page read all there was: its cursor may move past other tenants' events
    // (as a bookmark does), so a quiet tenant's poller keeps up with the retention.
    let next_cursor = if items.len() < limit {
        reader.bookmark().await
    } else {
        reader.cursor()
    };
    let page = EventPage {
        items: items.into_iter().filter(|e| filter.matches(e)).collect(),
        next_cursor: next_cursor.to_string(),
    };
    Ok(Json(page).into_response())
}

/// Open watch streams per API key on this gateway, bounded.
#[derive(Debug, Default)]
pub struct WatchSlots {
    open: Mutex<HashMap<Uuid, usize>>,
}

/// A watch stream's slot; freed when the stream ends.
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    key: Uuid,
    metrics: crate::metrics::Metrics,
}

impl WatchSlots {
    fn take(
        self: &Arc<Self>,
        key: Uuid,
        cap: usize,
        metrics: &crate::metrics::Metrics,
    ) -> Option<WatchSlot> {
        let mut open = self.open.lock().expect("not poisoned");
        let n = open.entry(key).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        metrics.watch_streams.inc();
        Some(WatchSlot {
            slots: self.clone(),
            key,
            metrics: metrics.clone(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
        self.metrics.watch_streams.dec();
    }
}

async fn watch(
    state: AppState,
    principal: &Principal,
    credential: Option<super::guard::Credential>,
    scope: Scope,
    filter: Filter,
    after: Option<u64>,
) -> Result<Response, ApiError> {
    let settings = state.watch_settings.clone();
    let metrics = state.engine.metrics.clone();
    let Some(slot) = state
        .watch_slots
        .take(principal.id, settings.streams_per_key, &metrics)
    else {
        metrics.watch_refused("too_many_streams");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "this key has {} event streams open on this gateway, the most allowed",
                settings.streams_per_key
            ),
        );
        e.retry_after = Some(5);
        return Err(e);
    };
    let first = match state.events.read(&scope, after).await {
        Ok(reader) => Step::Start(reader, after.is_none()),
        Err(e @ ReadError::Expired { .. }) => Step::Fail("events_expired", e.to_string()),
        Err(e) => return Err(read_error(e)),
    };
    let watcher = Watcher {
        key: credential.map(|c| (state.clone(), c)),
        filter,
        quiet: settings.bookmark_interval,
        shutdown: state.shutdown.clone(),
        metrics,
        _slot: slot,
    };
    let stream = futures::stream::unfold((watcher, first), |(w, step)| async move {
        let (event, next) = w.advance(step).await?;
        Some((Ok::<_, std::convert::Infallible>(event), (w, next)))
    });
    let keep_alive = KeepAlive::new()
        .interval(settings.keepalive)
        .text("keep-alive");
    Ok(Sse::new(stream).keep_alive(keep_alive).into_response())
}

/// Where a watch stream is.
enum Step {
    /// Opened; bookmark first if it started at "now".
    Start(Reader, bool),
    /// Reading.
    Read(Reader),
    /// One last `error` event, then the end.
    Fail(&'static str, String),
    /// Ended.
    Done,
}

/// What a watch stream needs besides its reader.
struct Watcher {
    /// The key the stream was opened with, checked again before each event it sends.
    key: Option<(AppState, super::guard::Credential)>,
    filter: Filter,
    quiet: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    metrics: crate::metrics::Metrics,
    _slot: WatchSlot,
}

impl Watcher {
    /// The next SSE event and the step after it; `None` at the end. An event (or
    /// bookmark) goes out only while the stream's key is still valid: once it is
    /// revoked or expired, the stream ends with an `error` event instead.
    async fn advance(&self, step: Step) -> Option<(Event, Step)> {
        let (event, next) = self.step(step).await?;
        if matches!(next, Step::Done) {
            return Some((event, next));
        }
        let Some((state, credential)) = &self.key else {
            return Some((event, next));
        };
        match super::guard::still_valid(state, credential).await {
            Ok(()) => Some((event, next)),
            Err(e) => Some((error_event(&e.code, &e.message), Step::Done)),
        }
    }

    async fn step(&self, step: Step) -> Option<(Event, Step)> {
        match step {
            Step::Start(reader, true) => Some((bookmark(reader.cursor()), Step::Read(reader))),
            Step::Start(reader, false) | Step::Read(reader) => self.read(reader).await,
            Step::Fail(code, message) => Some((error_event(code, &message), Step::Done)),
            Step::Done => None,
        }
    }

    async fn read(&self, mut reader: Reader) -> Option<(Event, Step)> {
        // One quiet spell for everything this client does not get: events the filters
        // drop do not put its bookmark off.
        let quiet_until = tokio::time::Instant::now() + self.quiet;
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                next = tokio::time::timeout_at(quiet_until, reader.next()) => next,
            };
            match next {
                Err(_) => {
                    let cursor = reader.bookmark().await;
                    return Some((bookmark(cursor), Step::Read(reader)));
                }
                Ok(Some(Ok(e))) if self.filter.matches(&e) => {
                    self.metrics.watch_events_sent.inc();
                    let sse = Event::default()
                        .id(e.cursor.clone().unwrap_or_default())
                        .event(e.event_type.as_str())
                        .json_data(&e)
                        .expect("an event serializes");
                    return Some((sse, Step::Read(reader)));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "events: a watch lost the events stream");
                    let message = "the events stream was lost; resume from your last cursor";
                    return Some((error_event("events_unavailable", message), Step::Done));
                }
                Ok(None) => return None,
            }
        }
    }
}

/// The `error` event a stream ends with.
fn error_event(code: &str, message: &str) -> Event {
    Event::default()
        .event("error")
        .data(json!({"code": code, "message": message}).to_string())
}

fn bookmark(cursor: u64) -> Event {
    Event::default()
        .id(cursor.to_string())
        .event("bookmark")
        .data(json!({"cursor": cursor.to_string()}).to_string())
}
