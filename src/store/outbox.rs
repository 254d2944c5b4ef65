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

/// The parameters of [`insert_sql`].
pub(super) const INSERT_PARAMS: usize = 5;

/// The insert of messages from arrays bound from `$first` on ([`bind_all`]).
pub(super) fn insert_sql(first: usize) -> String {
    let n = |i: usize| first + i;
    format!(
        "INSERT INTO outbox (operation_id, subject, msg_id, headers, payload)
         SELECT * FROM UNNEST(${}::uuid[], ${}::text[], ${}::text[], ${}::jsonb[], ${}::jsonb[])",
        n(0),
        n(1),
        n(2),
        n(3),
        n(4)
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

/// Deletes published messages.
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Keeps, on messages JetStream acknowledged but whose dispatch could not be recorded
/// yet, the stream sequence each got (`(outbox id, sequence)`), so a later pass records
/// them without publishing them again.
pub async fn keep_published(conn: &mut PgConnection, rows: &[(i64, u64)]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE outbox o SET published_seq = v.seq
         FROM UNNEST($1::bigint[], $2::bigint[]) AS v(id, seq) WHERE o.id = v.id",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| i64::try_from(r.1).unwrap_or(i64::MAX))
            .collect::<Vec<_>>(),
    )
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

/// A published outbox row: `(outbox id, operation, dispatch number, stream sequence)`.
pub type Published = (i64, Option<Uuid>, Option<i32>, u64);

/// Deletes published messages and, in one statement for the whole batch, records what
/// they did to their operations: a `pending` operation becomes `dispatched`, and one
/// whose current dispatch (`n` of its `{operation}.{n}` message ID) was among them gets
/// the stream sequence JetStream stored it at. `published` holds `(outbox id,
/// operation, dispatch, stream sequence)`; rows without an operation carry `None`.
pub async fn delete_published(
    conn: &mut PgConnection,
    published: &[Published],
) -> sqlx::Result<()> {
    let ids: Vec<i64> = published.iter().map(|p| p.0).collect();
    delete(conn, &ids).await?;
    // One entry per operation, its latest dispatch in the batch (an `UPDATE … FROM` with
    // two rows for one operation would pick either).
    let mut latest: std::collections::BTreeMap<Uuid, (i32, i64)> = Default::default();
    for (_, op, n, seq) in published {
        let Some(op) = op else { continue };
        let entry = (n.unwrap_or(-1), i64::try_from(*seq).unwrap_or(i64::MAX));
        let slot = latest.entry(*op).or_insert(entry);
        if entry.0 > slot.0 {
            *slot = entry;
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let ops: Vec<Uuid> = latest.keys().copied().collect();
    let dispatches: Vec<i32> = latest.values().map(|v| v.0).collect();
    let seqs: Vec<i64> = latest.values().map(|v| v.1).collect();
    sqlx::query(
        "UPDATE operations o SET
             stream_seq = CASE WHEN o.dispatches = v.n THEN v.seq ELSE o.stream_seq END,
             state = CASE WHEN o.state = 'pending' THEN 'dispatched' ELSE o.state END,
             updated_at = CASE WHEN o.state = 'pending' THEN now() ELSE o.updated_at END
         FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS v(id, n, seq)
         WHERE o.id = v.id AND (o.dispatches = v.n OR o.state = 'pending')",
    )
    .bind(&ops)
    .bind(&dispatches)
    .bind(&seqs)
    .execute(conn)
    .await?;
    Ok(())
}
