//! Writing an operation's dispatch message to the outbox.

use super::txn::Txn;
use crate::domain::Action;
use crate::domain::Kind;
use crate::store::operations::{self, NewOperation, OperationRow};
use crate::store::outbox;
use crate::store::resources::{NewResource, ResourceRow};
use chrono::{DateTime, Utc};
use gateway_proto::{Dispatch, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use serde_json::json;
use serde_json::Value;
use std::collections::HashSet;
use uuid::Uuid;

/// Makes `op` pending and writes its message, in the caller's transaction (whose commit
/// rings the relay); returns the operation as it is now.
///
/// The message carries the resource's spec as it is now, at its current generation:
/// a worker always converges on the latest desired state. Every dispatch gets its own
/// `Nats-Msg-Id` (`{operation}.{n}`), so a re-publish of the same row is deduplicated
/// by JetStream while a deliberate re-dispatch is not.
pub async fn enqueue(
    txn: &mut Txn<'_>,
    op: &OperationRow,
    resource: &ResourceRow,
) -> sqlx::Result<OperationRow> {
    let pending = operations::set_pending(txn, op.id, resource.generation).await?;
    write_messages(txn, &[(&pending, resource)]).await?;
    Ok(pending)
}

/// What an operation and its dispatch message take from their resource: the row as it
/// is, or as a create is about to insert it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: &'a str,
    /// Kind.
    pub kind: &'a Kind,
    /// Zone.
    pub zone: &'a str,
    /// Name.
    pub name: &'a str,
    /// The generation the operation converges on.
    pub generation: i64,
    /// The desired state at that generation.
    pub spec: &'a Value,
}

impl<'a> From<&'a ResourceRow> for Target<'a> {
    fn from(r: &'a ResourceRow) -> Self {
        Self {
            id: r.id,
            tenant: &r.tenant,
            kind: &r.kind,
            zone: &r.zone,
            name: &r.name,
            generation: r.generation,
            spec: &r.spec,
        }
    }
}

impl<'a> From<&'a NewResource<'a>> for Target<'a> {
    /// A new resource is inserted at generation 1.
    fn from(r: &'a NewResource<'a>) -> Self {
        Self {
            id: r.id,
            tenant: r.tenant,
            kind: &r.kind,
            zone: r.zone,
            name: r.name,
            generation: 1,
            spec: r.spec,
        }
    }
}

/// Writes the current message of each operation (already `pending`, with its
/// `dispatches` counting this message) on its resource, in one statement.
pub async fn write_messages(
    txn: &mut Txn<'_>,
    ops: &[(&OperationRow, &ResourceRow)],
) -> sqlx::Result<()> {
    let messages = ops
        .iter()
        .map(|(op, resource)| message(txn.engine(), About::from(*op), (*resource).into()))
        .collect::<sqlx::Result<Vec<_>>>()?;
    txn.dispatching();
    outbox::insert_many(txn, &messages).await
}

/// Inserts new operations that run at once (`pending`, their first message counted),
/// each on the resource at the same place in `resources`, with their messages, in one
/// statement; returns their rows in submission order.
pub async fn insert_dispatched(
    txn: &mut Txn<'_>,
    ops: &[NewOperation<'_>],
    resources: &[Target<'_>],
) -> sqlx::Result<Vec<OperationRow>> {
    let messages = first_messages(txn.engine(), ops, resources)?;
    txn.dispatching();
    operations::insert_many_dispatched(txn, ops, &messages).await
}

/// The first messages of new operations that run at once, each on the resource at the
/// same place in `resources`, for the caller to insert with them.
pub fn first_messages(
    engine: &super::Engine,
    ops: &[NewOperation<'_>],
    resources: &[Target<'_>],
) -> sqlx::Result<Vec<outbox::NewMessage>> {
    ops.iter()
        .zip(resources)
        .map(|(op, resource)| message(engine, About::from(op), *resource))
        .collect()
}

/// What a dispatch message says of its operation.
struct About<'a> {
    id: Uuid,
    tenant: &'a str,
    zone: &'a str,
    action: &'a Action,
    input: &'a Value,
    deadline: DateTime<Utc>,
    request_id: &'a str,
    traceparent: Option<&'a str>,
    /// The message's number: its `Nats-Msg-Id` is `{id}.{dispatches}`.
    dispatches: i32,
}

impl<'a> From<&'a OperationRow> for About<'a> {
    fn from(op: &'a OperationRow) -> Self {
        Self {
            id: op.id,
            tenant: &op.tenant,
            zone: &op.zone,
            action: &op.action,
            input: &op.input,
            deadline: op.deadline,
            request_id: &op.request_id,
            traceparent: op.traceparent.as_deref(),
            dispatches: op.dispatches,
        }
    }
}

impl<'a> From<&'a NewOperation<'a>> for About<'a> {
    fn from(op: &'a NewOperation<'a>) -> Self {
        Self {
            id: op.id,
            tenant: op.tenant,
            zone: op.zone,
            action: &op.action,
            input: op.input,
            deadline: op.deadline,
            request_id: op.request_id,
            traceparent: op.traceparent,
            dispatches: op.dispatches,
        }
    }
}

/// The dispatch message of operation `op` (just made pending) on `resource`.
fn message(
    engine: &super::Engine,
    op: About<'_>,
    resource: Target<'_>,
) -> sqlx::Result<outbox::NewMessage> {
    let service = engine
        .types
        .snapshot()
        .service_of(resource.kind)
        .cloned()
        .ok_or_else(|| {
            sqlx::Error::Protocol(format!("no resource type {} is registered", resource.kind))
        })?;
    let subject = gateway_proto::ops_subject(&engine.names.subject_prefix, &service, op.zone);
    let payload = Dispatch {
        operation_id: op.id,
        tenant: op.tenant.to_owned(),
        resource_id: resource.id,
        kind: resource.kind.clone(),
        zone: resource.zone.to_owned(),
        name: resource.name.to_owned(),
        action: op.action.clone(),
        generation: resource.generation,
        spec: resource.spec.clone(),
        input: op.input.clone(),
        deadline: op.deadline,
    };
    let mut headers = json!({ REQUEST_ID_HEADER: op.request_id });
    if let Some(tp) = op.traceparent {
        headers[TRACEPARENT_HEADER] = json!(tp);
    }
    Ok(outbox::NewMessage {
        operation_id: Some(op.id),
        subject,
        msg_id: format!("{}.{}", op.id, op.dispatches),
        headers,
        payload: serde_json::to_value(&payload).expect("dispatch serializes"),
    })
}

/// In the relay's transaction, after it published `rows`: records them
/// ([`outbox::record_published`]) and answers the operations whose resources another
/// transaction holds (a request or a report in flight: often the worker's report on
/// this very message). Their messages stay in the outbox, with the sequence JetStream
/// gave them, for a later pass to record; the others' dispatches are recorded now.
///
/// The relay never waits for a row lock (`SKIP LOCKED`), so it is never part of a
/// deadlock, and holds no resource's lock while it waits for JetStream. The resource
/// lock keeps each resource's events in commit order.
pub async fn record_published(
    conn: &mut sqlx::PgConnection,
    rows: &[outbox::Acked],
) -> sqlx::Result<HashSet<Uuid>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(outbox::record_published(conn, rows)
        .await?
        .into_iter()
        .collect())
}
