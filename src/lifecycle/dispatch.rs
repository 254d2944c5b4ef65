//! Writing an operation's dispatch message to the outbox.

use super::txn::Txn;
use crate::store::{
    operations, operations::OperationRow, outbox, resources, resources::ResourceRow,
};
use gateway_proto::{Dispatch, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use serde_json::json;

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

/// Writes the current message of each operation (already `pending`, with its
/// `dispatches` counting this message) on its resource, in one statement.
pub async fn write_messages(
    txn: &mut Txn<'_>,
    ops: &[(&OperationRow, &ResourceRow)],
) -> sqlx::Result<()> {
    let messages = ops
        .iter()
        .map(|(op, resource)| message(txn.engine(), op, resource))
        .collect::<sqlx::Result<Vec<_>>>()?;
    outbox::insert_many(txn, &messages).await
}

/// The dispatch message of `op` (just made pending) on `resource`.
fn message(
    engine: &super::Engine,
    op: &OperationRow,
    resource: &ResourceRow,
) -> sqlx::Result<outbox::NewMessage> {
    let service = engine
        .types
        .snapshot()
        .service_of(&resource.kind)
        .cloned()
        .ok_or_else(|| {
            sqlx::Error::Protocol(format!("no resource type {} is registered", resource.kind))
        })?;
    let subject = gateway_proto::ops_subject(&engine.names.subject_prefix, &service, &op.zone);
    let payload = Dispatch {
        operation_id: op.id,
        tenant: op.tenant.clone(),
        resource_id: resource.id,
        kind: resource.kind.clone(),
        zone: resource.zone.clone(),
        name: resource.name.clone(),
        action: op.action.clone(),
        generation: resource.generation,
        spec: resource.spec.clone(),
        input: op.input.clone(),
        deadline: op.deadline,
    };
    let mut headers = json!({ REQUEST_ID_HEADER: op.request_id });
    if let Some(tp) = &op.traceparent {
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

/// Records what the relay published, in its transaction: the outbox rows JetStream
/// acknowledged are deleted (with the stream sequence each message got, as
/// `(row, operation, dispatch number, sequence)`), and their operations become
/// `dispatched`.
///
/// The operations' resources are locked first, as every change locks them: that keeps
/// the relay free of deadlocks with reports, and each resource's events in commit order.
pub async fn published(
    conn: &mut sqlx::PgConnection,
    rows: &[outbox::Published],
) -> sqlx::Result<()> {
    let ids: Vec<uuid::Uuid> = rows.iter().filter_map(|r| r.1).collect();
    if !ids.is_empty() {
        resources::lock_of_operations(conn, &ids).await?;
    }
    outbox::delete_published(conn, rows).await?;
    Ok(())
}
