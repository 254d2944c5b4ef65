//! `/v1/tenants/{tenant}/quotas`: a tenant's limits, each with how much of it is used,
//! and what its live resources consume per kind and zone. Admins set the limits;
//! every key that may read the tenant reads them.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::keys::require;
use super::AppState;
use crate::auth::Permission;
use crate::domain::quota::{Amounts, Limit, LimitIn, Usage};
use crate::domain::Kind;
use crate::lifecycle;
use crate::store::quotas;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/tenants/{tenant}/quotas", get(read).put(replace))
}

/// Body of `PUT /v1/tenants/{tenant}/quotas`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotasIn {
    /// Every limit of the tenant (this replaces the earlier set); `[]` removes them all.
    /// Each (dimension, kind, zone) at most once.
    pub limits: Vec<LimitIn>,
}

/// One limit, and how much of it the tenant uses.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LimitOut {
    /// The limit.
    #[serde(flatten)]
    pub limit: Limit,
    /// What the live resources it covers use now (may exceed `limit` if the limit was
    /// lowered below it).
    pub used: i64,
}

/// What the tenant's live resources of one kind in one zone consume.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageOut {
    /// The kind.
    pub kind: Kind,
    /// The zone.
    pub zone: String,
    /// The amounts.
    #[serde(flatten)]
    pub amounts: Amounts,
}

/// A tenant's quota and usage.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuotasOut {
    /// The tenant.
    pub tenant: String,
    /// Its limits, every kind and zone before each kind and zone; empty: unlimited.
    pub limits: Vec<LimitOut>,
    /// What its live resources consume, per kind and zone that has any.
    pub usage: Vec<UsageOut>,
}

impl QuotasOut {
    fn new(tenant: String, limits: Vec<Limit>, usage: Vec<Usage>) -> Self {
        let limits = limits
            .into_iter()
            .map(|limit| LimitOut {
                used: limit.used(&usage),
                limit,
            })
            .collect();
        let usage = usage
            .into_iter()
            .map(|u| UsageOut {
                kind: u.kind,
                zone: u.zone,
                amounts: u.amounts,
            })
            .collect();
        Self {
            tenant,
            limits,
            usage,
        }
    }
}

/// The answer: `limits` with what is used of each, and the usage of `tenant`.
async fn answer(
    state: &AppState,
    tenant: String,
    limits: Vec<Limit>,
) -> Result<Json<QuotasOut>, ApiError> {
    let usage = super::read(state, |db| quotas::usage(db, &tenant)).await?;
    Ok(Json(QuotasOut::new(tenant, limits, usage)))
}

/// Read a tenant's quota: its limits, each with what is used of it, and what its live
/// resources consume per kind and zone.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/quotas", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant ID")),
    responses(
        (status = 200, description = "Limits and usage", body = QuotasOut),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(tenant): Path<String>,
) -> Result<Json<QuotasOut>, ApiError> {
    require(&principal, Permission::Read, Some(&tenant))?;
    super::readable_tenant(&state, &principal, &tenant).await?;
    let limits = super::read(&state, |db| quotas::get(db, &tenant))
        .await?
        .unwrap_or_default();
    answer(&state, tenant, limits).await
}

/// Set a tenant's quota: the whole set of limits at once. A limit caps one dimension
/// (`count`, `vcpus`, `memory_mb`, `nodes`, `storage_gb`) for one kind or all, in one
/// zone or all. Writes that would pass a limit are refused with `409 quota_exceeded`;
/// a limit below current usage takes nothing away.
#[utoipa::path(
    put, path = "/v1/tenants/{tenant}/quotas", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant ID")),
    request_body = QuotasIn,
    responses(
        (status = 200, description = "The limits as stored, and usage", body = QuotasOut),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_quota`, `unknown_zone` or `invalid_body`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn replace(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<QuotasIn>,
) -> Result<Json<QuotasOut>, ApiError> {
    require(&principal, Permission::Platform, Some(&tenant))?;
    let audit = meta.audit(axum::http::StatusCode::OK);
    let limits = lifecycle::quotas::set(&state.engine, &tenant, &body.limits, audit).await?;
    answer(&state, tenant, limits).await
}
