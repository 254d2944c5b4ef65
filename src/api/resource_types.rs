//! `/v1/resource-types`: the registry of resource types. Every key may read it (it is
//! the contract of `/v1/tenants/{t}/{plural}`); admins register, change and remove
//! types. Registering a kind makes its routes, its schemas in the served OpenAPI
//! document, its quotas and events, and (through the relay) its worker pools' JetStream
//! consumers.

use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, JsonBody, Meta};
use super::keys::require;
use super::AppState;
use crate::auth::Permission;
use crate::domain::resource_type::{ActionDef, TypeDef};
use crate::lifecycle::resource_types::{self as registration, Outcome};
use crate::lifecycle::LifecycleError;
use crate::store::resource_types::TypeRow;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/resource-types", get(list).post(create))
        .route(
            "/v1/resource-types/{kind}",
            get(read).put(replace).delete(remove),
        )
}

/// A registered resource type: its definition (as `TypeDef`) and version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResourceTypeOut {
    /// The kind.
    #[schema(value_type = String)]
    pub kind: crate::domain::Kind,
    /// Its collection's URL segment.
    pub plural: String,
    /// The service whose workers act on it.
    #[schema(value_type = String)]
    pub service: crate::domain::Service,
    /// Free text for humans.
    pub description: String,
    /// JSON Schema of the spec.
    #[schema(value_type = Object)]
    pub spec_schema: serde_json::Value,
    /// JSON Schema of the status, if registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status_schema: Option<serde_json::Value>,
    /// The actions, by name.
    #[schema(value_type = BTreeMap<String, ActionDef>)]
    pub actions: std::collections::BTreeMap<crate::domain::Action, ActionDef>,
    /// 1 when registered, one more at each change.
    pub version: i64,
}

fn out(row: TypeRow) -> Result<ResourceTypeOut, ApiError> {
    let d = row
        .to_def()
        .map_err(|e| ApiError::from(sqlx::Error::Decode(Box::new(e))))?;
    Ok(ResourceTypeOut {
        kind: d.kind,
        plural: d.plural,
        service: d.service,
        description: d.description,
        spec_schema: d.spec_schema,
        status_schema: d.status_schema,
        actions: d.actions,
        version: row.version,
    })
}

fn type_not_found(e: LifecycleError) -> ApiError {
    match e {
        LifecycleError::NotFound => ApiError::not_found("resource type"),
        e => e.into(),
    }
}

/// List the registered resource types.
#[utoipa::path(
    get, path = "/v1/resource-types", tag = "resource-types",
    responses((status = 200, description = "Every type, by kind", body = Vec<ResourceTypeOut>)),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    _: Caller,
) -> Result<Json<Vec<ResourceTypeOut>>, ApiError> {
    let rows = super::read(&state, crate::store::resource_types::all).await?;
    Ok(Json(rows.into_iter().map(out).collect::<Result<_, _>>()?))
}

/// Read one resource type.
#[utoipa::path(
    get, path = "/v1/resource-types/{kind}", tag = "resource-types",
    params(("kind" = String, Path, description = "The kind, e.g. `vm`")),
    responses(
        (status = 200, description = "The type", body = ResourceTypeOut),
        (status = 404, description = "No such kind", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn read(
    State(state): State<AppState>,
    _: Caller,
    Path(kind): Path<String>,
) -> Result<Json<ResourceTypeOut>, ApiError> {
    let row = super::read(&state, |db| crate::store::resource_types::get(db, &kind))
        .await?
        .ok_or_else(|| ApiError::not_found("resource type"))?;
    Ok(Json(out(row)?))
}

/// Register a new resource type (admins). Its routes, schemas and worker consumers
/// exist once this answers.
#[utoipa::path(
    post, path = "/v1/resource-types", tag = "resource-types",
    request_body = TypeDef,
    responses(
        (status = 201, description = "Registered, at version 1", body = ResourceTypeOut),
        (status = 409, description = "`resource_type_exists` or `plural_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_resource_type` (`details.field` says where)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    JsonBody(def): JsonBody<TypeDef>,
) -> Result<(StatusCode, Json<ResourceTypeOut>), ApiError> {
    require(&principal, Permission::Platform, None)?;
    let audit = meta.audit(StatusCode::CREATED);
    let (row, _) = registration::put(&state.engine, def, false, audit).await?;
    Ok((StatusCode::CREATED, Json(out(row)?)))
}

/// Register or change a resource type (admins). A change may only widen the type:
/// anything that could refuse a stored spec or a client's request is refused with
/// `409 breaking_change`.
#[utoipa::path(
    put, path = "/v1/resource-types/{kind}", tag = "resource-types",
    params(("kind" = String, Path, description = "The kind; the body's `kind` must be the same")),
    request_body = TypeDef,
    responses(
        (status = 200, description = "Changed (a new version), or the same as stored", body = ResourceTypeOut),
        (status = 201, description = "Registered, at version 1", body = ResourceTypeOut),
        (status = 409, description = "`breaking_change` or `plural_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_resource_type`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn replace(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(kind): Path<String>,
    JsonBody(def): JsonBody<TypeDef>,
) -> Result<(StatusCode, Json<ResourceTypeOut>), ApiError> {
    require(&principal, Permission::Platform, None)?;
    if def.kind.as_str() != kind {
        let why = format!("the body is about {}, the path about {kind:?}", def.kind);
        return Err(crate::domain::ValidationError::new("invalid_body", "kind", why).into());
    }
    let audit = meta.audit(StatusCode::OK);
    let (row, outcome) = registration::put(&state.engine, def, true, audit).await?;
    let status = match outcome {
        Outcome::Created => StatusCode::CREATED,
        Outcome::Updated | Outcome::Unchanged => StatusCode::OK,
    };
    Ok((status, Json(out(row)?)))
}

/// Remove a resource type (admins): refused while live resources have it or another
/// type names it.
#[utoipa::path(
    delete, path = "/v1/resource-types/{kind}", tag = "resource-types",
    params(("kind" = String, Path, description = "The kind")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such kind", body = ErrorBody),
        (status = 409, description = "`resource_type_in_use`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    Caller(principal): Caller,
    meta: Meta,
    Path(kind): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&principal, Permission::Platform, None)?;
    let audit = meta.audit(StatusCode::NO_CONTENT);
    registration::delete(&state.engine, &kind, audit)
        .await
        .map_err(type_not_found)?;
    Ok(StatusCode::NO_CONTENT)
}
