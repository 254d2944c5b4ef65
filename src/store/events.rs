//! The events outbox: one row per committed change of an operation or a resource,
//! written by the database's triggers (migration 0010) in the change's transaction, and
//! moved to the events stream by the relay.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// An event waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Commit order per resource.
    pub id: i64,
    /// The CloudEvent `id`.
    pub event_id: Uuid,
    /// The event type (`operation.succeeded`, …).
    #[sqlx(rename = "type")]
    pub event_type: String,
    /// Owner.
    pub tenant: String,
    /// Resource kind.
    pub kind: String,
    /// The kind's URL segment, while its type is registered.
    pub plural: Option<String>,
    /// Zone.
    pub zone: String,
    /// The resource concerned.
    pub resource_id: Uuid,
    /// The operation concerned, or whose transaction changed the resource.
    pub operation_id: Option<Uuid>,
    /// That operation's request ID.
    pub request_id: Option<String>,
    /// The changed row, as the change left it (`row`, or `state_row` for a row that
    /// stands for two events: migration 0020).
    pub row: Value,
    /// When the change committed.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// For an `operation.created` row of an operation inserted in a state other than
    /// `queued`: the ID of the `operation.<state>` event the row also stands for
    /// (migration 0020; see [`crate::events::cloud_events`]).
    pub state_event_id: Option<Uuid>,
}

/// Key of the transaction-scoped advisory lock held by the one relay that publishes
/// events at a time (so that each resource's events reach the stream in commit order).
const PUBLISHER_LOCK: i64 = 0x6576_656e_7473; // "events"

/// Claims up to `limit` of the oldest events for this transaction, if no other relay is
/// publishing events (else nothing: the events wait for that relay).
pub async fn claim(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<EventRow>> {
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PUBLISHER_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !ours {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "SELECT e.id, e.event_id, e.type, e.tenant, e.kind, t.plural, e.zone, e.resource_id,
                e.operation_id, e.request_id, COALESCE(e.row, e.state_row) AS row, e.created_at,
                e.state_event_id
         FROM event_outbox e LEFT JOIN resource_types t ON t.kind = e.kind
         ORDER BY e.id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes published events.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM event_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many events wait, and the age in seconds of the oldest.
pub async fn backlog(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM event_outbox",
    )
    .fetch_one(db)
    .await
}
