//! Webhook writes: endpoints (create, change, rotate the secret, delete), the fan-out of
//! events into deliveries, and the outcome of each attempt.

use super::txn::Txn;
use super::{Audit, Engine, LifecycleError};
use crate::domain::sealing::{self, SealKeys};
use crate::domain::webhook::{self, MAX_DESCRIPTION};
use crate::domain::ValidationError;
use crate::store::tenants;
use crate::store::webhooks::{self as store, Attempt, NewWebhook, WebhookRow};
use chrono::{DateTime, Utc};
use gateway_proto::events::EventType;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// Endpoints one tenant may have.
pub const MAX_PER_TENANT: i64 = 32;

/// What a new endpoint, or a change of one, says. Absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct WebhookChange {
    /// URL, already checked (form and addresses) by the caller.
    pub url: Option<String>,
    /// Event types (empty: all).
    pub types: Option<Vec<String>>,
    /// Free text.
    pub description: Option<String>,
    /// `true` re-enables a disabled endpoint (and clears its failure streak); `false`
    /// disables it.
    pub enabled: Option<bool>,
}

fn check_types(types: &[String]) -> Result<(), ValidationError> {
    for (i, t) in types.iter().enumerate() {
        let twice = types[..i].contains(t);
        if twice || t.parse::<EventType>().is_err() {
            let why = match twice {
                true => format!("{t:?} is listed twice"),
                false => format!("unknown event type {t:?}"),
            };
            return Err(ValidationError::new(
                "invalid_event_type",
                format!("types[{i}]"),
                why,
            ));
        }
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), ValidationError> {
    if d.chars().count() > MAX_DESCRIPTION || d.contains('\0') {
        let why = format!("at most {MAX_DESCRIPTION} characters, no NUL");
        return Err(ValidationError::new(
            "invalid_description",
            "description",
            why,
        ));
    }
    Ok(())
}

/// Creates an endpoint of `tenant` with a new secret, sealed with `keys` when there
/// are; returns it with the secret in the clear (the only time the secret leaves the
/// gateway besides a rotation).
pub async fn create(
    engine: &Engine,
    tenant: &str,
    change: WebhookChange,
    keys: Option<&SealKeys>,
    audit: Audit<'_>,
) -> Result<WebhookRow, LifecycleError> {
    let types = change.types.unwrap_or_default();
    check_types(&types)?;
    let description = change.description.unwrap_or_default();
    check_description(&description)?;
    let url = change
        .url
        .ok_or_else(|| ValidationError::new("invalid_webhook_url", "url", "required"))?;
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    if tenants::lock(&mut txn, tenant).await?.is_none() {
        return Err(LifecycleError::TenantNotFound);
    }
    if store::count(&mut *txn, tenant).await? >= MAX_PER_TENANT {
        let why = format!("a tenant has at most {MAX_PER_TENANT} webhooks");
        return Err(ValidationError::new("too_many_webhooks", "url", why).into());
    }
    let (id, secret) = (Uuid::now_v7(), webhook::secret_from(rand::random()));
    let mut row = store::insert(
        &mut txn,
        &NewWebhook {
            id,
            tenant,
            url: &url,
            types: &types,
            description: &description,
            secret: &sealing::seal(keys, id, &secret, rand::random()),
        },
    )
    .await?;
    txn.commit().await?;
    row.secret = secret;
    Ok(row)
}

/// Changes an endpoint; `None` when `tenant` has no such endpoint.
pub async fn change(
    engine: &Engine,
    tenant: &str,
    id: Uuid,
    change: WebhookChange,
    audit: Audit<'_>,
) -> Result<Option<WebhookRow>, LifecycleError> {
    if let Some(t) = &change.types {
        check_types(t)?;
    }
    if let Some(d) = &change.description {
        check_description(d)?;
    }
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    let Some(mut w) = store::lock(&mut txn, tenant, id).await? else {
        return Ok(None);
    };
    w.url = change.url.unwrap_or(w.url);
    w.types = change.types.unwrap_or(w.types);
    w.description = change.description.unwrap_or(w.description);
    match change.enabled {
        Some(true) => {
            w.disabled_at = None;
            w.disabled_reason = None;
            w.failure_streak = 0;
        }
        Some(false) if w.disabled_at.is_none() => {
            w.disabled_at = Some(Utc::now());
            w.disabled_reason = Some("disabled by a user".into());
        }
        _ => {}
    }
    let w = store::update(&mut txn, &w).await?;
    txn.commit().await?;
    Ok(Some(w))
}

/// Gives an endpoint a new secret (sealed with `keys` when there are; returned in the
/// clear); the old one keeps signing (beside the new one) for `grace`. `None` when `tenant` has no such endpoint.
pub async fn rotate(
    engine: &Engine,
    tenant: &str,
    id: Uuid,
    grace: Duration,
    keys: Option<&SealKeys>,
    audit: Audit<'_>,
) -> Result<Option<WebhookRow>, LifecycleError> {
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    let Some(mut w) = store::lock(&mut txn, tenant, id).await? else {
        return Ok(None);
    };
    let secret = webhook::secret_from(rand::random());
    let sealed = sealing::seal(keys, id, &secret, rand::random());
    // The previous secret stays as it was stored (sealed or not): it only signs.
    w.previous_secret = Some(std::mem::replace(&mut w.secret, sealed));
    w.previous_secret_expires_at =
        Some(Utc::now() + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::days(1)));
    let mut w = store::update(&mut txn, &w).await?;
    txn.commit().await?;
    w.secret = secret;
    Ok(Some(w))
}

/// Deletes an endpoint and its delivery log; whether there was one.
pub async fn delete(
    engine: &Engine,
    tenant: &str,
    id: Uuid,
    audit: Audit<'_>,
) -> Result<bool, LifecycleError> {
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    if store::lock(&mut txn, tenant, id).await?.is_none() {
        return Ok(false);
    }
    store::delete(&mut txn, id).await?;
    txn.commit().await?;
    Ok(true)
}

/// Makes one delivery of an endpoint due now; whether there was one.
pub async fn retry(
    engine: &Engine,
    tenant: &str,
    webhook: Uuid,
    delivery: Uuid,
    audit: Audit<'_>,
) -> Result<bool, LifecycleError> {
    let mut txn = Txn::begin(engine).await?;
    txn.audit(audit);
    if store::lock(&mut txn, tenant, webhook).await?.is_none() {
        return Ok(false);
    }
    if !store::requeue(&mut txn, webhook, delivery).await? {
        return Ok(false);
    }
    txn.commit().await?;
    Ok(true)
}

/// An event to fan out: its tenant, ID, type, body and time.
pub type FanOut<'a> = (&'a str, Uuid, EventType, &'a Value, DateTime<Utc>);

/// Creates, in one statement, the deliveries of `events` to their tenants' endpoints;
/// returns how many.
pub async fn fan_out(engine: &Engine, events: &[FanOut<'_>]) -> sqlx::Result<u64> {
    let rows: Vec<_> = events
        .iter()
        .map(|(tenant, id, event_type, event, time)| {
            (*tenant, *id, event_type.as_str(), *event, *time)
        })
        .collect();
    store::fan_out(&engine.pool, &rows).await
}

/// Forgets up to `limit` deliveries untouched since `before` (with their attempts) that
/// are over or wait for a disabled endpoint (`WEBHOOK_RETENTION_SECONDS`); returns how
/// many.
pub async fn expire(engine: &Engine, before: DateTime<Utc>, limit: i64) -> sqlx::Result<u64> {
    store::expire(&engine.pool, before, limit).await
}

/// What became of a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint took it.
    Delivered,
    /// It will be tried again then.
    Retrying(DateTime<Utc>),
    /// The schedule is spent.
    Failed,
}

/// Records an attempt of `delivery` (its `attempts` before this one) to `webhook` and
/// decides what follows by `schedule`; moves the endpoint's failure streak, disabling
/// it at `disable_after`. Returns the outcome and whether the endpoint was disabled now.
pub async fn record(
    engine: &Engine,
    leased: &store::Leased,
    attempt: &Attempt,
    ok: bool,
    schedule: &[Duration],
    disable_after: i32,
) -> sqlx::Result<(Outcome, bool)> {
    let attempts = u32::try_from(leased.attempts).unwrap_or(0) + 1;
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    let outcome = match (ok, webhook::next_delay(schedule, attempts, jitter)) {
        (true, _) => Outcome::Delivered,
        (false, Some(wait)) => Outcome::Retrying(
            Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1)),
        ),
        (false, None) => Outcome::Failed,
    };
    let retry_at = match outcome {
        Outcome::Retrying(at) => Some(at),
        _ => None,
    };
    let mut tx = crate::store::begin(&engine.pool).await?;
    store::record(&mut tx, leased.id, attempt, ok, retry_at).await?;
    let disabled = store::streak(&mut tx, leased.webhook_id, ok, disable_after).await?;
    tx.commit().await?;
    Ok((outcome, disabled))
}
