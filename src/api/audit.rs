//! `GET /v1/audit`: the audit trail, for admins (everything) and owners (their tenant).
//!
//! Owners learn that something happened to their tenant, not who in which tenant did
//! it: on entries of keys other than their tenant's own (another tenant's, or a
//! platform key's), the principal's ID and name, the source address and the request ID
//! are left out and `principal_hidden` is set. Requests without a valid key show what
//! they have (source and request ID): there is no one to hide.

use super::error::{ApiError, ErrorBody};
use super::extract::Caller;
use super::wire::Page;
use super::{cursor, params, AppState};
use crate::auth::{Principal, Role};
use crate::store::audit::{self, AuditFilter, ListedRow};
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list))
}

/// One audit entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditOut {
    /// Position in the chain.
    pub id: i64,
    /// When the request was answered.
    pub at: DateTime<Utc>,
    /// Who asked (absent for requests without a valid key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<Uuid>,
    /// Their key's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal_name: Option<String>,
    /// The tenant acted on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Method and route, e.g. `POST /v1/tenants/{tenant}/{kind}`.
    pub action: String,
    /// The path requested.
    pub target: String,
    /// `allowed`, `denied` or `failed`.
    pub outcome: String,
    /// HTTP status answered.
    pub status: i16,
    /// The request's ID (left out with the principal when hidden).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client's address (left out with the principal when hidden).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Set when a key acted whose identity this caller may not see: an owner sees only
    /// its own tenant's keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub principal_hidden: bool,
    /// This entry's link in the chain (hex SHA-256); absent for the moments until the
    /// sealer chains it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl AuditOut {
    /// An entry as seen by `viewer`: admins see everything; anyone else sees who acted
    /// (principal, source, request ID) only when it was a key of the viewer's tenant.
    fn seen_by(listed: ListedRow, viewer: &Principal) -> Self {
        let ListedRow {
            row: r,
            principal_tenant,
        } = listed;
        let hidden = r.principal_id.is_some()
            && viewer.role != Role::Admin
            && (principal_tenant.is_none() || principal_tenant != viewer.tenant);
        let unless_hidden = |v: Option<String>| v.filter(|_| !hidden);
        Self {
            id: r.id,
            at: r.at,
            principal_id: r.principal_id.filter(|_| !hidden),
            principal_name: unless_hidden(r.principal_name),
            tenant: r.tenant,
            action: r.action,
            target: r.target,
            outcome: r.outcome,
            status: r.status,
            request_id: unless_hidden(Some(r.request_id)),
            source: unless_hidden(r.source),
            principal_hidden: hidden,
            hash: r.hash.map(hex::encode),
        }
    }
}

/// Filters of the audit list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this tenant (owners always see only their own).
    pub tenant: Option<String>,
    /// Only this principal (for owners: only a key of their tenant).
    pub principal_id: Option<Uuid>,
    /// Only `allowed`, `denied` or `failed`.
    pub outcome: Option<String>,
    /// Only entries at or after this instant (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List audit entries, newest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "One page", body = Page<AuditOut>),
        (status = 403, description = "Neither an admin nor an owner", body = ErrorBody),
        (status = 404, description = "An owner asked for another tenant", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<AuditOut>>, ApiError> {
    let Query(q) = query.map_err(|e| super::bad_query(&e))?;
    let q = AuditQuery {
        tenant: params::label("tenant", q.tenant)?,
        outcome: params::one_of("outcome", q.outcome, &crate::audit::OUTCOMES)?,
        since: params::instant("since", q.since)?,
        ..q
    };
    let tenant = match principal.role {
        Role::Admin => q.tenant,
        // Owners read their own tenant's trail; another tenant looks nonexistent.
        Role::Owner => {
            let own = principal.tenant.clone();
            if q.tenant.is_some() && q.tenant != own {
                return Err(ApiError::tenant_not_found());
            }
            own
        }
        _ => {
            return Err(ApiError::forbidden(
                "only admins and owners read the audit log",
            ))
        }
    };
    let limit = super::page_limit(q.limit)?;
    let before = q.cursor.as_deref().map(cursor::decode_seq).transpose()?;
    let filter = AuditFilter {
        principals_of: tenant.clone().filter(|_| principal.role != Role::Admin),
        tenant,
        principal_id: q.principal_id,
        outcome: q.outcome,
        since: q.since,
    };
    let rows = super::read(&state, |db| audit::list(db, &filter, before, limit + 1)).await?;
    Ok(Json(cursor::page(
        rows,
        limit,
        |r| cursor::encode_seq(r.row.id),
        |r| AuditOut::seen_by(r, &principal),
    )))
}
