//! Webhook endpoints, their deliveries and the attempts of each.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use std::time::Duration;
use uuid::Uuid;

const COLUMNS: &str = "id, tenant, url, types, description, secret, previous_secret, \
    previous_secret_expires_at, failure_streak, disabled_at, disabled_reason, created_at, updated_at";

/// An endpoint.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookRow {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: String,
    /// Where deliveries go.
    pub url: String,
    /// Event types it wants (empty: all).
    pub types: Vec<String>,
    /// Free text.
    pub description: String,
    /// The signing secret as stored (sealed when `WEBHOOK_SECRET_KEY` is set).
    pub secret: String,
    /// The secret before the last rotation.
    pub previous_secret: Option<String>,
    /// Until when the previous secret still signs.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Failed attempts in a row.
    pub failure_streak: i32,
    /// When it was disabled.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Why.
    pub disabled_reason: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// An endpoint to insert.
#[derive(Debug, Clone)]
pub struct NewWebhook<'a> {
    /// Its ID.
    pub id: Uuid,
    /// Owner.
    pub tenant: &'a str,
    /// URL.
    pub url: &'a str,
    /// Event types.
    pub types: &'a [String],
    /// Free text.
    pub description: &'a str,
    /// Signing secret.
    pub secret: &'a str,
}

/// Inserts an endpoint.
pub async fn insert(conn: &mut PgConnection, w: &NewWebhook<'_>) -> sqlx::Result<WebhookRow> {
    sqlx::query_as(&format!(
        "INSERT INTO webhooks (id, tenant, url, types, description, secret)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(w.id)
    .bind(w.tenant)
    .bind(w.url)
    .bind(w.types)
    .bind(w.description)
    .bind(w.secret)
    .fetch_one(conn)
    .await
}

/// An endpoint of `tenant`.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant: &str,
    id: Uuid,
) -> sqlx::Result<Option<WebhookRow>> {
    let row: Option<WebhookRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM webhooks WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(row.filter(|w| w.tenant == tenant))
}

/// Locks an endpoint of `tenant` for the rest of the transaction.
pub async fn lock(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> sqlx::Result<Option<WebhookRow>> {
    let row: Option<WebhookRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM webhooks WHERE id = $1 AND tenant = $2 FOR NO KEY UPDATE"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(conn)
    .await?;
    Ok(row)
}

/// The endpoints of `tenant`, oldest first.
pub async fn list(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<Vec<WebhookRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM webhooks WHERE tenant = $1 ORDER BY created_at, id"
    ))
    .bind(tenant)
    .fetch_all(db)
    .await
}

/// Endpoints a tenant may have.
pub async fn count(db: impl PgExecutor<'_>, tenant: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM webhooks WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(db)
        .await
}

/// Writes an endpoint's changeable fields back.
pub async fn update(conn: &mut PgConnection, w: &WebhookRow) -> sqlx::Result<WebhookRow> {
    sqlx::query_as(&format!(
        "UPDATE webhooks SET url = $2, types = $3, description = $4, secret = $5,
             previous_secret = $6, previous_secret_expires_at = $7, failure_streak = $8,
             disabled_at = $9, disabled_reason = $10, updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(w.id)
    .bind(&w.url)
    .bind(&w.types)
    .bind(&w.description)
    .bind(&w.secret)
    .bind(&w.previous_secret)
    .bind(w.previous_secret_expires_at)
    .bind(w.failure_streak)
    .bind(w.disabled_at)
    .bind(&w.disabled_reason)
    .fetch_one(conn)
    .await
}

/// Deletes an endpoint with its deliveries.
pub async fn delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM webhooks WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates the deliveries of `events` (tenant, ID, type, body, time), one for every
/// endpoint of its tenant that existed when it happened and wants its type, enabled or
/// not (a disabled one's wait until it is enabled again), all in one statement: an
/// event of a tenant without endpoints costs nothing more. An event already fanned out
/// to an endpoint is not again. Returns how many were created.
pub async fn fan_out(
    db: impl PgExecutor<'_>,
    events: &[(&str, Uuid, &str, &Value, DateTime<Utc>)],
) -> sqlx::Result<u64> {
    let tenants: Vec<&str> = events.iter().map(|e| e.0).collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.1).collect();
    let types: Vec<&str> = events.iter().map(|e| e.2).collect();
    let bodies: Vec<&Value> = events.iter().map(|e| e.3).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.4).collect();
    Ok(sqlx::query(
        "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, event, state)
         SELECT gen_random_uuid(), w.id, e.id, e.type, e.body, 'pending'
           FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::jsonb[], $5::timestamptz[])
                AS e(tenant, id, type, body, at)
           JOIN webhooks w ON w.tenant = e.tenant
          WHERE (cardinality(w.types) = 0 OR e.type = ANY (w.types)) AND w.created_at <= e.at
         ON CONFLICT (webhook_id, event_id) DO NOTHING",
    )
    .bind(&tenants)
    .bind(&ids)
    .bind(&types)
    .bind(&bodies)
    .bind(&times)
    .execute(db)
    .await?
    .rows_affected())
}

/// A delivery leased for sending, with what sending needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Leased {
    /// The delivery.
    pub id: Uuid,
    /// Its endpoint.
    pub webhook_id: Uuid,
    /// The event's ID (`webhook-id`).
    pub event_id: Uuid,
    /// The event as sent.
    pub event: Value,
    /// Attempts so far.
    pub attempts: i32,
    /// Where to send it.
    pub url: String,
    /// The signing secret as stored (sealed when `WEBHOOK_SECRET_KEY` is set).
    pub secret: String,
    /// The previous secret, while it still signs.
    pub previous_secret: Option<String>,
}

/// How many deliveries may be in flight at once (across dispatchers).
#[derive(Debug, Clone, Copy)]
pub struct LeaseCaps {
    /// Of one endpoint.
    pub per_endpoint: i64,
    /// Of one tenant's endpoints together.
    pub per_tenant: i64,
}

/// Leases up to `limit` due deliveries of enabled endpoints for `lease`, oldest first,
/// within `caps`: so one slow or failing endpoint, or one tenant's many, holds at most
/// its share of the slots. Endpoints are walked one by one (those with pending deliveries, through
/// `webhook_deliveries_pending`), each giving its oldest due deliveries, so a backlog
/// of one never hides another's.
pub async fn lease(
    conn: &mut PgConnection,
    limit: i64,
    caps: LeaseCaps,
    lease: Duration,
) -> sqlx::Result<Vec<Leased>> {
    sqlx::query_as(
        "WITH RECURSIVE pending AS (
             (SELECT webhook_id AS id FROM webhook_deliveries WHERE state = 'pending'
              ORDER BY webhook_id LIMIT 1)
             UNION ALL
             SELECT (SELECT d.webhook_id FROM webhook_deliveries d
                     WHERE d.state = 'pending' AND d.webhook_id > p.id
                     ORDER BY d.webhook_id LIMIT 1)
             FROM pending p WHERE p.id IS NOT NULL),
         open AS (
             SELECT w.id, w.tenant,
                    (SELECT count(*) FROM webhook_deliveries x
                     WHERE x.webhook_id = w.id AND x.state = 'pending'
                       AND x.locked_until IS NOT NULL AND x.locked_until > now()) AS busy
             FROM pending p JOIN webhooks w ON w.id = p.id
             WHERE w.disabled_at IS NULL),
         tenant_busy AS (SELECT tenant, sum(busy) AS busy FROM open GROUP BY tenant),
         due AS (
             SELECT d.id, d.next_attempt_at,
                    t.busy + row_number() OVER (PARTITION BY o.tenant ORDER BY d.next_attempt_at)
                        AS n
             FROM open o JOIN tenant_busy t ON t.tenant = o.tenant
             CROSS JOIN LATERAL (
                 SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
                 WHERE d.webhook_id = o.id AND d.state = 'pending' AND d.next_attempt_at <= now()
                   AND (d.locked_until IS NULL OR d.locked_until <= now())
                 ORDER BY d.next_attempt_at LIMIT GREATEST($2 - o.busy, 0)) d),
         pick AS (SELECT id FROM due WHERE n <= $3 ORDER BY next_attempt_at LIMIT $1)
         UPDATE webhook_deliveries d
         SET locked_until = now() + make_interval(secs => $4), updated_at = now()
         FROM pick, webhooks w
         WHERE d.id = pick.id AND w.id = d.webhook_id AND d.state = 'pending'
           AND (d.locked_until IS NULL OR d.locked_until <= now())
         RETURNING d.id, d.webhook_id, d.event_id, d.event, d.attempts, w.url, w.secret,
                   CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END
                       AS previous_secret",
    )
    .bind(limit)
    .bind(caps.per_endpoint)
    .bind(caps.per_tenant)
    .bind(lease.as_secs_f64())
    .fetch_all(conn)
    .await
}

/// One attempt's outcome, to record.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The HTTP status, if an answer came.
    pub status_code: Option<i32>,
    /// Time to the answer (or the failure).
    pub latency_ms: i32,
    /// The start of the answer's body.
    pub response: String,
    /// Why it failed without an answer.
    pub error: Option<String>,
}

/// Records an attempt of `delivery` and what follows: `Some(at)`, try again then;
/// `None` with `ok`, delivered; `None` without, failed for good.
pub async fn record(
    conn: &mut PgConnection,
    delivery: Uuid,
    attempt: &Attempt,
    ok: bool,
    retry_at: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, status_code, latency_ms, response, error)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(delivery)
    .bind(attempt.status_code)
    .bind(attempt.latency_ms)
    .bind(&attempt.response)
    .bind(&attempt.error)
    .execute(&mut *conn)
    .await?;
    let state = match (ok, retry_at) {
        (true, _) => "succeeded",
        (false, Some(_)) => "pending",
        (false, None) => "failed",
    };
    sqlx::query(
        "UPDATE webhook_deliveries SET state = $2, attempts = attempts + 1, locked_until = NULL,
             next_attempt_at = COALESCE($3, next_attempt_at), updated_at = now()
         WHERE id = $1",
    )
    .bind(delivery)
    .bind(state)
    .bind(retry_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves an endpoint's failure streak: reset on success, else one more; disables it
/// (`failing`) once the streak reaches `disable_after`. Returns whether this disabled it.
pub async fn streak(
    conn: &mut PgConnection,
    webhook: Uuid,
    ok: bool,
    disable_after: i32,
) -> sqlx::Result<bool> {
    let disabled: Option<bool> = sqlx::query_scalar(
        "UPDATE webhooks SET
             failure_streak = CASE WHEN $2 THEN 0 ELSE failure_streak + 1 END,
             disabled_at = CASE WHEN NOT $2 AND disabled_at IS NULL AND failure_streak + 1 >= $3
                                THEN now() ELSE disabled_at END,
             disabled_reason = CASE WHEN NOT $2 AND disabled_at IS NULL AND failure_streak + 1 >= $3
                                    THEN 'failing' ELSE disabled_reason END
         WHERE id = $1
         RETURNING NOT $2 AND disabled_reason = 'failing' AND failure_streak = $3",
    )
    .bind(webhook)
    .bind(ok)
    .bind(disable_after)
    .fetch_optional(conn)
    .await?;
    Ok(disabled.unwrap_or(false))
}

/// A delivery as its log shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Its ID.
    pub id: Uuid,
    /// Its endpoint.
    pub webhook_id: Uuid,
    /// The event's ID.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// `pending`, `succeeded` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i32,
    /// When the next attempt is due (pending deliveries).
    pub next_attempt_at: DateTime<Utc>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, state, attempts, \
    next_attempt_at, created_at, updated_at";

/// An endpoint's deliveries, newest first, before the `(created_at, id)` of `before`.
pub async fn deliveries(
    db: impl PgExecutor<'_>,
    webhook: Uuid,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<DeliveryRow>> {
    let mut q = super::Filtered::new(format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries"));
    q.is("webhook_id = ", webhook)
        .before("(created_at, id)", before);
    q.page(db, "created_at DESC, id DESC", limit).await
}

/// One delivery of an endpoint.
pub async fn delivery(
    db: impl PgExecutor<'_>,
    webhook: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<DeliveryRow>> {
    sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2"
    ))
    .bind(id)
    .bind(webhook)
    .fetch_optional(db)
    .await
}

/// An attempt as the log shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    /// The delivery.
    pub delivery_id: Uuid,
    /// When.
    pub at: DateTime<Utc>,
    /// The HTTP status, if an answer came.
    pub status_code: Option<i32>,
    /// Time to the answer (or the failure).
    pub latency_ms: i32,
    /// The start of the answer's body.
    pub response: String,
    /// Why it failed without an answer.
    pub error: Option<String>,
}

/// The attempts of `deliveries`, oldest first.
pub async fn attempts(
    db: impl PgExecutor<'_>,
    deliveries: &[Uuid],
) -> sqlx::Result<Vec<AttemptRow>> {
    sqlx::query_as(
        "SELECT delivery_id, at, status_code, latency_ms, response, error FROM webhook_attempts
         WHERE delivery_id = ANY($1) ORDER BY id",
    )
    .bind(deliveries)
    .fetch_all(db)
    .await
}

/// Makes a delivery due now again (whatever its state). One being sent is left to that
/// attempt (its lease stands, so the endpoint's cap holds): it is being tried now.
pub async fn requeue(conn: &mut PgConnection, webhook: Uuid, id: Uuid) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE webhook_deliveries SET state = 'pending', updated_at = now(),
             next_attempt_at = CASE WHEN locked_until > now() THEN next_attempt_at ELSE now() END
         WHERE id = $1 AND webhook_id = $2",
    )
    .bind(id)
    .bind(webhook)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Deliveries waiting (due or scheduled) of enabled endpoints, and the age in seconds of
/// the oldest due one.
pub async fn backlog(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*),
                COALESCE(EXTRACT(EPOCH FROM now() - min(d.next_attempt_at)
                         FILTER (WHERE d.next_attempt_at <= now()))::float8, 0)
         FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
         WHERE d.state = 'pending' AND w.disabled_at IS NULL",
    )
    .fetch_one(db)
    .await
}

/// Deletes, with their attempts, up to `limit` deliveries untouched since `before` that
/// are over (delivered, or failed with the schedule spent: counted from their end, a
/// retry asked for starting it afresh) or wait for a disabled endpoint (counted from
/// their last attempt, or their making); returns how many. Pending deliveries of enabled
/// endpoints stay until they end. Walks each endpoint's log index
/// (`webhook_deliveries_log`), oldest first.
pub async fn expire(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM webhook_deliveries WHERE id IN (
             SELECT old.id FROM webhooks w
             CROSS JOIN LATERAL (
                 SELECT d.id FROM webhook_deliveries d
                  WHERE d.webhook_id = w.id AND d.updated_at < $1
                    AND (d.state <> 'pending' OR w.disabled_at IS NOT NULL)
                  ORDER BY d.created_at LIMIT $2) old
             LIMIT $2)",
    )
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}
