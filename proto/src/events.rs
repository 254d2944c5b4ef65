//! Events: what the gateway tells the world about every committed state change, as
//! [CloudEvents 1.0](https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md)
//! in JSON.
//!
//! One event is written in the transaction of each change (an operation's state
//! transition; a resource created, its spec changed, its status or phase changed, or
//! deleted), published by the relay to the events stream on subject
//! `{events_prefix}.{tenant}.{kind}.{zone}` with the event's `id` as `Nats-Msg-Id`, and
//! served to clients by the watch API and webhooks. The stream's sequence number is the
//! event's cursor: the gateway adds it as the `cursor` extension attribute when it serves
//! an event (it cannot be in the published body, which exists before the sequence does).

use crate::UnknownValue;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;
use uuid::Uuid;

/// The CloudEvents version of every event.
pub const SPEC_VERSION: &str = "1.0";

/// Content type of every event's `data`.
pub const DATA_CONTENT_TYPE: &str = "application/json";

string_enum! {
    /// What happened. `operation.*` events carry the operation (as `GET
    /// /v1/operations/{id}` shows it) in `data`; `resource.*` events carry the resource
    /// (as `GET /v1/tenants/{t}/{kind}/{id}` shows it).
    EventType {
        /// An operation was accepted (its `state` is `queued` or `pending`).
        OperationCreated => "operation.created",
        /// A queued operation reached the head of its resource's queue.
        OperationPending => "operation.pending",
        /// Its message was stored in JetStream.
        OperationDispatched => "operation.dispatched",
        /// A worker started it.
        OperationRunning => "operation.running",
        /// It ended in success.
        OperationSucceeded => "operation.succeeded",
        /// It ended in failure.
        OperationFailed => "operation.failed",
        /// It was cancelled.
        OperationCancelled => "operation.cancelled",
        /// A resource was created.
        ResourceCreated => "resource.created",
        /// Its spec or labels changed (a new `generation` for a spec change).
        ResourceUpdated => "resource.updated",
        /// Its status, phase or observed generation changed.
        ResourceStatusChanged => "resource.status_changed",
        /// It was deleted.
        ResourceDeleted => "resource.deleted",
    }
}

impl EventType {
    /// Whether the event carries an operation (else a resource).
    pub fn is_operation(self) -> bool {
        self.as_str().starts_with("operation.")
    }
}

/// One event, in CloudEvents 1.0 JSON format. Attributes beyond the required ones are
/// CloudEvents extension attributes (lower-case letters only, as the specification
/// requires).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per event (a UUID); the `Nats-Msg-Id` of its message and the
    /// `webhook-id` of its webhook deliveries.
    pub id: Uuid,
    /// Where it happened: the tenant's API path, `/v1/tenants/{tenant}`.
    pub source: String,
    /// What happened.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// What it is about, relative to `source`: `operations/{id}` or `{kind path}/{id}`
    /// (for example `vms/0193…`).
    pub subject: String,
    /// When the change committed.
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The tenant (extension).
    pub tenant: String,
    /// The resource kind (extension).
    pub kind: crate::Kind,
    /// The zone (extension).
    pub zone: String,
    /// The resource the event is about or acts on (extension).
    pub resourceid: Uuid,
    /// The operation the event is about, or whose change caused a resource event
    /// (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operationid: Option<Uuid>,
    /// The resource generation: the operation's target generation, or the resource's
    /// generation (extension).
    pub generation: i64,
    /// The `X-Request-Id` of the request that submitted the operation involved
    /// (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requestid: Option<String>,
    /// The event's position in the events stream, as a decimal string: pass it as
    /// `after` or `Last-Event-ID` to resume after it. Added when the gateway serves the
    /// event; absent in the message on the broker, whose stream sequence it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The operation or the resource, as the API shows it.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// The subject of an event's message on the broker.
pub fn event_subject(prefix: &str, tenant: &str, kind: &crate::Kind, zone: &str) -> String {
    format!("{prefix}.{tenant}.{kind}.{zone}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_round_trip_and_say_what_they_carry() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), *t);
        }
        assert!(EventType::OperationSucceeded.is_operation());
        assert!(!EventType::ResourceDeleted.is_operation());
    }

    #[test]
    fn an_event_serializes_as_cloudevents_json() {
        let e = CloudEvent {
            specversion: SPEC_VERSION.into(),
            id: Uuid::nil(),
            source: "/v1/tenants/acme".into(),
            event_type: EventType::OperationSucceeded,
            subject: format!("operations/{}", Uuid::nil()),
            time: Utc::now(),
            datacontenttype: DATA_CONTENT_TYPE.into(),
            tenant: "acme".into(),
            kind: crate::Kind::named("vm"),
            zone: "zone-a".into(),
            resourceid: Uuid::nil(),
            operationid: None,
            generation: 1,
            requestid: None,
            cursor: Some("7".into()),
            data: serde_json::json!({}),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "operation.succeeded");
        assert_eq!(v["specversion"], "1.0");
        assert!(v.get("operationid").is_none());
        assert_eq!(serde_json::from_value::<CloudEvent>(v).unwrap(), e);
    }
}
