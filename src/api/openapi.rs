//! The OpenAPI 3.1 document, generated from the handlers' annotations and served at
//! `GET /v1/openapi.json`.

use super::{audit, catalog, error, health, keys, operations, quotas, resources, tenants, wire};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API's contract.
#[derive(OpenApi)]
#[openapi(
    info(title = "Control-plane gateway", description = "One front door for VMs, bare-metal servers, Kubernetes clusters and volumes. Writes answer `202` with an operation to poll."),
    paths(
        resources::create, resources::read, resources::list, resources::delete,
        resources::patch, resources::action,
        operations::read, operations::list, operations::report, operations::cancel,
        tenants::create, tenants::list, tenants::read,
        catalog::zones, catalog::entries,
        keys::create, keys::list, keys::revoke, keys::list_platform, keys::revoke_any,
        audit::list, quotas::read, quotas::replace,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(
        error::ErrorBody, wire::CreateResourceIn, wire::ResourceOut, wire::OperationOut,
        crate::domain::spec::VmSpec, crate::domain::spec::BmSpec,
        crate::domain::spec::ClusterSpec, crate::domain::spec::VolumeSpec,
        gateway_proto::Dispatch,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes of this module.
pub fn router() -> Router<super::AppState> {
    Router::new().route(
        "/v1/openapi.json",
        get(|| async { Json(ApiDoc::openapi()) }),
    )
}
