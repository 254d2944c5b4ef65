//! `/v1/tenants/{tenant}/keys`: API keys, created by owners (for their tenant) and
//! admins. A key is shown once, in the answer that creates it; only its hash is kept.
//!
//! `/v1/keys`: the platform's keys (admins and workers, which belong to no tenant),
//! listed and revoked by admins. Worker keys are created through a tenant's route (the
//! answer's `Location` names the platform route where they are revoked) or with
//! `gateway admin create-key`.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::AppState;
use crate::auth::{Decision, Permission, Principal, Role};
use crate::domain::{Service, ValidationError};
use crate::lifecycle::{self, keys::NewKey, LifecycleError};
use crate::store::principals;
use axum::extract::{Path, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants/{tenant}/keys", get(list).post(create))
        .route("/v1/tenants/{tenant}/keys/{id}", delete(revoke))
        .route("/v1/keys", get(list_platform))
        .route("/v1/keys/{id}", delete(revoke_any))
}

/// Body of `POST /v1/tenants/{tenant}/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyIn {
    /// `owner`, `member`, `reader`, or (admins only) `worker`.
    pub role: Role,
    /// A worker key's service.
    #[serde(default)]
    pub service: Option<Service>,
    /// A worker key's zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// A name (DNS label) unique within the tenant; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// When the key stops working; never when absent.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key as listed: never the secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyOut {
    /// Its ID (used to revoke it).
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its tenant (none for platform keys: admins and workers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// A worker key's service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// A worker key's zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Revocation time, if revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<principals::KeyRow> for KeyOut {
    fn from(k: principals::KeyRow) -> Self {
        let p = k.principal;
        Self {
            id: p.id,
            name: p.name,
            role: p.role,
            tenant: p.tenant,
            service: p.scope.as_ref().map(|(s, _)| s.clone()),
            zone: p.scope.map(|(_, z)| z),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A new key: the listing plus the secret, shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewKeyOut {
    /// The key itself. Store it now: it cannot be shown again.
    pub key: String,
    /// The rest.
    #[serde(flatten)]
    pub info: KeyOut,
}

/// Turns a policy decision into an answer.
pub fn require(principal: &Principal, p: Permission, tenant: Option<&str>) -> Result<(), ApiError> {
    match principal.decide(p, tenant) {
        Decision::Allow => Ok(()),
        Decision::Hide => Err(ApiError::tenant_not_found()),
        Decision::Deny => Err(ApiError::forbidden("this key's role does not allow this")),
    }
}

/// Create a key. Owners create `owner`, `member` and `reader` keys of their tenant;
/// admins also create `worker` keys (bound to one service and zone, serving every
/// tenant: platform keys, listed at `GET /v1/keys`). `Location` names the route that
/// revokes the new key.
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/keys", tag = "keys",
    params(("tenant" = String, Path, description = "Tenant ID")),
    request_body = KeyIn,
    responses(
        (status = 201, description = "Created; `key` is shown only now; `Location` revokes it: `/v1/tenants/{tenant}/keys/{id}`, or `/v1/keys/{id}` for worker keys", body = NewKeyOut),
        (status = 403, description = "Not an owner of this tenant, or a worker key without admin", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
        (status = 409, description = "`name_taken`", body = ErrorBody),
        (status = 422, description = "Invalid role, scope, name or expiry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<KeyIn>,
) -> Result<(StatusCode, [(HeaderName, String); 1], Json<NewKeyOut>), ApiError> {
    require(&principal, Permission::Manage, Some(&tenant))?;
    super::readable_tenant(&state, &principal, &tenant).await?;
    let key_tenant = match body.role {
        Role::Admin => {
            let why = "admin keys are created with `gateway admin create-key`";
            return Err(ValidationError::new("invalid_key", "role", why).into());
        }
        Role::Worker => {
            require(&principal, Permission::Platform, None)?;
            None
        }
        _ => Some(tenant),
    };
    let new = NewKey {
        role: body.role,
        tenant: key_tenant,
        service: body.service,
        zone: body.zone,
        name: body.name,
        expires_at: body.expires_at,
    };
    let audit = meta.audit(StatusCode::CREATED);
    let created = lifecycle::keys::create(&state.engine.pool, new, audit).await?;
    let location = match &created.row.principal.tenant {
        Some(t) => format!("/v1/tenants/{t}/keys/{}", created.row.principal.id),
        None => format!("/v1/keys/{}", created.row.principal.id),
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(NewKeyOut {
            key: created.key,
            info: created.row.into(),
        }),
    ))
}

/// List a tenant's keys (never the secrets).
#[utoipa::path(
    get, path = "/v1/tenants/{tenant}/keys", tag = "keys",
    params(("tenant" = String, Path, description = "Tenant ID")),
    responses(
        (status = 200, description = "Keys, oldest first", body = Vec<KeyOut>),
        (status = 403, description = "Not an owner", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<KeyOut>>, ApiError> {
    require(&principal, Permission::Manage, Some(&tenant))?;
    super::readable_tenant(&state, &principal, &tenant).await?;
    let rows = super::read(&state, |db| principals::list(db, Some(&tenant))).await?;
    Ok(Json(rows.into_iter().map(KeyOut::from).collect()))
}

/// Revoke a key of the tenant. It stops working at once.
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/keys/{id}", tag = "keys",
    params(("tenant" = String, Path, description = "Tenant ID"), ("id" = Uuid, Path, description = "Key ID")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Not an owner", body = ErrorBody),
        (status = 404, description = "No live key with that ID in this tenant", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require(&principal, Permission::Manage, Some(&tenant))?;
    revoke_key(&state, &meta, &id, Some(&tenant)).await
}

/// Revokes live key `id` (with `tenant`, only one of that tenant): `204`, or `404`.
async fn revoke_key(
    state: &AppState,
    meta: &Meta,
    id: &str,
    tenant: Option<&str>,
) -> Result<StatusCode, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("key"))?;
    let audit = meta.audit(StatusCode::NO_CONTENT);
    match lifecycle::keys::revoke(&state.engine.pool, id, tenant, audit).await {
        Ok(()) => {
            // Here at once; elsewhere on the notification the revocation sends.
            state.keys.invalidate_all();
            Ok(StatusCode::NO_CONTENT)
        }
        Err(LifecycleError::NotFound) => Err(ApiError::not_found("key")),
        Err(e) => Err(e.into()),
    }
}

/// List the platform's keys: admins and workers, which belong to no tenant (never the
/// secrets). Admins only.
#[utoipa::path(
    get, path = "/v1/keys", tag = "keys",
    responses(
        (status = 200, description = "Platform keys, oldest first", body = Vec<KeyOut>),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_platform(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> Result<Json<Vec<KeyOut>>, ApiError> {
    require(&principal, Permission::Platform, None)?;
    let rows = super::read(&state, |db| principals::list(db, None)).await?;
    Ok(Json(rows.into_iter().map(KeyOut::from).collect()))
}

/// Revoke any key: a platform key (admin or worker), or a tenant's. It stops working at
/// once. Admins only; `gateway admin revoke-key` does the same on the database.
#[utoipa::path(
    delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = Uuid, Path, description = "Key ID")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No live key with that ID", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn revoke_any(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&principal, Permission::Platform, None)?;
    revoke_key(&state, &meta, &id, None).await
}
