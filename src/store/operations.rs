//! Operations: one row per accepted write, driven through its states by reports.

use crate::domain::{Action, Kind, OperationState};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use std::sync::LazyLock;
use uuid::Uuid;

pub(super) const COLUMNS: &str =
    "id, seq, tenant, resource_id, kind, zone, action, state, attempt, \
    dispatches, input, target_generation, result, error, cancel_requested, idempotency_key, \
    request_fingerprint, requested_by, request_id, traceparent, created_at, updated_at, \
    started_at, finished_at, deadline";

/// An operation row.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct OperationRow {
    /// Its ID, returned to the client.
    pub id: Uuid,
    /// Submission order.
    pub seq: i64,
    /// Owner of the resource.
    pub tenant: String,
    /// The resource acted on.
    pub resource_id: Uuid,
    /// Its kind.
    #[sqlx(try_from = "String")]
    pub kind: Kind,
    /// Its zone.
    pub zone: String,
    /// What the operation does.
    #[sqlx(try_from = "String")]
    pub action: Action,
    /// Where it is.
    #[sqlx(try_from = "String")]
    pub state: OperationState,
    /// The latest attempt a worker started (0 before any).
    pub attempt: i32,
    /// How many outbox rows were written for it.
    pub dispatches: i32,
    /// Action arguments.
    pub input: Value,
    /// The resource generation it converges on.
    pub target_generation: i64,
    /// The worker's result, on success.
    pub result: Option<Value>,
    /// Why it failed.
    pub error: Option<Value>,
    /// A client asked to cancel it.
    pub cancel_requested: bool,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Hash of the request that used that key.
    pub request_fingerprint: Option<String>,
    /// The principal that submitted it.
    pub requested_by: Option<Uuid>,
    /// The request that submitted it.
    pub request_id: String,
    /// W3C trace context of that request.
    pub traceparent: Option<String>,
    /// Submission time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When a worker first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// After this the reconciler fails it.
    pub deadline: DateTime<Utc>,
}

/// An operation to insert.
#[derive(Debug, Clone)]
pub struct NewOperation<'a> {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: &'a str,
    /// Resource acted on.
    pub resource_id: Uuid,
    /// Its kind.
    pub kind: Kind,
    /// Its zone.
    pub zone: &'a str,
    /// What to do.
    pub action: Action,
    /// `queued`, or `pending` for one that runs at once (with its first message).
    pub state: OperationState,
    /// Messages written for it with it: 0 when `queued`, 1 when `pending`.
    pub dispatches: i32,
    /// Action arguments.
    pub input: &'a Value,
    /// Generation it converges on.
    pub target_generation: i64,
    /// Client's idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// Hash of the request.
    pub request_fingerprint: Option<&'a str>,
    /// Who submitted it; `None` for the reconciler's own operations.
    pub requested_by: Option<Uuid>,
    /// Request ID.
    pub request_id: &'a str,
    /// Trace context.
    pub traceparent: Option<&'a str>,
    /// Deadline.
    pub deadline: DateTime<Utc>,
}

/// Inserts an operation.
pub async fn insert(conn: &mut PgConnection, o: &NewOperation<'_>) -> sqlx::Result<OperationRow> {
    let mut rows = insert_many(conn, std::slice::from_ref(o)).await?;
    Ok(rows.pop().expect("one row inserted"))
}

/// Inserts operations in one statement, in the order given (their `seq` follows it);
/// returns their rows in that order.
pub async fn insert_many(
    conn: &mut PgConnection,
    os: &[NewOperation<'_>],
) -> sqlx::Result<Vec<OperationRow>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("{} RETURNING {COLUMNS}", insert_sql(1)));
    let mut rows: Vec<OperationRow> = bind_all(sqlx::query_as(&SQL), os).fetch_all(conn).await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// [`insert_many`] of operations made `pending` at once, with their first messages
/// (`messages`, in the order the relay is to publish them), in one statement.
pub async fn insert_many_dispatched(
    conn: &mut PgConnection,
    os: &[NewOperation<'_>],
    messages: &[super::outbox::NewMessage],
) -> sqlx::Result<Vec<OperationRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH m AS ({}) {} RETURNING {COLUMNS}",
            super::outbox::insert_sql(INSERT_PARAMS + 1),
            insert_sql(1)
        )
    });
    let query = bind_all(sqlx::query_as(&SQL), os);
    let mut rows: Vec<OperationRow> = super::outbox::bind_all(query, messages)
        .fetch_all(conn)
        .await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// The type of each column [`insert_sql`] inserts, in its order: one array parameter each.
const INSERT_TYPES: [&str; 16] = [
    "uuid",
    "text",
    "uuid",
    "text",
    "text",
    "text",
    "text",
    "jsonb",
    "bigint",
    "text",
    "text",
    "uuid",
    "text",
    "text",
    "timestamptz",
    "int",
];

/// The parameters of [`insert_sql`].
pub(super) const INSERT_PARAMS: usize = INSERT_TYPES.len();

/// The insert of operations from arrays bound from `$first` on ([`bind_all`]).
pub(super) fn insert_sql(first: usize) -> String {
    super::unnest_insert(
        "operations (id, tenant, resource_id, kind, zone, action, state, input, \
         target_generation, idempotency_key, request_fingerprint, requested_by, request_id, \
         traceparent, deadline, dispatches)",
        first,
        &INSERT_TYPES,
    )
}

/// Binds the column arrays of `os`, in [`insert_sql`]'s order.
pub(super) fn bind_all<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    os: &'q [NewOperation<'_>],
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let text =
        |f: for<'x> fn(&'x NewOperation<'_>) -> &'x str| os.iter().map(f).collect::<Vec<_>>();
    let maybe = |f: for<'x> fn(&'x NewOperation<'_>) -> Option<&'x str>| {
        os.iter().map(f).collect::<Vec<_>>()
    };
    query
        .bind(os.iter().map(|o| o.id).collect::<Vec<_>>())
        .bind(text(|o| o.tenant))
        .bind(os.iter().map(|o| o.resource_id).collect::<Vec<_>>())
        .bind(text(|o| o.kind.as_str()))
        .bind(text(|o| o.zone))
        .bind(text(|o| o.action.as_str()))
        .bind(text(|o| o.state.as_str()))
        .bind(os.iter().map(|o| o.input).collect::<Vec<_>>())
        .bind(os.iter().map(|o| o.target_generation).collect::<Vec<_>>())
        .bind(maybe(|o| o.idempotency_key))
        .bind(maybe(|o| o.request_fingerprint))
        .bind(os.iter().map(|o| o.requested_by).collect::<Vec<_>>())
        .bind(text(|o| o.request_id))
        .bind(maybe(|o| o.traceparent))
        .bind(os.iter().map(|o| o.deadline).collect::<Vec<_>>())
        .bind(os.iter().map(|o| o.dispatches).collect::<Vec<_>>())
}

/// One operation.
pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<OperationRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM operations WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Locks operation `id`'s resource, then the operation, in one statement, for the rest
/// of the transaction; answers the operation as it is under both locks (`None`: no such
/// operation). The sub-select in the `WHERE` clause locks the resource (waiting for it)
/// as the operation's row is read, before the row lock on the operation is taken above
/// it; if the operation changed meanwhile, PostgreSQL reads its newest version again
/// (under the resource's lock, which every change of an operation holds).
pub async fn lock_with_resource(
    conn: &mut PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<OperationRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM operations o
             WHERE o.id = $1
               AND EXISTS (SELECT 1 FROM resources r WHERE r.id = o.resource_id
                           FOR NO KEY UPDATE)
             FOR NO KEY UPDATE OF o"
        )
    });
    sqlx::query_as(&SQL).bind(id).fetch_optional(conn).await
}

/// Locks the operations `ids` (sorted, so concurrent callers queue in one order) for
/// the rest of the transaction; unknown IDs are left out.
pub async fn lock_many(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<OperationRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operations WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// The active (non-terminal) operations of a resource, oldest first.
pub async fn active_for_resource(
    conn: &mut PgConnection,
    resource_id: Uuid,
) -> sqlx::Result<Vec<OperationRow>> {
    active_for_resources(conn, &[resource_id]).await
}

/// The active (non-terminal) operations of several resources, each resource's oldest
/// first.
pub async fn active_for_resources(
    conn: &mut PgConnection,
    resource_ids: &[Uuid],
) -> sqlx::Result<Vec<OperationRow>> {
    sqlx::query_as(&ACTIVE_FOR_RESOURCES)
        .bind(resource_ids)
        .fetch_all(conn)
        .await
}

/// The query of [`active_for_resources`], the resources' IDs in `$1`; also the end of
/// the statement that records operations' ends on their resources
/// ([`super::resources::record_outcomes`]).
pub(super) static ACTIVE_FOR_RESOURCES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM operations
         WHERE resource_id = ANY($1) AND state IN ('queued', 'pending', 'dispatched', 'running')
         ORDER BY resource_id, seq"
    )
});

/// Marks an operation `pending` with one more dispatch that converges on `generation`;
/// returns it as it is now (`dispatches` is the dispatch number).
pub async fn set_pending(
    conn: &mut PgConnection,
    id: Uuid,
    generation: i64,
) -> sqlx::Result<OperationRow> {
    sqlx::query_as(&format!(
        "UPDATE operations SET state = 'pending', dispatches = dispatches + 1,
             target_generation = $2, updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(generation)
    .fetch_one(conn)
    .await
}

/// Operations by ID, in insertion order; those that do not exist are left out.
pub async fn get_many(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<Vec<OperationRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operations WHERE id = ANY($1) ORDER BY seq"
    ))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// The operations principals submitted under keys: `(principal, key)` pairs.
pub async fn find_by_idempotency_keys(
    conn: &mut PgConnection,
    keys: &[(Uuid, &str)],
) -> sqlx::Result<Vec<OperationRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operations WHERE (requested_by, idempotency_key) IN
             (SELECT * FROM UNNEST($1::uuid[], $2::text[]))"
    ))
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .fetch_all(conn)
    .await
}

/// The operation `principal` submitted under `key`, if any.
pub async fn find_by_idempotency_key(
    conn: &mut PgConnection,
    principal: Uuid,
    key: &str,
) -> sqlx::Result<Option<OperationRow>> {
    Ok(find_by_idempotency_keys(conn, &[(principal, key)])
        .await?
        .pop())
}

/// Records that a client asked to cancel an operation a worker may be running.
pub async fn request_cancel(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<OperationRow> {
    sqlx::query_as(&format!(
        "UPDATE operations SET cancel_requested = true, updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_one(conn)
    .await
}

/// A worker started `attempt`.
pub async fn start(conn: &mut PgConnection, id: Uuid, attempt: i32) -> sqlx::Result<OperationRow> {
    sqlx::query_as(&format!(
        "UPDATE operations SET state = 'running', attempt = $2,
             started_at = COALESCE(started_at, now()), updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(attempt)
    .fetch_one(conn)
    .await
}

/// Marks `pending` operations `dispatched`: a worker reporting on one holds its message,
/// so JetStream has it even if the relay has not recorded that yet. Others are left
/// alone.
pub async fn mark_dispatched(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE operations SET state = 'dispatched', updated_at = now()
         WHERE id = ANY($1) AND state = 'pending'",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Starts several operations in one statement: each `(id, attempt)` becomes `running`
/// in that attempt, as [`start`] does one. Answers nothing: the caller knows the rows.
pub async fn start_many(conn: &mut PgConnection, starts: &[(Uuid, i32)]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE operations o SET state = 'running', attempt = v.attempt,
             started_at = COALESCE(o.started_at, now()), updated_at = now()
         FROM UNNEST($1::uuid[], $2::int[]) AS v(id, attempt)
         WHERE o.id = v.id",
    )
    .bind(starts.iter().map(|s| s.0).collect::<Vec<_>>())
    .bind(starts.iter().map(|s| s.1).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// How an operation ends, for [`finish_many`].
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// The operation.
    pub id: Uuid,
    /// A terminal state.
    pub state: OperationState,
    /// The attempt that ended it.
    pub attempt: i32,
    /// Observed status, on success.
    pub result: Option<&'a Value>,
    /// Why it did not succeed.
    pub error: Option<&'a gateway_proto::OperationError>,
}

/// Ends an operation in a terminal `state`.
pub async fn finish(
    conn: &mut PgConnection,
    id: Uuid,
    state: OperationState,
    attempt: i32,
    result: Option<&Value>,
    error: Option<&gateway_proto::OperationError>,
) -> sqlx::Result<OperationRow> {
    let end = End {
        id,
        state,
        attempt,
        result,
        error,
    };
    let mut ended = finish_many(conn, &[end]).await?;
    ended.pop().ok_or(sqlx::Error::RowNotFound)
}

/// Ends several operations in one statement; answers their rows in the order given.
pub async fn finish_many(
    conn: &mut PgConnection,
    ends: &[End<'_>],
) -> sqlx::Result<Vec<OperationRow>> {
    debug_assert!(ends.iter().all(|e| e.state.is_terminal()));
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let columns = COLUMNS
            .split(',')
            .map(|c| format!("o.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "UPDATE operations o SET state = v.state, attempt = v.attempt, result = v.result,
                 error = v.error, finished_at = now(), updated_at = now()
             FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::jsonb[], $5::jsonb[])
                 AS v(id, state, attempt, result, error)
             WHERE o.id = v.id RETURNING {columns}"
        )
    });
    let errors: Vec<Option<Value>> = ends
        .iter()
        .map(|e| {
            e.error
                .map(|e| serde_json::to_value(e).expect("errors serialize"))
        })
        .collect();
    let mut rows: Vec<OperationRow> = sqlx::query_as(&SQL)
        .bind(ends.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(ends.iter().map(|e| e.state.as_str()).collect::<Vec<_>>())
        .bind(ends.iter().map(|e| e.attempt).collect::<Vec<_>>())
        .bind(ends.iter().map(|e| e.result).collect::<Vec<_>>())
        .bind(errors)
        .fetch_all(conn)
        .await?;
    let order: std::collections::HashMap<Uuid, usize> =
        ends.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
    rows.sort_by_key(|r| order.get(&r.id).copied());
    Ok(rows)
}

/// Filters of a tenant's operation list.
#[derive(Debug, Clone, Default)]
pub struct OperationFilter {
    /// Only this state.
    pub state: Option<OperationState>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only operations on this resource.
    pub resource_id: Option<Uuid>,
    /// Only operations submitted at or after this instant.
    pub since: Option<DateTime<Utc>>,
}

/// One page of a tenant's operations, newest first, strictly before `before_seq`.
pub async fn list_for_tenant(
    db: impl PgExecutor<'_>,
    tenant: &str,
    filter: &OperationFilter,
    before_seq: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<OperationRow>> {
    let mut q = super::Filtered::new(format!("SELECT {COLUMNS} FROM operations"));
    q.is("tenant = ", tenant)
        .and("state = ", filter.state.map(OperationState::as_str))
        .and("kind = ", filter.kind.as_ref().map(Kind::as_str))
        .and("zone = ", filter.zone.as_deref())
        .and("resource_id = ", filter.resource_id)
        .and("created_at >= ", filter.since)
        .and("seq < ", before_seq);
    q.page(db, "seq DESC", limit).await
}

/// IDs of active operations past their deadline, oldest deadline first. Not locked:
/// the caller locks each with its resource, in the usual order, and checks again.
pub async fn overdue_ids(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM operations
         WHERE state IN ('queued', 'pending', 'dispatched', 'running') AND deadline < now()
         ORDER BY deadline LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

/// An active operation that has been quiet, as the reconciler's sweeper sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QuietOperation {
    /// The operation.
    pub id: Uuid,
    /// `dispatched` or `running`.
    #[sqlx(try_from = "String")]
    pub state: OperationState,
    /// Outbox rows written for it; its current message ID is `{id}.{dispatches}`.
    pub dispatches: i32,
    /// Where JetStream stored its current message, if the relay recorded it.
    pub stream_seq: Option<i64>,
    /// Its last change: the sweeper acts only if nothing changed since it looked.
    pub updated_at: DateTime<Utc>,
}

/// Dispatched or running operations with no change for `quiet_secs` and no message
/// waiting in the outbox, in `(updated_at, id)` order after `after` (from the oldest when
/// `None`): a caller that pages through them reaches every one even when the oldest stay
/// quiet. Not locked: the caller locks each with its resource, in the usual order, and
/// checks again.
pub async fn quiet_active(
    db: impl PgExecutor<'_>,
    quiet_secs: f64,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<QuietOperation>> {
    sqlx::query_as(
        "SELECT id, state, dispatches, stream_seq, updated_at FROM operations o
         WHERE state IN ('dispatched', 'running')
           AND updated_at < now() - make_interval(secs => $1)
           AND ($2::timestamptz IS NULL OR (updated_at, id) > ($2, $3))
           AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.operation_id = o.id)
         ORDER BY updated_at, id LIMIT $4",
    )
    .bind(quiet_secs)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The operations whose current message JetStream stored at `stream_seq`, newest first,
/// as `(id, state, dispatches)`. More than one only if the stream was re-created.
pub async fn by_stream_seq(
    db: impl PgExecutor<'_>,
    stream_seq: i64,
) -> sqlx::Result<Vec<(Uuid, String, i32)>> {
    sqlx::query_as(
        "SELECT id, state, dispatches FROM operations WHERE stream_seq = $1
         ORDER BY seq DESC LIMIT 10",
    )
    .bind(stream_seq)
    .fetch_all(db)
    .await
}

/// Forgets the delivery of an operation about to be dispatched again: the new message's
/// deliveries count from 1 (a worker reports them as attempts 1, 2, …), and the old
/// message's stream sequence no longer names this operation.
pub async fn forget_delivery(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE operations SET attempt = 0, stream_seq = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Live resources whose `generation` is ahead of `observed_generation` with no active
/// operation and no finished attempt at their current generation: a cancelled update,
/// say, left the desired spec unapplied. A failed attempt is not retried by itself.
/// Not locked: the caller locks each resource and asks [`needs_converge`] again.
pub async fn unconverged_resource_ids(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT r.id FROM resources r
         WHERE r.generation > r.observed_generation AND r.deleted_at IS NULL
           AND NOT EXISTS (
               SELECT 1 FROM operations o WHERE o.resource_id = r.id
                 AND (o.state IN ('queued', 'pending', 'dispatched', 'running')
                      OR (o.state IN ('succeeded', 'failed')
                          AND o.target_generation >= r.generation)))
         ORDER BY r.updated_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Whether the (locked) resource still needs a converging operation; see
/// [`unconverged_resource_ids`].
pub async fn needs_converge(conn: &mut PgConnection, resource_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM resources r
             WHERE r.id = $1 AND r.generation > r.observed_generation
               AND r.deleted_at IS NULL
               AND NOT EXISTS (
                   SELECT 1 FROM operations o WHERE o.resource_id = r.id
                     AND (o.state IN ('queued', 'pending', 'dispatched', 'running')
                          OR (o.state IN ('succeeded', 'failed')
                              AND o.target_generation >= r.generation))))",
    )
    .bind(resource_id)
    .fetch_one(conn)
    .await
}

/// How many operations are in each non-terminal state (served by the partial index on
/// active operations, so it stays cheap however large the history grows).
pub async fn count_active_by_state(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT state, count(*) FROM operations
         WHERE state IN ('queued', 'pending', 'dispatched', 'running')
         GROUP BY state",
    )
    .fetch_all(db)
    .await
}

/// Clears the idempotency keys of up to `limit` operations submitted before `before`,
/// oldest first: the key may be used again, and the operation stays as it is. Returns
/// how many were cleared.
pub async fn expire_idempotency_keys(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "UPDATE operations SET idempotency_key = NULL, request_fingerprint = NULL
         WHERE id IN (SELECT id FROM operations
                      WHERE idempotency_key IS NOT NULL AND created_at < $1
                      ORDER BY created_at LIMIT $2)",
    )
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}
