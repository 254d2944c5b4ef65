//! Peers: what an operation needs to know about *other* resources, read through the
//! gateway before the driver runs.
//!
//! The rule of the system: a worker that needs data about another resource asks the
//! gateway, with its own scoped key, and never the service that owns it. The gateway
//! lets a worker read exactly what its work needs (for a storage worker of zone Z: the
//! VMs live in zone Z) and answers `404` for anything else.
//!
//! The step has three parts, the first and last pure:
//!
//! 1. [`Peer::of`]: does this operation depend on another resource? Today only one
//!    thing does: a volume whose desired spec names a VM in `attached_to` (any action
//!    but `delete`).
//! 2. `Peers::read`: `GET /v1/tenants/{tenant}/{kind}/{id}` with the worker's key and
//!    the message's `X-Request-Id` / `traceparent`; the consume loop retries transient
//!    failures the way it retries reports.
//! 3. [`Peer::resolve`]: decide from the answer. Either the operation cannot go on (a
//!    permanent [`DriverError`], reported as `failed`), or the driver gets a copy of the
//!    [`Dispatch`] whose `input` carries what it needs under [`Peer::input_key`] (see
//!    [`with_input`]). The `Driver` trait and the `Dispatch` message stay as they are.
//!
//! For an attachment the driver finds `input.attach_target`, an [`AttachTarget`]:
//!
//! ```json
//! {"attach_target": {"id": "0193…", "zone": "zone-a", "host": "zone-a-host-3", "phase": "ready"}}
//! ```

use crate::drivers::DriverError;
use crate::report::{error_body, error_chain, GatewayClient, TraceHeaders};
use gateway_proto::{Dispatch, Kind, Service};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::future::Future;
use uuid::Uuid;

/// Key of the [`AttachTarget`] in the `input` of the dispatch a storage driver gets.
pub const ATTACH_TARGET_KEY: &str = "attach_target";

/// Code of the permanent failure of an operation whose peer is gone: the VM a volume
/// attaches to does not exist (in the volume's tenant and zone) or is being deleted.
/// A VM whose last operation failed still exists, so it can take attachments.
pub const TARGET_MISSING: &str = "attachment_target_missing";

/// Code of the permanent failure of an operation whose peer could not be read: the
/// gateway refused the read (`401`, `403`, …) or answered something that is not a
/// resource. Retrying the same read would get the same answer.
pub const LOOKUP_FAILED: &str = "attachment_lookup_failed";

/// VM phases in which nothing can attach to it.
const GONE_PHASES: &[&str] = &["deleting", "deleted"];

/// Another resource an operation depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The VM a volume attaches to (`spec.attached_to`).
    AttachTarget {
        /// The VM's ID.
        vm: Uuid,
    },
}

impl Peer {
    /// The resource that an operation of a `service` pool depends on, if any.
    ///
    /// A storage operation on a volume whose `spec.attached_to` is a UUID depends on
    /// that VM, unless it deletes the volume. Nothing else depends on anything.
    pub fn of(service: &Service, op: &Dispatch) -> Option<Peer> {
        if *service != "storage" || op.kind != "volume" || op.action.is_delete() {
            return None;
        }
        let vm = op.spec.get("attached_to")?.as_str()?.parse().ok()?;
        Some(Peer::AttachTarget { vm })
    }

    /// The kind of the resource depended on.
    pub fn kind(self) -> Kind {
        match self {
            Peer::AttachTarget { .. } => Kind::named("vm"),
        }
    }

    /// Its ID.
    pub fn id(self) -> Uuid {
        match self {
            Peer::AttachTarget { vm } => vm,
        }
    }

    /// The key of the driver's `input` under which the answer goes.
    pub fn input_key(self) -> &'static str {
        match self {
            Peer::AttachTarget { .. } => ATTACH_TARGET_KEY,
        }
    }

    /// Decides from the gateway's answer about the peer of `op`: the value the driver
    /// gets under [`Peer::input_key`], or why the operation fails.
    ///
    /// For an attachment: a VM that the gateway does not show (`404`), that is not in
    /// the volume's tenant and zone, or whose phase is `deleting` (or
    /// `deleted`) fails the operation with [`TARGET_MISSING`]; an answer that is not a
    /// resource fails it with [`LOOKUP_FAILED`]. Otherwise the driver gets the
    /// [`AttachTarget`].
    pub fn resolve(self, op: &Dispatch, answer: PeerAnswer) -> Result<Value, DriverError> {
        match self {
            Peer::AttachTarget { vm } => attach_target(op, vm, answer)
                .map(|target| serde_json::to_value(target).expect("an AttachTarget is plain JSON")),
        }
    }

    /// The permanent error of an operation whose peer the gateway will never show.
    pub fn lookup_failed(self, error: &LookupError) -> DriverError {
        DriverError::permanent(
            LOOKUP_FAILED,
            format!(
                "cannot read {} {} through the gateway: {error}",
                self.kind(),
                self.id()
            ),
        )
    }
}

/// What a storage driver is told about the VM a volume attaches to: `input.attach_target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachTarget {
    /// The VM's ID (the volume's `spec.attached_to`).
    pub id: Uuid,
    /// Its zone, the volume's.
    pub zone: String,
    /// The host the VM runs on (`status.host`), `None` while unknown (e.g. the VM is
    /// still being provisioned).
    pub host: Option<String>,
    /// Its phase when it was read, e.g. `ready` or `provisioning`.
    pub phase: String,
}

/// The fields of a resource the decision looks at; the gateway sends more.
#[derive(Debug, Deserialize)]
struct ResourceView {
    id: Uuid,
    tenant: String,
    zone: String,
    phase: String,
    #[serde(default)]
    status: Value,
}

fn attach_target(op: &Dispatch, vm: Uuid, answer: PeerAnswer) -> Result<AttachTarget, DriverError> {
    let missing = |why: String| {
        DriverError::permanent(
            TARGET_MISSING,
            format!("cannot attach volume {} to VM {vm}: {why}", op.resource_id),
        )
    };
    let body = match answer {
        PeerAnswer::Found(body) => body,
        PeerAnswer::NotFound { code, message } => {
            return Err(missing(format!(
                "the VM does not exist in tenant {} and zone {} (gateway: {code}: {message})",
                op.tenant, op.zone
            )))
        }
    };
    let found: ResourceView = serde_json::from_value(body).map_err(|e| {
        DriverError::permanent(
            LOOKUP_FAILED,
            format!("the gateway's answer about VM {vm} is not a resource: {e}"),
        )
    })?;
    if found.id != vm || found.tenant != op.tenant || found.zone != op.zone {
        return Err(missing(format!(
            "the gateway answered with VM {} of tenant {} in zone {}, not one of tenant {} in zone {}",
            found.id, found.tenant, found.zone, op.tenant, op.zone
        )));
    }
    if GONE_PHASES.contains(&found.phase.as_str()) {
        return Err(missing(format!("the VM is {}", found.phase)));
    }
    Ok(AttachTarget {
        id: found.id,
        zone: found.zone,
        host: found
            .status
            .get("host")
            .and_then(Value::as_str)
            .map(str::to_owned),
        phase: found.phase,
    })
}

/// A copy of `op` whose `input` also holds `value` under `key` (replacing any value
/// there). An `input` that is not an object (the gateway always sends one) is replaced
/// by an object holding only `key`.
pub fn with_input(op: &Dispatch, key: &str, value: Value) -> Dispatch {
    let mut enriched = op.clone();
    if !enriched.input.is_object() {
        enriched.input = Value::Object(Default::default());
    }
    if let Some(input) = enriched.input.as_object_mut() {
        input.insert(key.to_owned(), value);
    }
    enriched
}

/// The gateway's verdict on a read of another resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAnswer {
    /// `200`: the resource, as JSON.
    Found(Value),
    /// `404`: no such live resource that this worker may see.
    NotFound {
        /// The gateway's machine-readable code, e.g. `not_found`.
        code: String,
        /// Its explanation.
        message: String,
    },
}

/// A read of another resource that did not get a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The gateway is unreachable, overloaded (`429`) or failing (`5xx`): ask again.
    #[error("gateway unavailable: {0}")]
    Transient(String),
    /// The gateway will never answer it (`401`, `403`, `400`, a body that is not JSON, …).
    #[error("read refused: {0}")]
    Permanent(String),
}

impl LookupError {
    /// Whether asking again may get a verdict.
    pub fn is_transient(&self) -> bool {
        matches!(self, LookupError::Transient(_))
    }
}

/// Reads other resources through the gateway; the consume loop is generic over it so
/// its decisions can be tested without a gateway.
pub(crate) trait Peers: Send + Sync + 'static {
    /// Reads `peer`, of `tenant`, once.
    fn read(
        &self,
        tenant: &str,
        peer: Peer,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<PeerAnswer, LookupError>> + Send;
}

impl Peers for GatewayClient {
    fn read(
        &self,
        tenant: &str,
        peer: Peer,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<PeerAnswer, LookupError>> + Send {
        let request = resource_url(self.base_url(), tenant, &peer.kind(), peer.id())
            .map(|url| self.request(Method::GET, url, trace));
        async move {
            let response = request?
                .send()
                .await
                .map_err(|e| LookupError::Transient(error_chain(&e)))?;
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|e| LookupError::Transient(error_chain(&e)))?;
            classify(status, &body)
        }
    }
}

/// `{base}/v1/tenants/{tenant}/{collection}/{id}`, each segment percent-encoded.
fn resource_url(base: &str, tenant: &str, kind: &Kind, id: Uuid) -> Result<Url, LookupError> {
    let bad = |why: &str| LookupError::Permanent(format!("gateway URL {base:?} {why}"));
    let mut url = Url::parse(base).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    url.path_segments_mut()
        .map_err(|()| bad("cannot have a path"))?
        .pop_if_empty()
        .extend(["v1", "tenants", tenant, collection(kind), &id.to_string()]);
    Ok(url)
}

/// The path segment of a kind's collection in the API.
///
/// A worker knows the kinds its service depends on; these are the built-in kinds'.
fn collection(kind: &Kind) -> &str {
    match kind.as_str() {
        "vm" => "vms",
        "bm" => "bare-metal",
        "cluster" => "clusters",
        "volume" => "volumes",
        other => other,
    }
}

/// Sorts the gateway's answer to a read.
pub(crate) fn classify(status: StatusCode, body: &[u8]) -> Result<PeerAnswer, LookupError> {
    if status.is_success() {
        return serde_json::from_slice(body)
            .map(PeerAnswer::Found)
            // A contract violation, not an outage: asking again would not fix it.
            .map_err(|e| {
                LookupError::Permanent(format!("{status} with a body that is not JSON: {e}"))
            });
    }
    let (code, message) = error_body(body);
    match status {
        StatusCode::NOT_FOUND => Ok(PeerAnswer::NotFound { code, message }),
        s if crate::report::retryable(s) => Err(LookupError::Transient(format!(
            "{status}: {code}: {message}"
        ))),
        _ => Err(LookupError::Permanent(format!(
            "{status}: {code}: {message}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sim::tests::dispatch;
    use gateway_proto::Action;
    use serde_json::json;

    fn volume(action: Action, spec: Value) -> Dispatch {
        dispatch(Kind::named("volume"), action, "data", spec)
    }

    fn vm_json(op: &Dispatch, vm: Uuid, phase: &str, status: Value) -> Value {
        json!({
            "id": vm, "tenant": op.tenant, "kind": "vm", "zone": op.zone, "name": "db",
            "spec": {"flavor": "m1.small", "image": "debian-12"}, "status": status,
            "phase": phase, "generation": 2, "observed_generation": 2,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:01Z",
        })
    }

    fn permanent(err: DriverError) -> (String, String) {
        match err {
            DriverError::Permanent { code, message } => (code, message),
            other => panic!("not permanent: {other}"),
        }
    }

    #[test]
    fn only_storage_operations_on_attached_volumes_other_than_delete_have_a_peer() {
        let vm = Uuid::now_v7();
        let attached = json!({"size_gb": 20, "class": "ssd", "attached_to": vm});
        for action in [
            Action::create(),
            Action::named("attach"),
            Action::update(),
            Action::named("resize"),
        ] {
            assert_eq!(
                Peer::of(
                    &Service::named("storage"),
                    &volume(action.clone(), attached.clone())
                ),
                Some(Peer::AttachTarget { vm }),
                "{action}"
            );
        }
        assert_eq!(
            Peer::of(
                &Service::named("storage"),
                &volume(Action::delete(), attached.clone())
            ),
            None
        );
        let detached = json!({"size_gb": 20, "class": "ssd"});
        assert_eq!(
            Peer::of(
                &Service::named("storage"),
                &volume(Action::named("detach"), detached)
            ),
            None
        );
        let not_a_uuid = json!({"size_gb": 20, "attached_to": "web-1"});
        assert_eq!(
            Peer::of(
                &Service::named("storage"),
                &volume(Action::create(), not_a_uuid)
            ),
            None
        );
        assert_eq!(
            Peer::of(
                &Service::named("storage"),
                &volume(Action::create(), json!({"attached_to": null}))
            ),
            None
        );
        // Another pool never looks anything up, whatever the spec says.
        assert_eq!(
            Peer::of(
                &Service::named("vm"),
                &volume(Action::create(), attached.clone())
            ),
            None
        );
        let vm_op = dispatch(Kind::named("vm"), Action::create(), "web", attached);
        assert_eq!(Peer::of(&Service::named("storage"), &vm_op), None);

        let peer = Peer::AttachTarget { vm };
        assert_eq!(
            (peer.kind(), peer.id(), peer.input_key()),
            (Kind::named("vm"), vm, "attach_target")
        );
    }

    #[test]
    fn a_live_vm_becomes_the_attach_target_with_its_host() {
        let vm = Uuid::now_v7();
        let op = volume(
            Action::named("attach"),
            json!({"size_gb": 20, "attached_to": vm}),
        );
        let peer = Peer::AttachTarget { vm };
        let status = json!({"power_state": "running", "host": "zone-a-host-3", "ip": "10.0.0.1"});
        let target = peer
            .resolve(&op, PeerAnswer::Found(vm_json(&op, vm, "ready", status)))
            .unwrap();
        assert_eq!(
            target,
            json!({"id": vm, "zone": "zone-a", "host": "zone-a-host-3", "phase": "ready"})
        );

        // Still provisioning: no host yet, but the attachment may go ahead.
        let target = peer
            .resolve(
                &op,
                PeerAnswer::Found(vm_json(&op, vm, "provisioning", json!({}))),
            )
            .unwrap();
        assert_eq!(target["host"], Value::Null);
        assert_eq!(target["phase"], "provisioning");
        let target = peer
            .resolve(
                &op,
                PeerAnswer::Found(vm_json(&op, vm, "updating", Value::Null)),
            )
            .unwrap();
        assert_eq!(target["host"], Value::Null);
    }

    #[test]
    fn a_vm_that_is_gone_or_going_fails_the_attachment() {
        let vm = Uuid::now_v7();
        let op = volume(Action::create(), json!({"size_gb": 20, "attached_to": vm}));
        let peer = Peer::AttachTarget { vm };
        let status = json!({"host": "zone-a-host-3"});
        for phase in ["deleting", "deleted"] {
            let answer = PeerAnswer::Found(vm_json(&op, vm, phase, status.clone()));
            let (code, message) = permanent(peer.resolve(&op, answer).unwrap_err());
            assert_eq!(code, TARGET_MISSING, "{phase}");
            assert!(message.contains(&vm.to_string()), "{message}");
            assert!(message.contains(phase), "{message}");
        }
        // A VM whose last operation failed still exists: attaching to it is fine.
        let failed = PeerAnswer::Found(vm_json(&op, vm, "failed", status.clone()));
        assert!(peer.resolve(&op, failed).is_ok());

        let not_found = PeerAnswer::NotFound {
            code: "not_found".into(),
            message: "no such resource".into(),
        };
        let (code, message) = permanent(peer.resolve(&op, not_found).unwrap_err());
        assert_eq!(code, TARGET_MISSING);
        assert!(message.contains(&vm.to_string()), "{message}");
        assert!(message.contains("does not exist"), "{message}");

        let mut elsewhere = vm_json(&op, vm, "ready", status.clone());
        elsewhere["zone"] = json!("zone-b");
        let (code, message) =
            permanent(peer.resolve(&op, PeerAnswer::Found(elsewhere)).unwrap_err());
        assert_eq!(code, TARGET_MISSING);
        assert!(message.contains("zone-b"), "{message}");

        let other_vm = vm_json(&op, Uuid::now_v7(), "ready", status);
        assert_eq!(
            code_of(peer.resolve(&op, PeerAnswer::Found(other_vm))),
            TARGET_MISSING
        );

        let garbage = PeerAnswer::Found(json!({"hello": "world"}));
        assert_eq!(code_of(peer.resolve(&op, garbage)), LOOKUP_FAILED);
    }

    fn code_of(result: Result<Value, DriverError>) -> String {
        permanent(result.unwrap_err()).0
    }

    #[test]
    fn the_enriched_dispatch_differs_only_by_the_input_key() {
        let vm = Uuid::now_v7();
        let mut op = volume(
            Action::named("attach"),
            json!({"size_gb": 20, "attached_to": vm}),
        );
        op.input = json!({"vm_id": vm});
        let target = json!({"id": vm, "zone": "zone-a", "host": null, "phase": "ready"});
        let enriched = with_input(&op, ATTACH_TARGET_KEY, target.clone());
        assert_eq!(
            enriched.input,
            json!({"vm_id": vm, "attach_target": target})
        );
        let mut back = enriched.clone();
        back.input = op.input.clone();
        assert_eq!(back, op, "everything else is unchanged");

        // A repeated enrichment replaces the key; a missing input becomes an object.
        let again = with_input(&enriched, ATTACH_TARGET_KEY, json!(1));
        assert_eq!(again.input["attach_target"], 1);
        op.input = Value::Null;
        assert_eq!(with_input(&op, "k", json!(true)).input, json!({"k": true}));
    }

    #[test]
    fn reads_go_to_the_resource_path_with_segments_encoded() {
        let vm = Uuid::now_v7();
        let url = resource_url("http://127.0.0.1:8080", "acme", &Kind::named("vm"), vm).unwrap();
        assert_eq!(
            url.as_str(),
            format!("http://127.0.0.1:8080/v1/tenants/acme/vms/{vm}")
        );
        let url = resource_url("http://gw.internal/api/", "a/b c", &Kind::named("bm"), vm).unwrap();
        assert_eq!(
            url.as_str(),
            format!("http://gw.internal/api/v1/tenants/a%2Fb%20c/bare-metal/{vm}")
        );
        assert!(!resource_url("not a url", "acme", &Kind::named("vm"), vm)
            .unwrap_err()
            .is_transient());
    }

    #[test]
    fn answers_sort_into_found_not_found_retry_and_give_up() {
        let body = json!({"id": Uuid::nil(), "phase": "ready"}).to_string();
        assert!(matches!(
            classify(StatusCode::OK, body.as_bytes()),
            Ok(PeerAnswer::Found(v)) if v["phase"] == "ready"
        ));
        assert!(!classify(StatusCode::OK, b"<html>")
            .unwrap_err()
            .is_transient());
        let body = json!({"code": "not_found", "message": "no such resource"}).to_string();
        assert_eq!(
            classify(StatusCode::NOT_FOUND, body.as_bytes()).unwrap(),
            PeerAnswer::NotFound {
                code: "not_found".into(),
                message: "no such resource".into()
            }
        );
        for status in [408, 429, 500, 502, 503, 504] {
            let err = classify(StatusCode::from_u16(status).unwrap(), b"").unwrap_err();
            assert!(err.is_transient(), "{status}");
        }
        for status in [400, 401, 403, 409, 422] {
            let err = classify(StatusCode::from_u16(status).unwrap(), b"{}").unwrap_err();
            assert!(!err.is_transient(), "{status}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_transient() {
        let port = crate::testing::closed_port();
        let client = GatewayClient::new(&format!("http://127.0.0.1:{port}"), "k").unwrap();
        let peer = Peer::AttachTarget { vm: Uuid::now_v7() };
        let err = client
            .read("acme", peer, &TraceHeaders::default())
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(peer
            .lookup_failed(&err)
            .to_string()
            .starts_with(LOOKUP_FAILED));
    }
}
