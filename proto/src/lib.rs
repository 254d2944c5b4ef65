//! Wire types shared by the gateway and its workers.
//!
//! The gateway and the workers never share a database or a process boundary: everything
//! they agree on is in this crate and travels as JSON, either in a JetStream message
//! ([`Dispatch`], gateway → worker) or in an HTTP body ([`Report`] and [`ReportAck`],
//! worker → gateway). Keeping the contract in a crate of its own lets the worker build
//! without any of the gateway's database code.
//!
//! **Architecture invariant:** nothing here knows about PostgreSQL, axum or NATS.

pub mod names;
pub mod signing;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;
use uuid::Uuid;

/// Defines a string-backed enum with `as_str`, `Display`, `FromStr` and a list of all values.
// `$text` is a `tt`, not a `literal`: utoipa's derive does not see a `literal` fragment
// in `#[serde(rename = …)]`, and the schemas then listed the Rust names.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:tt),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as it appears on the wire and in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue { what: stringify!($name), value: s.to_owned() }),
                }
            }
        }
    };
}

pub mod events;

/// A string that names no value of the enum it was parsed as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// The enum's name.
    pub what: &'static str,
    /// The text that did not match.
    pub value: String,
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}", self.what, self.value)
    }
}

impl std::error::Error for UnknownValue {}

/// Defines a name registered as data (a kind, a service, an action): a string of 1 to
/// 32 characters, `[a-z][a-z0-9_]*`, so that it fits a NATS subject token, a consumer
/// name, a URL segment and a Prometheus label unchanged. Cloning is cheap (`Arc<str>`).
macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(try_from = "String", into = "String")]
        #[schema(value_type = String, pattern = "^[a-z][a-z0-9_]{0,31}$")]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// The name, checked.
            pub fn new(name: impl AsRef<str>) -> Result<Self, UnknownValue> {
                let name = name.as_ref();
                if is_registered_name(name) {
                    Ok(Self(name.into()))
                } else {
                    Err(UnknownValue { what: $what, value: name.chars().take(64).collect() })
                }
            }

            /// A name known to be well formed (a literal); panics otherwise.
            pub fn named(name: &str) -> Self {
                Self::new(name).expect("a well-formed name")
            }

            /// The name as it appears on the wire and in the database.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

/// Whether `name` is a well-formed kind, service or action name.
pub fn is_registered_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 32
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

name_type! {
    /// A backend service: one pool of workers per service and zone. Services are named by
    /// the resource types registered with the gateway (`vm`, `bm`, `k8s`, `storage`, …).
    Service, "service"
}

name_type! {
    /// A kind of resource, registered with the gateway (`vm`, `bm`, `cluster`, `volume`,
    /// …). Each kind is served by exactly one [`Service`].
    Kind, "kind"
}

name_type! {
    /// What an operation does to its resource: `create`, `update` and `delete`, which
    /// every kind has, or one of the actions its resource type registers (`reboot`,
    /// `resize`, …).
    Action, "action"
}

impl Action {
    /// Provision a new resource.
    pub fn create() -> Action {
        Action::named("create")
    }

    /// Converge the resource on a changed spec.
    pub fn update() -> Action {
        Action::named("update")
    }

    /// Tear the resource down.
    pub fn delete() -> Action {
        Action::named("delete")
    }

    /// Whether this is `create`.
    pub fn is_create(&self) -> bool {
        self == "create"
    }

    /// Whether this is `delete`.
    pub fn is_delete(&self) -> bool {
        self == "delete"
    }

    /// Whether this is one of the actions every kind has (`create`, `update`, `delete`),
    /// which no resource type may register as its own.
    pub fn is_core(&self) -> bool {
        matches!(&*self.0, "create" | "update" | "delete")
    }
}

string_enum! {
    /// Where an operation is in its life. See docs/ARCHITECTURE.md for the diagram.
    OperationState {
        /// Waiting for an earlier operation on the same resource to end.
        Queued => "queued",
        /// Its outbox row is written; the relay has not published it yet.
        Pending => "pending",
        /// JetStream acknowledged the message; no worker has started it yet.
        Dispatched => "dispatched",
        /// A worker reported that it started an attempt.
        Running => "running",
        /// Done; the resource reflects it.
        Succeeded => "succeeded",
        /// Ended with an error; `error` says why.
        Failed => "failed",
        /// Cancelled before it took effect.
        Cancelled => "cancelled",
    }
}

impl OperationState {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OperationState::Succeeded | OperationState::Failed | OperationState::Cancelled
        )
    }
}

string_enum! {
    /// Coarse lifecycle of a resource, derived from its operations.
    Phase {
        /// Its create operation has not succeeded yet.
        Provisioning => "provisioning",
        /// Converged on its spec.
        Ready => "ready",
        /// An update or action is in progress.
        Updating => "updating",
        /// Its delete operation is in progress.
        Deleting => "deleting",
        /// The last operation failed; `status.last_error` says why.
        Failed => "failed",
        /// Deleted; kept only for the history of its operations.
        Deleted => "deleted",
    }
}

impl Phase {
    /// The phase a resource enters when an operation with `action` starts.
    pub fn on_start(action: &Action) -> Phase {
        if action.is_create() {
            Phase::Provisioning
        } else if action.is_delete() {
            Phase::Deleting
        } else {
            Phase::Updating
        }
    }

    /// The phase a resource is left in when an operation with `action` ends in `state`,
    /// or `None` when the phase stays as it was.
    pub fn on_end(action: &Action, state: OperationState) -> Option<Phase> {
        match state {
            OperationState::Succeeded if action.is_delete() => Some(Phase::Deleted),
            OperationState::Succeeded => Some(Phase::Ready),
            OperationState::Failed => Some(Phase::Failed),
            // A cancelled create never provisioned anything: the resource goes away.
            OperationState::Cancelled if action.is_create() => Some(Phase::Deleted),
            // Any other cancellation stopped before it changed anything.
            OperationState::Cancelled => Some(Phase::Ready),
            _ => None,
        }
    }
}

/// The JetStream subject that carries operations for one service in one zone.
pub fn ops_subject(prefix: &str, service: &Service, zone: &str) -> String {
    format!("{prefix}.{service}.{zone}")
}

/// The durable consumer that a pool of workers for one service and zone shares.
pub fn consumer_name(service: &Service, zone: &str) -> String {
    format!("{service}-{zone}")
}

/// Header that carries the request ID from the client's request to the worker.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";
/// Header that carries the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The message a worker receives: everything it needs to act, so that it never has to
/// ask for the operation itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Dispatch {
    /// The operation to carry out; drivers use it as their idempotency key.
    pub operation_id: Uuid,
    /// Owner of the resource.
    pub tenant: String,
    /// The resource acted on.
    pub resource_id: Uuid,
    /// Its kind.
    pub kind: Kind,
    /// Its zone.
    pub zone: String,
    /// Its name, as the tenant gave it.
    pub name: String,
    /// What to do.
    pub action: Action,
    /// The resource generation whose spec this operation converges on.
    pub generation: i64,
    /// The desired spec at that generation.
    pub spec: serde_json::Value,
    /// Action arguments (for example the VM a volume attaches to).
    pub input: serde_json::Value,
    /// After this instant the gateway fails the operation; a worker should give up.
    pub deadline: DateTime<Utc>,
}

/// The state a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    /// The worker started attempt `attempt`.
    Running,
    /// The driver finished; `status` is the observed state.
    Succeeded,
    /// The driver gave up; `error` says why.
    Failed,
    /// The worker stopped because the operation's cancellation was requested.
    Cancelled,
}

/// An error as operations carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationError {
    /// Stable machine-readable code, e.g. `capacity_exhausted`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Whether submitting the same request again may succeed.
    #[serde(default)]
    pub retryable: bool,
}

impl OperationError {
    /// An error with its code, message and whether retrying may help.
    pub fn new(code: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable,
        }
    }
}

/// A worker's report on an operation: `POST /v1/operations/{id}/reports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The attempt this report is about (the JetStream delivery count).
    pub attempt: i32,
    /// The state reached.
    pub state: ReportState,
    /// Observed status of the resource, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// Why it failed, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationError>,
}

/// The gateway's answer to an accepted report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReportAck {
    /// The operation reported on.
    pub operation_id: Uuid,
    /// Its state after the report.
    pub state: OperationState,
    /// Its current attempt.
    pub attempt: i32,
    /// A client asked to cancel it: the worker should stop and report `cancelled`.
    pub cancel_requested: bool,
}

/// The most reports one `POST /v1/reports` may carry.
pub const MAX_BATCH_REPORTS: usize = 100;

/// Several reports in one request: `POST /v1/reports`. They are applied in one
/// transaction, in order, and each is accepted or refused on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    /// 1 to [`MAX_BATCH_REPORTS`] reports, applied in this order (two on one operation
    /// apply one after the other).
    pub reports: Vec<BatchedReport>,
}

/// One report of a [`ReportBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchedReport {
    /// The operation reported on.
    pub operation_id: Uuid,
    /// The report, as `POST /v1/operations/{id}/reports` takes it.
    pub report: Report,
    /// The `X-Request-Id` the report would have carried alone (the operation's request):
    /// its audit row and log line carry it. 1 to 128 visible ASCII characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The answer to a [`ReportBatch`]: one result per report, in the request's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReportBatchResult {
    /// One per report, in order.
    pub results: Vec<BatchedReportResult>,
}

/// What became of one report of a batch: `status` is what
/// `POST /v1/operations/{id}/reports` would have answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchedReportResult {
    /// The operation reported on.
    pub operation_id: Uuid,
    /// `200` accepted; `403`, `404`, `409` or `422` refused, with `code`.
    pub status: u16,
    /// The acknowledgement, when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<ReportAck>,
    /// The error code, when refused (as the single-report endpoint's error body has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schemas say what the wire carries (the macro once passed each value to the
    /// schema derive in a form it ignored, and the schemas listed the Rust names).
    #[test]
    fn enum_schemas_list_the_wire_values() {
        fn values<T: utoipa::PartialSchema>() -> serde_json::Value {
            serde_json::to_value(T::schema()).unwrap()["enum"].clone()
        }
        let text = |all: &[&str]| serde_json::json!(all);
        let states: Vec<&str> = OperationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(values::<OperationState>(), text(&states));
        let phases: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(values::<Phase>(), text(&phases));
        assert!(states.contains(&"running"), "{states:?}");
    }

    #[test]
    fn enums_round_trip_through_their_text() {
        for name in ["vm", "loadbalancer", "power_on", "k8s"] {
            let kind: Kind = name.parse().unwrap();
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            let back: Action = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(back.as_str(), name);
        }
        for bad in [
            "",
            "Vm",
            "1vm",
            "load-balancer",
            "a.b",
            "x y",
            &"a".repeat(33),
        ] {
            assert!(bad.parse::<Kind>().is_err(), "{bad:?}");
            assert!(serde_json::from_str::<Service>(&format!("{bad:?}")).is_err());
        }
        assert!("nope".parse::<OperationState>().is_err());
    }

    #[test]
    fn subjects_and_consumers_are_per_service_and_zone() {
        assert_eq!(
            ops_subject("ops", &Service::named("k8s"), "zone-b"),
            "ops.k8s.zone-b"
        );
        assert_eq!(
            consumer_name(&Service::named("storage"), "zone-a"),
            "storage-zone-a"
        );
    }

    #[test]
    fn reports_reject_unknown_fields() {
        let err = serde_json::from_str::<Report>(r#"{"attempt":1,"state":"running","x":1}"#);
        assert!(err.is_err());
    }
}
