//! Tenant quotas: setting a tenant's limits, and checking a write against them inside
//! the write's own transaction.
//!
//! The check locks the tenant's quota row (`store::quotas::lock`) before it sums the
//! tenant's usage, so two writes of one tenant never both see the room only one of them
//! fits in. A tenant without limits has no row: its writes take no lock and pay one
//! primary-key lookup. Lock order: after the resource row (updates lock it first), and
//! nothing is locked after it but rows the write inserts.

use super::txn::Txn;
use super::{Audit, Engine, LifecycleError};
use crate::domain::quota::{self, Amounts, Limit, LimitIn, Usage};
use crate::domain::{Kind, ValidationError};
use crate::store::{quotas, tenants};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Replaces the limits of `tenant` with `limits` (none: the tenant is unlimited) and
/// returns them as stored. Limits below current usage are accepted: they refuse further
/// growth, and take nothing away.
pub async fn set(
    engine: &Engine,
    tenant: &str,
    limits: &[LimitIn],
    audit: Audit<'_>,
) -> Result<Vec<Limit>, LifecycleError> {
    let types = engine.types.snapshot();
    let mut limits = quota::validate(limits, &|k| types.get(k).map(|t| t.dimensions()))?;
    let mut conn = Txn::begin(engine).await?;
    conn.audit(audit);
    if tenants::get(&mut *conn, tenant).await?.is_none() {
        return Err(LifecycleError::TenantNotFound);
    }
    for (i, limit) in limits.iter().enumerate() {
        let Some(zone) = &limit.zone else { continue };
        if !engine.catalog.zone_exists(&mut conn, zone).await? {
            let field = format!("limits[{i}].zone");
            let why = format!("no zone named {zone:?}");
            return Err(ValidationError::new("unknown_zone", field, why).into());
        }
    }
    quota::sort(&mut limits);
    quotas::replace(&mut conn, tenant, &limits).await?;
    conn.commit().await?;
    Ok(limits)
}

/// In a write's transaction: refuses the write if it takes a resource of `kind` in
/// `zone` of `tenant` to `next` (from what resource `before` consumed, or from nothing
/// for a create) past one of the tenant's limits. Only dimensions the write grows are
/// checked, so a change that shrinks or keeps a resource is never refused.
pub(super) async fn check(
    txn: &mut Txn<'_>,
    tenant: &str,
    kind: &Kind,
    zone: &str,
    before: Option<Uuid>,
    next: &Amounts,
) -> Result<(), LifecycleError> {
    let Some(mut ledger) = Ledger::lock(txn, &[tenant]).await?.remove(tenant) else {
        return Ok(());
    };
    let before = match before {
        Some(id) => quotas::footprint(&mut **txn, id).await?,
        None => Amounts::default(),
    };
    ledger.admit(txn, kind, zone, &next.minus(&before)).await
}

/// A tenant's limits, locked in a write's transaction, and its usage as the writes
/// checked so far in that transaction leave it.
pub(super) struct Ledger {
    tenant: String,
    limits: Vec<Limit>,
    /// Read on the first write that grows a limited dimension.
    usage: Option<Vec<Usage>>,
}

impl Ledger {
    /// Locks the quota rows of `tenants` (sorted) and returns the ledgers of those that
    /// have limits.
    pub async fn lock(
        txn: &mut Txn<'_>,
        tenants: &[&str],
    ) -> sqlx::Result<BTreeMap<String, Ledger>> {
        Ok(quotas::lock(txn, tenants)
            .await?
            .into_iter()
            .map(|(tenant, limits)| {
                let ledger = Ledger {
                    tenant: tenant.clone(),
                    limits,
                    usage: None,
                };
                (tenant, ledger)
            })
            .collect())
    }

    /// Refuses a write that adds `delta` to a resource of `kind` in `zone` if it passes
    /// a limit; else counts it, for the next write checked.
    pub async fn admit(
        &mut self,
        txn: &mut Txn<'_>,
        kind: &Kind,
        zone: &str,
        delta: &Amounts,
    ) -> Result<(), LifecycleError> {
        let grown = quota::grown(&self.limits, kind, zone, delta);
        if grown.is_empty() {
            return Ok(());
        }
        let usage = match &mut self.usage {
            Some(usage) => usage,
            None => self
                .usage
                .insert(quotas::usage(&mut **txn, &self.tenant).await?),
        };
        match quota::check(&grown, usage, delta) {
            Ok(fill) => {
                for (dimension, ratio) in fill {
                    txn.quota_filled(dimension, ratio);
                }
                quota::add_usage(usage, kind, zone, delta);
                Ok(())
            }
            Err(exceeded) => {
                let metrics = &txn.engine().metrics;
                metrics.quota_rejected(&txn.engine().service_label(kind), exceeded.dimension);
                Err(LifecycleError::QuotaExceeded(exceeded))
            }
        }
    }
}
