//! Regions at the HTTP door: requests about another region's zone, or about a resource
//! or operation another region made, are answered `307 Temporary Redirect` to that
//! region's gateway, with the same path and query (`Location` absolute). A `307` keeps
//! the method and the body, so a client that follows redirects (curl `-L`, reqwest,
//! Go's `net/http`) sends the same request there.
//!
//! Redirecting rather than forwarding: the answer comes from the one region that holds
//! the truth, the client's next requests (polls of the operation, whose `Location` is
//! that region's) go straight there, this gateway holds no second connection per request,
//! and a region cut off from the others still tells clients where to go.

use super::error::ApiError;
use super::AppState;
use crate::domain::region;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moka::future::Cache;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How long the region list is trusted.
const TTL: Duration = Duration::from_secs(5);

/// Every region as `(tag its IDs carry, name, gateway URL)`.
type Tagged = Arc<Vec<(u16, String, String)>>;

/// The regions known here, by the tag their IDs carry. Cheap to clone.
#[derive(Clone)]
pub struct Directory {
    own: Option<Arc<str>>,
    by_tag: Cache<(), Tagged>,
}

impl Directory {
    /// The directory of region `own` (`None`: a single-region installation, which
    /// never redirects).
    pub fn new(own: Option<&str>) -> Self {
        Self {
            own: own.map(Arc::from),
            by_tag: Cache::builder().max_capacity(1).time_to_live(TTL).build(),
        }
    }

    /// Whether this installation is one region of several.
    pub fn enabled(&self) -> bool {
        self.own.is_some()
    }

    /// The other region whose IDs carry `tag`: its name and URL.
    async fn region_of(&self, pool: &PgPool, tag: u16) -> Option<(String, String)> {
        let own = self.own.as_deref()?;
        let all = self
            .by_tag
            .try_get_with((), async {
                let regions =
                    crate::store::again_if_ended(pool, || crate::store::replication::regions(pool))
                        .await?;
                Ok::<_, sqlx::Error>(Arc::new(
                    regions
                        .into_iter()
                        .map(|(name, url)| (region::tag_of(&name), name, url))
                        .collect(),
                ))
            })
            .await
            .ok()?;
        all.iter()
            .find(|(t, name, _)| *t == tag && name != own)
            .map(|(_, name, url)| (name.clone(), url.clone()))
    }
}

/// `307 other_region`: the same request, at `base` (a region's public URL).
pub fn redirect(region: &str, base: &str, uri: &Uri) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("{}{path}", base.trim_end_matches('/'));
    let mut res = other_region(region, &location).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, value);
    }
    res
}

/// `307 other_region`: region `region` serves this; the same request goes to `location`.
fn other_region(region: &str, location: &str) -> ApiError {
    ApiError::new(
        StatusCode::TEMPORARY_REDIRECT,
        "other_region",
        format!("this is served by region {region}; send the same request to {location}"),
    )
    .with_details(serde_json::json!({"region": region, "location": location}))
}

/// What a request at `path` about `id` would be answered when `id` is not here: if
/// another region made it, `307 other_region` naming that region and the same path at
/// its gateway (for answers that cannot redirect, such as one report of a batch).
pub async fn made_elsewhere(state: &AppState, id: Uuid, path: &str) -> Option<ApiError> {
    if !state.regions.enabled() {
        return None;
    }
    let tag = region::tag_in(&id)?;
    let (name, url) = state.regions.region_of(&state.engine.pool, tag).await?;
    Some(other_region(
        &name,
        &format!("{}{path}", url.trim_end_matches('/')),
    ))
}

/// Where a request about zone `zone` belongs: `None` here (or nowhere: an unknown zone
/// is the handler's `422`; or a single-region installation), else a redirect to the
/// zone's region.
pub async fn zone_elsewhere(
    state: &AppState,
    zone: &str,
    uri: &Uri,
) -> Result<Option<Response>, ApiError> {
    if !state.regions.enabled() {
        return Ok(None);
    }
    let catalog = &state.engine.catalog;
    let Some(z) = super::read(state, |db| catalog.zone_outside(db, zone)).await? else {
        return Ok(None);
    };
    if z.local {
        return Ok(None);
    }
    match (&z.region, &z.url) {
        (Some(region), Some(url)) => Ok(Some(redirect(region, url, uri))),
        _ => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "region_unknown",
                format!("zone {zone:?} belongs to a region whose address has not reached this one yet; retry shortly"),
            );
            e.retry_after = Some(1);
            Err(e)
        }
    }
}

/// The tenant collections whose items are global (replicated to every region): a miss
/// there is a miss everywhere, never a redirect.
const GLOBAL_COLLECTIONS: [&str; 2] = ["keys", "webhooks"];

/// The ID of a regional thing a path is about, if it names one: `/v1/operations/{id}…`
/// or `/v1/tenants/{t}/{plural}/{id}…` (a resource).
fn path_id(path: &str) -> Option<Uuid> {
    let segments: Vec<&str> = path.split('/').collect();
    let id = match segments.as_slice() {
        ["", "v1", "operations", id, ..] => id,
        ["", "v1", "tenants", _, plural, id, ..] if !GLOBAL_COLLECTIONS.contains(plural) => id,
        _ => return None,
    };
    id.parse().ok()
}

/// Middleware: a `404` about an ID made by another region becomes a redirect there.
pub async fn follow_ids(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let uri = req.uri().clone();
    let res = next.run(req).await;
    if res.status() != StatusCode::NOT_FOUND || !state.regions.enabled() {
        return res;
    }
    let Some(tag) = path_id(uri.path()).and_then(|id| region::tag_in(&id)) else {
        return res;
    };
    match state.regions.region_of(&state.engine.pool, tag).await {
        Some((name, url)) => redirect(&name, &url, &uri),
        None => res,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_where_resources_and_operations_are_named() {
        let id = Uuid::now_v7();
        for path in [
            format!("/v1/operations/{id}"),
            format!("/v1/operations/{id}/cancel"),
            format!("/v1/tenants/acme/vms/{id}"),
            format!("/v1/tenants/acme/volumes/{id}/actions/resize"),
        ] {
            assert_eq!(path_id(&path), Some(id), "{path}");
        }
        for path in [
            "/v1/tenants/acme/vms".to_string(),
            format!("/v1/tenants/acme/webhooks/{id}"),
            format!("/v1/tenants/acme/keys/{id}"),
            format!("/v1/keys/{id}"),
            "/v1/operations/not-an-id".into(),
        ] {
            assert_eq!(path_id(&path), None, "{path}");
        }
    }

    #[test]
    fn a_redirect_keeps_path_and_query_under_the_other_base() {
        let uri: Uri = "/v1/tenants/acme/vms?zone=zone-c".parse().unwrap();
        let res = redirect("r2", "http://127.0.0.1:8081/", &uri);
        assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(
            res.headers()[header::LOCATION],
            "http://127.0.0.1:8081/v1/tenants/acme/vms?zone=zone-c"
        );
    }
}
