//! `/v1/tenants`: tenants, created by admins.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::AppState;
use crate::auth::Permission;
use crate::lifecycle;
use crate::store::tenants::{self, TenantRow};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants", post(create).get(list))
        .route("/v1/tenants/{tenant}", get(read))
}

/// Body of `POST /v1/tenants`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantIn {
    /// The tenant's ID, a DNS label.
    #[schema(example = "acme")]
    pub id: String,
    /// Free text for humans.
    #[serde(default)]
    pub display_name: String,
}

/// A tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantOut {
    /// Its ID.
    pub id: String,
    /// Free text for humans.
    pub display_name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<TenantRow> for TenantOut {
    fn from(t: TenantRow) -> Self {
        Self {
            id: t.id,
            display_name: t.display_name,
            created_at: t.created_at,
        }
    }
}

/// Create a tenant (admins only).
#[utoipa::path(
    post, path = "/v1/tenants", tag = "tenants",
    request_body = TenantIn,
    responses(
        (status = 201, description = "Created", body = TenantOut),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "`tenant_exists`", body = ErrorBody),
        (status = 422, description = "`invalid_name`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    JsonBody(body): JsonBody<TenantIn>,
) -> Result<(StatusCode, Json<TenantOut>), ApiError> {
    super::keys::require(&principal, Permission::Platform, None)?;
    let audit = meta.audit(StatusCode::CREATED);
    let row =
        lifecycle::tenants::create(&state.engine.pool, &body.id, &body.display_name, audit).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// List tenants: all for admins, their own for tenant keys.
#[utoipa::path(
    get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, description = "Tenants by ID", body = Vec<TenantOut>)),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<Vec<TenantOut>>, ApiError> {
    let rows = super::read(&state, tenants::list).await?;
    Ok(Json(
        rows.into_iter()
            .filter(|t| principal.can_read(&t.id))
            .map(TenantOut::from)
            .collect(),
    ))
}

/// Read one tenant.
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant ID")),
    responses(
        (status = 200, description = "The tenant", body = TenantOut),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(tenant): Path<String>,
) -> Result<Json<TenantOut>, ApiError> {
    let row = if principal.can_read(&tenant) {
        super::read(&state, |db| tenants::get(db, &tenant)).await?
    } else {
        None
    };
    row.map(|t| Json(t.into()))
        .ok_or_else(ApiError::tenant_not_found)
}
