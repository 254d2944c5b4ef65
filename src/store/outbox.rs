//! The transactional outbox: messages written with the state change that caused them,
//! and moved to JetStream by the relay.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use std::sync::LazyLock;
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
    /// The message body: its JSON as PostgreSQL writes `jsonb` out, published as it is
    /// (decoding it only to encode it again cost the relay a few microseconds a row).
    pub payload: String,
    /// When it was written (its insert, in the transaction of the change that caused
    /// it: migration 0017).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The stream sequence JetStream acknowledged it at, when an earlier pass published
    /// it but could not record it (its resource was in use): it is not published again.
    pub published_seq: Option<i64>,
}

/// A message to write.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The operation it dispatches.
    pub operation_id: Option<Uuid>,
    /// Subject.
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// Headers, a JSON object of strings.
    pub headers: Value,
    /// Body.
    pub payload: Value,
}

/// Writes a message in the caller's transaction.
pub async fn insert(conn: &mut PgConnection, m: &NewMessage) -> sqlx::Result<()> {
    insert_many(conn, std::slice::from_ref(m)).await
}

/// Writes messages in the caller's transaction, in one statement, in the order given
/// (the relay publishes in that order).
pub async fn insert_many(conn: &mut PgConnection, ms: &[NewMessage]) -> sqlx::Result<()> {
    static SQL: LazyLock<String> = LazyLock::new(|| insert_sql(1));
    // No rows come back: the row type is never decoded.
    let _: Vec<(i64,)> = bind_all(sqlx::query_as(&SQL), ms).fetch_all(conn).await?;
    Ok(())
}

/// The type of each column [`insert_sql`] inserts, in its order: one array parameter each.
const INSERT_TYPES: [&str; 5] = ["uuid", "text", "text", "jsonb", "jsonb"];

/// The parameters of [`insert_sql`].
pub(super) const INSERT_PARAMS: usize = INSERT_TYPES.len();

/// The insert of messages from arrays bound from `$first` on ([`bind_all`]).
pub(super) fn insert_sql(first: usize) -> String {
    super::unnest_insert(
        "outbox (operation_id, subject, msg_id, headers, payload)",
        first,
        &INSERT_TYPES,
    )
}

/// Binds the column arrays of `ms`, in [`insert_sql`]'s order.
pub(super) fn bind_all<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ms: &'q [NewMessage],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let col = |f: fn(&NewMessage) -> &Value| ms.iter().map(f).collect::<Vec<_>>();
    query
        .bind(ms.iter().map(|m| m.operation_id).collect::<Vec<_>>())
        .bind(ms.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>())
        .bind(ms.iter().map(|m| m.msg_id.as_str()).collect::<Vec<_>>())
        .bind(col(|m| &m.headers))
        .bind(col(|m| &m.payload))
}

/// Claims up to `limit` of the oldest messages; other relays skip them until the
/// transaction ends.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(
        "SELECT id, operation_id, subject, msg_id, headers, payload::text AS payload, created_at,
             published_seq
         FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
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

/// An outbox row JetStream acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// The row.
    pub id: i64,
    /// The operation it dispatches, if any.
    pub operation: Option<Uuid>,
    /// Its dispatch number (`n` of its `{operation}.{n}` message ID).
    pub dispatch: Option<i32>,
    /// The stream sequence JetStream stored it at.
    pub seq: u64,
    /// Whether the row kept that sequence already (an earlier pass published it).
    pub kept: bool,
}

/// Records, in the relay's transaction and in one statement, what it published
/// (`rows`); answers the operations whose resources another transaction holds.
///
/// First the resources of the rows' operations are locked without waiting (`SKIP
/// LOCKED`), as every change locks them before its operation. A row whose resource is
/// held stays in the outbox, keeping the sequence JetStream gave it, for a later pass
/// to record without publishing it again; the other rows are deleted, and their
/// operations get the sequence of their current dispatch and, if `pending`, become
/// `dispatched`. A row naming no operation (or one that no longer exists) is deleted.
pub async fn record_published(conn: &mut PgConnection, rows: &[Acked]) -> sqlx::Result<Vec<Uuid>> {
    // One entry per operation, its latest dispatch in the batch (an `UPDATE … FROM` with
    // two rows for one operation would pick either).
    let mut latest: std::collections::BTreeMap<Uuid, (i32, i64)> = Default::default();
    for row in rows {
        let Some(op) = row.operation else { continue };
        let entry = (row.dispatch.unwrap_or(-1), seq(row.seq));
        let slot = latest.entry(op).or_insert(entry);
        if entry.0 > slot.0 {
            *slot = entry;
        }
    }
    sqlx::query_scalar(
        "WITH v AS MATERIALIZED (
             SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::bigint[], $4::bool[])
                 AS v(id, op, seq, kept)
         ),
         held AS MATERIALIZED (
             SELECT o.id FROM operations o
             WHERE o.id IN (SELECT op FROM v WHERE op IS NOT NULL)
               AND (SELECT r.id FROM resources r WHERE r.id = o.resource_id
                    FOR NO KEY UPDATE SKIP LOCKED) IS NULL
         ),
         gone AS (
             DELETE FROM outbox WHERE id IN
                 (SELECT id FROM v WHERE op IS NULL OR op NOT IN (SELECT id FROM held))
         ),
         kept AS (
             UPDATE outbox x SET published_seq = v.seq FROM v
             WHERE x.id = v.id AND NOT v.kept AND v.op IN (SELECT id FROM held)
         ),
         dispatched AS (
             UPDATE operations o SET
                 stream_seq = CASE WHEN o.dispatches = u.n THEN u.seq ELSE o.stream_seq END,
                 state = CASE WHEN o.state = 'pending' THEN 'dispatched' ELSE o.state END,
                 updated_at = CASE WHEN o.state = 'pending' THEN now() ELSE o.updated_at END
             FROM unnest($5::uuid[], $6::int[], $7::bigint[]) AS u(id, n, seq)
             WHERE o.id = u.id AND u.id NOT IN (SELECT id FROM held)
               AND (o.dispatches = u.n OR o.state = 'pending')
         )
         SELECT id FROM held",
    )
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.operation).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| seq(r.seq)).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.kept).collect::<Vec<_>>())
    .bind(latest.keys().copied().collect::<Vec<_>>())
    .bind(latest.values().map(|v| v.0).collect::<Vec<_>>())
    .bind(latest.values().map(|v| v.1).collect::<Vec<_>>())
    .fetch_all(conn)
    .await
}

/// A stream sequence as the database stores it.
fn seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}
