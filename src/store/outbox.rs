//! The transactional outbox: messages written with the state change that caused them,
//! and moved to JetStream by the relay.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A message waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// Insertion order.
    pub id: i64,
    /// The operation it dispatches, if any.
    pub operation_id: Option<Uuid>,
    /// JetStream subject.
    pub subject: String,
    /// `Nats-Msg-Id`, fixed at insert so a re-publish is deduplicated.
    pub msg_id: String,
    /// Extra headers (request ID, trace context), as a JSON object of strings.
    pub headers: Value,
    /// The message body.
    pub payload: Value,
}

/// A message to write.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// The operation it dispatches.
    pub operation_id: Option<Uuid>,
    /// Subject.
    pub subject: &'a str,
    /// `Nats-Msg-Id`.
    pub msg_id: &'a str,
    /// Headers, a JSON object of strings.
    pub headers: &'a Value,
    /// Body.
    pub payload: &'a Value,
}

/// Writes a message in the caller's transaction.
pub async fn insert(conn: &mut PgConnection, m: &NewMessage<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (operation_id, subject, msg_id, headers, payload)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(m.operation_id)
    .bind(m.subject)
    .bind(m.msg_id)
    .bind(m.headers)
    .bind(m.payload)
    .execute(conn)
    .await?;
    Ok(())
}

/// Claims up to `limit` of the oldest messages; other relays skip them until the
/// transaction ends.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(
        "SELECT id, operation_id, subject, msg_id, headers, payload FROM outbox
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes published messages.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many messages wait, and the age in seconds of the oldest.
pub async fn backlog(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM outbox",
    )
    .fetch_one(db)
    .await
}
