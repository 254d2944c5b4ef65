//! Events: every committed state change, told to the world.
//!
//! The database records an event in the transaction of each change (triggers of
//! migration 0010 write `event_outbox` rows: no change without its event, no event
//! without its change). The relay turns each row into a CloudEvent ([`cloud_event`]) and
//! publishes it ([`publish`]) to the events stream, where the watch API, webhooks and
//! internal consumers read it.

pub mod publish;

use crate::store::events::EventRow;
use crate::store::operations::OperationRow;
use crate::store::resources::ResourceRow;
use crate::views::{OperationOut, ResourceOut};
use gateway_proto::events::{CloudEvent, EventType, DATA_CONTENT_TYPE, SPEC_VERSION};
use gateway_proto::Kind;

/// Why an event row could not become a CloudEvent (a row written by a newer schema, or
/// corrupted by hand). Such a row is skipped and logged, never retried forever.
#[derive(Debug, thiserror::Error)]
pub enum MalformedEvent {
    /// Unknown type or kind.
    #[error(transparent)]
    Unknown(#[from] gateway_proto::UnknownValue),
    /// The row snapshot does not parse.
    #[error("row snapshot: {0}")]
    Row(#[from] serde_json::Error),
}

/// The CloudEvents an event row stands for, in the order they are published, each with
/// the subject it is published on (`{prefix}.{tenant}.{kind}.{zone}`): one, or two for
/// the `operation.created` row of an operation inserted in a state other than `queued`
/// (migration 0020). That row carries the operation as inserted; its first event,
/// `operation.created`, carries it as it was created (`queued`, no message yet), and the
/// second, `operation.<state>` with the ID [`EventRow::state_event_id`], as inserted —
/// the two events the trigger wrote as two rows before.
pub fn cloud_events(
    row: &EventRow,
    prefix: &str,
) -> Result<Vec<(String, CloudEvent)>, MalformedEvent> {
    let event_type: EventType = row.event_type.parse()?;
    let second = row
        .state_event_id
        .filter(|_| event_type == EventType::OperationCreated);
    let Some(second_id) = second else {
        let only = cloud_event(row, prefix, event_type, row.event_id, row.row.clone())?;
        return Ok(vec![only]);
    };
    let state = row
        .row
        .get("state")
        .and_then(|s| s.as_str())
        .unwrap_or_default();
    let state_type: EventType = format!("operation.{state}").parse()?;
    let mut created = row.row.clone();
    if let Some(fields) = created.as_object_mut() {
        fields.insert("state".into(), "queued".into());
        fields.insert("dispatches".into(), 0.into());
    }
    Ok(vec![
        cloud_event(row, prefix, event_type, row.event_id, created)?,
        cloud_event(row, prefix, state_type, second_id, row.row.clone())?,
    ])
}

/// The CloudEvent `id` of type `event_type` that `row` stands for, carrying `snapshot`
/// (the changed row), and its subject.
fn cloud_event(
    row: &EventRow,
    prefix: &str,
    event_type: EventType,
    id: uuid::Uuid,
    snapshot: serde_json::Value,
) -> Result<(String, CloudEvent), MalformedEvent> {
    let kind: Kind = row.kind.parse()?;
    let (subject, data, generation) = if event_type.is_operation() {
        let op: OperationRow = serde_json::from_value(snapshot)?;
        let generation = op.target_generation;
        let data = serde_json::to_value(OperationOut::from(op))?;
        let id = row.operation_id.unwrap_or(row.resource_id);
        (format!("operations/{id}"), data, generation)
    } else {
        let r: ResourceRow = serde_json::from_value(snapshot)?;
        let generation = r.generation;
        let data = serde_json::to_value(ResourceOut::from(r))?;
        // The resource's path under the tenant, as the API has it.
        let path = row.plural.as_deref().unwrap_or("resources");
        (format!("{path}/{}", row.resource_id), data, generation)
    };
    let event = CloudEvent {
        specversion: SPEC_VERSION.into(),
        id,
        source: format!("/v1/tenants/{}", row.tenant),
        event_type,
        subject,
        time: row.created_at,
        datacontenttype: DATA_CONTENT_TYPE.into(),
        tenant: row.tenant.clone(),
        kind: kind.clone(),
        zone: row.zone.clone(),
        resourceid: row.resource_id,
        operationid: row.operation_id,
        generation,
        requestid: row.request_id.clone(),
        cursor: None,
        data,
    };
    let nats_subject = gateway_proto::events::event_subject(prefix, &row.tenant, &kind, &row.zone);
    Ok((nats_subject, event))
}
