//! Writing an operation's dispatch message to the outbox.

use crate::config::NatsNames;
use crate::store::{operations, operations::OperationRow, outbox, resources::ResourceRow};
use gateway_proto::{Dispatch, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use serde_json::json;
use sqlx::PgConnection;

/// Makes `op` pending and writes its message, in the caller's transaction.
///
/// The message carries the resource's spec as it is now, at its current generation:
/// a worker always converges on the latest desired state. Every dispatch gets its own
/// `Nats-Msg-Id` (`{operation}.{n}`), so a re-publish of the same row is deduplicated
/// by JetStream while a deliberate re-dispatch is not.
pub async fn enqueue(
    conn: &mut PgConnection,
    names: &NatsNames,
    op: &OperationRow,
    resource: &ResourceRow,
) -> sqlx::Result<()> {
    let n = operations::set_pending(conn, op.id, resource.generation).await?;
    let payload = Dispatch {
        operation_id: op.id,
        tenant: op.tenant.clone(),
        resource_id: resource.id,
        kind: resource.kind,
        zone: resource.zone.clone(),
        name: resource.name.clone(),
        action: op.action,
        generation: resource.generation,
        spec: resource.spec.clone(),
        input: op.input.clone(),
        deadline: op.deadline,
    };
    let mut headers = json!({ REQUEST_ID_HEADER: op.request_id });
    if let Some(tp) = &op.traceparent {
        headers[TRACEPARENT_HEADER] = json!(tp);
    }
    let subject = gateway_proto::ops_subject(&names.subject_prefix, op.kind.service(), &op.zone);
    outbox::insert(
        conn,
        &outbox::NewMessage {
            operation_id: Some(op.id),
            subject: &subject,
            msg_id: &format!("{}.{n}", op.id),
            headers: &headers,
            payload: &serde_json::to_value(&payload).expect("dispatch serializes"),
        },
    )
    .await
}
