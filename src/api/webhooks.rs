//! `/v1/tenants/{tenant}/webhooks`: a tenant's endpoints that receive its events, signed
//! as the Standard Webhooks specification says, and each endpoint's delivery log.
//! Owners (and admins) manage them.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::keys::require;
use super::resources::path_id;
use super::{cursor, AppState};
use crate::auth::{Permission, Principal};
use crate::domain::ValidationError;
use crate::lifecycle::webhooks::{self as lifecycle, WebhookChange};
use crate::store::webhooks::{self as store, AttemptRow, DeliveryRow, WebhookRow};
use crate::webhooks::target::{self, TargetError};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The routes.
pub fn router() -> Router<AppState> {
    let one = "/v1/tenants/{tenant}/webhooks/{id}";
    Router::new()
        .route("/v1/tenants/{tenant}/webhooks", get(list).post(create))
        .route(one, get(read).patch(change).delete(delete))
        .route(&format!("{one}/rotate-secret"), post(rotate))
        .route(&format!("{one}/deliveries"), get(deliveries))
        .route(&format!("{one}/deliveries/{{delivery}}"), get(delivery))
        .route(&format!("{one}/deliveries/{{delivery}}/retry"), post(retry))
}

/// Body of `POST /v1/tenants/{tenant}/webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookIn {
    /// Where deliveries go: `https`, on a public address.
    #[schema(example = "https://hooks.example.com/gateway")]
    pub url: String,
    /// Event types to receive (`operation.succeeded`, …); empty or absent: all.
    #[serde(default)]
    pub types: Vec<String>,
    /// Free text (at most 1,024 characters).
    #[serde(default)]
    pub description: String,
}

/// Body of `PATCH /v1/tenants/{tenant}/webhooks/{id}`: what to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookPatch {
    /// A new URL.
    pub url: Option<String>,
    /// New event types (empty: all).
    pub types: Option<Vec<String>>,
    /// A new description.
    pub description: Option<String>,
    /// `true` re-enables a disabled endpoint (its failure streak starts again from
    /// zero, and its waiting deliveries resume); `false` disables it.
    pub enabled: Option<bool>,
}

/// An endpoint (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookOut {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: String,
    /// Where deliveries go.
    pub url: String,
    /// Event types it receives (empty: all).
    pub types: Vec<String>,
    /// Free text.
    pub description: String,
    /// Whether deliveries are sent.
    pub enabled: bool,
    /// Why it is disabled (`failing`: too many failed attempts in a row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// When it was disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<DateTime<Utc>>,
    /// Failed attempts in a row.
    pub failure_streak: i32,
    /// Until when the secret before the last rotation still signs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<WebhookRow> for WebhookOut {
    fn from(w: WebhookRow) -> Self {
        Self {
            id: w.id,
            tenant: w.tenant,
            url: w.url,
            types: w.types,
            description: w.description,
            enabled: w.disabled_at.is_none(),
            disabled_reason: w.disabled_reason,
            disabled_at: w.disabled_at,
            failure_streak: w.failure_streak,
            previous_secret_expires_at: w.previous_secret_expires_at.filter(|t| *t > Utc::now()),
            created_at: w.created_at,
            updated_at: w.updated_at,
        }
    }
}

/// An endpoint with its signing secret: only in the answers that make a secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookWithSecret {
    /// The endpoint.
    #[serde(flatten)]
    pub webhook: WebhookOut,
    /// `whsec_…`: verify deliveries with it (Standard Webhooks). Shown only now.
    pub secret: String,
}

/// The endpoints of a tenant, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    /// The endpoints.
    pub items: Vec<WebhookOut>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptOut {
    /// When it was made.
    pub at: DateTime<Utc>,
    /// The endpoint's HTTP status, if it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// Time to the answer or the failure.
    pub latency_ms: i32,
    /// The start of the answer's body (at most 1 KiB).
    pub response: String,
    /// Why there was no answer (timeout, refused connection, forbidden address, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryOut {
    /// Its ID.
    pub id: Uuid,
    /// The event's ID (the `webhook-id` header).
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// `pending` (waiting for its next attempt), `succeeded` or `failed` (the retry
    /// schedule is spent).
    pub state: String,
    /// When the next attempt is due (`pending` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Its attempts, oldest first.
    pub attempts: Vec<AttemptOut>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A page of deliveries, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryPage {
    /// The deliveries.
    pub items: Vec<DeliveryOut>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Paging of a delivery log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn deliveries_out(rows: Vec<DeliveryRow>, attempts: Vec<AttemptRow>) -> Vec<DeliveryOut> {
    rows.into_iter()
        .map(|d| DeliveryOut {
            attempts: attempts
                .iter()
                .filter(|a| a.delivery_id == d.id)
                .map(|a| AttemptOut {
                    at: a.at,
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    response: a.response.clone(),
                    error: a.error.clone(),
                })
                .collect(),
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            next_attempt_at: (d.state == "pending").then_some(d.next_attempt_at),
            state: d.state,
            created_at: d.created_at,
            updated_at: d.updated_at,
        })
        .collect()
}

fn not_found() -> ApiError {
    ApiError::not_found("webhook")
}

/// Owners and admins manage a tenant's webhooks.
async fn manage(state: &AppState, principal: &Principal, tenant: &str) -> Result<(), ApiError> {
    require(principal, Permission::Manage, Some(tenant))?;
    super::readable_tenant(state, principal, tenant).await
}

/// Checks a URL's form and where it points.
async fn checked_url(state: &AppState, url: &str) -> Result<String, ApiError> {
    let policy = state.webhook_policy;
    let parsed = crate::domain::webhook::check_url(url, policy)?;
    target::check(&parsed, policy).await.map_err(|e| {
        let code = match e {
            TargetError::Forbidden { .. } => "webhook_url_forbidden",
            TargetError::Unresolvable(_) => "webhook_url_unresolvable",
        };
        ApiError::from(ValidationError::new(code, "url", e.to_string()))
    })?;
    Ok(parsed.to_string())
}

/// Register an endpoint; the answer holds its signing secret, shown this once.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/webhooks", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID")),
    request_body = WebhookIn,
    responses(
        (status = 201, description = "Registered", body = WebhookWithSecret),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_webhook_url`, `webhook_url_forbidden` (a loopback, private, link-local or metadata address), `webhook_url_unresolvable`, `invalid_event_type`, `invalid_description`, `too_many_webhooks`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<WebhookIn>,
) -> Result<Response, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let url = checked_url(&state, &body.url).await?;
    let change = WebhookChange {
        url: Some(url),
        types: Some(body.types),
        description: Some(body.description),
        enabled: None,
    };
    let audit = meta.audit(StatusCode::CREATED);
    let keys = state.webhook_secret_keys.as_ref();
    let w = lifecycle::create(&state.engine, &tenant, change, keys, audit).await?;
    let secret = w.secret.clone();
    let out = WebhookWithSecret {
        webhook: w.into(),
        secret,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// A tenant's endpoints.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/webhooks", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID")),
    responses(
        (status = 200, description = "The endpoints", body = WebhookList),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(tenant): Path<String>,
) -> Result<Json<WebhookList>, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let rows = super::read(&state, |db| store::list(db, &tenant)).await?;
    Ok(Json(WebhookList {
        items: rows.into_iter().map(Into::into).collect(),
    }))
}

/// One endpoint.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/webhooks/{id}", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID")),
    responses(
        (status = 200, description = "The endpoint", body = WebhookOut),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<WebhookOut>, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let w = super::read(&state, |db| store::get(db, &tenant, id))
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(w.into()))
}

/// Change an endpoint: its URL, event types, description, or whether it is enabled.
#[utoipa::path(
    patch, path = "/v1/tenants/{tenant}/webhooks/{id}", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID")),
    request_body = WebhookPatch,
    responses(
        (status = 200, description = "The endpoint as changed", body = WebhookOut),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "As for registering", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn change(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, id)): Path<(String, String)>,
    JsonBody(body): JsonBody<WebhookPatch>,
) -> Result<Json<WebhookOut>, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let url = match &body.url {
        Some(u) => Some(checked_url(&state, u).await?),
        None => None,
    };
    let change = WebhookChange {
        url,
        types: body.types,
        description: body.description,
        enabled: body.enabled,
    };
    let audit = meta.audit(StatusCode::OK);
    let w = lifecycle::change(&state.engine, &tenant, id, change, audit)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(w.into()))
}

/// Delete an endpoint and its delivery log.
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/webhooks/{id}", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let audit = meta.audit(StatusCode::NO_CONTENT);
    if lifecycle::delete(&state.engine, &tenant, id, audit).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

/// Give an endpoint a new signing secret. The old one keeps signing beside it (two
/// signatures in `webhook-signature`) for `WEBHOOK_SECRET_GRACE_SECONDS`.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID")),
    responses(
        (status = 200, description = "The endpoint with its new secret", body = WebhookWithSecret),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn rotate(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<WebhookWithSecret>, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let audit = meta.audit(StatusCode::OK);
    let w = lifecycle::rotate(
        &state.engine,
        &tenant,
        id,
        state.webhook_secret_grace,
        state.webhook_secret_keys.as_ref(),
        audit,
    )
    .await?
    .ok_or_else(not_found)?;
    let secret = w.secret.clone();
    Ok(Json(WebhookWithSecret {
        webhook: w.into(),
        secret,
    }))
}

/// An endpoint's deliveries, newest first, each with its attempts.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/webhooks/{id}/deliveries", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID"), DeliveryQuery),
    responses(
        (status = 200, description = "One page", body = DeliveryPage),
        (status = 400, description = "Bad cursor or limit", body = ErrorBody),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, id)): Path<(String, String)>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let limit = super::page_limit(q.limit)?;
    let before = q
        .cursor
        .as_deref()
        .map(cursor::decode_time_id)
        .transpose()?;
    super::read(&state, |db| store::get(db, &tenant, id))
        .await?
        .ok_or_else(not_found)?;
    let mut rows = super::read(&state, |db| store::deliveries(db, id, before, limit + 1)).await?;
    let next_cursor = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        let last = rows.last().expect("a full page");
        cursor::encode_time_id(last.created_at, last.id)
    });
    let ids: Vec<Uuid> = rows.iter().map(|d| d.id).collect();
    let attempts = super::read(&state, |db| store::attempts(db, &ids)).await?;
    Ok(Json(DeliveryPage {
        items: deliveries_out(rows, attempts),
        next_cursor,
    }))
}

/// One delivery with its attempts.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/webhooks/{id}/deliveries/{delivery}", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID"), ("delivery" = Uuid, Path, description = "Delivery ID")),
    responses(
        (status = 200, description = "The delivery", body = DeliveryOut),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delivery(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((tenant, id, delivery)): Path<(String, String, String)>,
) -> Result<Json<DeliveryOut>, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let delivery = path_id(&delivery, "delivery")?;
    one_delivery(&state, &tenant, id, delivery).await.map(Json)
}

async fn one_delivery(
    state: &AppState,
    tenant: &str,
    webhook: Uuid,
    delivery: Uuid,
) -> Result<DeliveryOut, ApiError> {
    super::read(state, |db| store::get(db, tenant, webhook))
        .await?
        .ok_or_else(not_found)?;
    let row = super::read(state, |db| store::delivery(db, webhook, delivery))
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    let ids = [row.id];
    let attempts = super::read(state, |db| store::attempts(db, &ids)).await?;
    Ok(deliveries_out(vec![row], attempts).remove(0))
}

/// Send a delivery again now, whatever became of it (a replay: the same `webhook-id`).
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/webhooks/{id}/deliveries/{delivery}/retry", tag = "webhooks",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Webhook ID"), ("delivery" = Uuid, Path, description = "Delivery ID")),
    responses(
        (status = 202, description = "Due now", body = DeliveryOut),
        (status = 403, description = "Not an owner or admin", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, id, delivery)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    manage(&state, &principal, &tenant).await?;
    let id = path_id(&id, "webhook")?;
    let delivery = path_id(&delivery, "delivery")?;
    let audit = meta.audit(StatusCode::ACCEPTED);
    if !lifecycle::retry(&state.engine, &tenant, id, delivery, audit).await? {
        return Err(ApiError::not_found("delivery"));
    }
    let out = one_delivery(&state, &tenant, id, delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}
