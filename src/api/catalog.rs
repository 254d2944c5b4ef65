//! `/v1/zones` and `/v1/catalog/{category}`: what specs may name.

use super::error::{ApiError, ErrorBody};
use super::extract::Caller;
use super::AppState;
use crate::domain::spec::Category;
use crate::store::catalog;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/zones", get(zones))
        .route("/v1/catalog/{category}", get(entries))
}

/// A zone.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ZoneOut {
    /// Its name.
    pub name: String,
    /// Free text for humans.
    pub description: String,
    /// The region that owns it, when the installation has several; requests about it
    /// are answered by that region's gateway (`307` to `url` from the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The public URL of its region's gateway, when that is another region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A catalog entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CatalogEntryOut {
    /// Its name, as specs use it.
    pub name: String,
    /// Sizes and limits.
    pub attributes: serde_json::Value,
}

/// List zones.
#[utoipa::path(
    get, path = "/v1/zones", tag = "catalog",
    responses((status = 200, description = "Zones by name", body = Vec<ZoneOut>)),
    security(("api_key" = []))
)]
pub async fn zones(
    State(state): State<AppState>,
    _: Caller,
) -> Result<Json<Vec<ZoneOut>>, ApiError> {
    let rows = super::read(&state, catalog::zones).await?;
    Ok(Json(
        rows.into_iter()
            .map(|z| ZoneOut {
                name: z.name,
                description: z.description,
                url: if z.local { None } else { z.url },
                region: z.region,
            })
            .collect(),
    ))
}

/// List one catalog category: `flavor`, `image`, `machine_class`, `k8s_version` or
/// `storage_class`.
#[utoipa::path(
    get, path = "/v1/catalog/{category}", tag = "catalog",
    params(("category" = Category, Path, description = "Catalog category")),
    responses(
        (status = 200, description = "Entries by name", body = Vec<CatalogEntryOut>),
        (status = 404, description = "Unknown category", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn entries(
    State(state): State<AppState>,
    _: Caller,
    Path(category): Path<String>,
) -> Result<Json<Vec<CatalogEntryOut>>, ApiError> {
    let category =
        Category::parse(&category).ok_or_else(|| ApiError::not_found("catalog category"))?;
    let rows = super::read(&state, |db| catalog::list(db, category)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| CatalogEntryOut {
                name: r.name,
                attributes: r.attributes,
            })
            .collect(),
    ))
}
