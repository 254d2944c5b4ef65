//! Accepting writes: desired state, operation and outbox row in one transaction.

use super::txn::Txn;
use super::{dispatch, quotas, Engine, LifecycleError};
use crate::auth::Principal;
use crate::domain::quota::Amounts;
use crate::domain::resource_type::{merge_patch, Effect, ResourceType, ValidSpec};
use crate::domain::{names, Action, OperationState, Phase, ValidationError};
use crate::store;
use crate::store::operations::{self, NewOperation, OperationRow};
use crate::store::resources::{self, NewResource, ResourceRow};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

/// Who asked, for the operation row and the dispatch headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta<'a> {
    /// The caller.
    pub principal: &'a Principal,
    /// The request's ID (`X-Request-Id`).
    pub request_id: &'a str,
    /// The request's W3C `traceparent`, if it had one.
    pub traceparent: Option<&'a str>,
    /// The client's `Idempotency-Key` and the fingerprint of the request it came with.
    pub idempotency: Option<Idempotency<'a>>,
    /// The request's audit entry, written with the change.
    pub audit: super::Audit<'a>,
}

impl RequestMeta<'_> {
    fn origin(&self) -> Origin<'_> {
        Origin {
            requested_by: Some(self.principal.id),
            request_id: self.request_id,
            traceparent: self.traceparent,
            idempotency: self.idempotency,
        }
    }
}

/// Where a new operation comes from: a client's request, or the system itself (the
/// reconciler's converging updates have no `requested_by`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin<'a> {
    pub requested_by: Option<Uuid>,
    pub request_id: &'a str,
    pub traceparent: Option<&'a str>,
    pub idempotency: Option<Idempotency<'a>>,
}

/// An `Idempotency-Key` and what it was sent with.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    /// The client's key.
    pub key: &'a str,
    /// A hash of method, path and body: the same key with another request is refused.
    pub fingerprint: &'a str,
}

/// A change to labels: a value sets a label, `None` removes it (JSON merge patch).
pub type LabelPatch = std::collections::BTreeMap<String, Option<String>>;

/// A change to an existing resource.
#[derive(Debug, Clone)]
pub enum Change {
    /// A JSON merge patch of the spec, and a patch of the labels (`PATCH`).
    Patch {
        /// Merged into the spec (`{}` changes nothing).
        spec: Value,
        /// Applied to the labels, if any.
        labels: Option<LabelPatch>,
    },
    /// An action with its input (`POST …/actions/{action}`).
    Action(Action, Value),
}

/// In a write's transaction: the operation an earlier request with the same
/// `Idempotency-Key` created, if any. Concurrent requests with one key are serialized
/// by an advisory lock on the key, so exactly one of them creates anything.
async fn replay(
    conn: &mut PgConnection,
    principal: Uuid,
    idempotency: Option<Idempotency<'_>>,
) -> Result<Option<OperationRow>, LifecycleError> {
    let Some(idem) = idempotency else {
        return Ok(None);
    };
    store::advisory_xact_lock(conn, idempotency_lock(principal, idem.key)).await?;
    let found = operations::find_by_idempotency_key(conn, principal, idem.key).await?;
    replayed(found, idem)
}

/// The advisory lock that serializes the requests of `principal` with `key`.
pub(super) fn idempotency_lock(principal: Uuid, key: &str) -> i64 {
    let digest = Sha256::digest(format!("{principal}\n{key}"));
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What a request with `idem` gets when `found` is the operation its key names, if any:
/// that operation again, or a refusal if the key came with another request.
pub(super) fn replayed(
    found: Option<OperationRow>,
    idem: Idempotency<'_>,
) -> Result<Option<OperationRow>, LifecycleError> {
    match found {
        Some(op) if op.request_fingerprint.as_deref() == Some(idem.fingerprint) => Ok(Some(op)),
        Some(_) => Err(LifecycleError::IdempotencyKeyReused),
        None => Ok(None),
    }
}

/// A create request, as the API received it.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Resource name.
    pub name: String,
    /// Zone.
    pub zone: String,
    /// Spec, not yet validated.
    pub spec: Value,
    /// Labels, not yet validated.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Checks `spec` against `rt` (the next spec of a resource whose spec is `before`, for
/// an update). A refusal by this process's copy of the type is checked again against
/// the database's, in case another replica changed the type a moment ago (changes only
/// widen a type, so a stale copy can only refuse too much). Returns the type the spec
/// passed.
async fn validated(
    engine: &Engine,
    rt: &Arc<ResourceType>,
    spec: &Value,
    before: Option<&Value>,
) -> Result<(Arc<ResourceType>, ValidSpec), LifecycleError> {
    match rt.validate_spec(spec, before) {
        Ok(valid) => Ok((rt.clone(), valid)),
        Err(e) => match engine.types.fresh(rt).await? {
            Some(newer) => {
                let valid = newer.validate_spec(spec, before)?;
                Ok((newer, valid))
            }
            None => Err(e.into()),
        },
    }
}

/// Validates and records a new resource of type `rt` with its `create` operation.
/// Concurrent creates share a transaction (see [`super::group`]); each is answered on
/// its own.
pub async fn create(
    engine: &Engine,
    meta: RequestMeta<'_>,
    tenant: &str,
    rt: &Arc<ResourceType>,
    req: CreateRequest,
) -> Result<OperationRow, LifecycleError> {
    if !meta.principal.can_read(tenant) {
        return Err(LifecycleError::TenantNotFound);
    }
    if !meta.principal.can_write(tenant) {
        return Err(LifecycleError::Forbidden(
            "this key may not change resources",
        ));
    }
    names::validate_label("name", &req.name)?;
    names::validate_labels(&req.labels)?;
    let (rt, valid) = validated(engine, rt, &req.spec, None).await?;
    let ready = ReadyCreate {
        tenant: tenant.to_owned(),
        rt,
        valid,
        name: req.name,
        zone: req.zone,
        labels: serde_json::to_value(&req.labels).expect("labels serialize"),
        principal: meta.principal.id,
        request_id: meta.request_id.to_owned(),
        traceparent: meta.traceparent.map(str::to_owned),
        idempotency: meta
            .idempotency
            .map(|i| (i.key.to_owned(), i.fingerprint.to_owned())),
        audit: meta.audit.map(|(slot, status)| (slot.clone(), status)),
    };
    engine.group.create(engine, ready).await
}

/// A create that passed every check that needs no database, owned, so that it can wait
/// for a group commit.
#[derive(Debug)]
pub(super) struct ReadyCreate {
    pub tenant: String,
    pub rt: Arc<ResourceType>,
    pub valid: ValidSpec,
    pub name: String,
    pub zone: String,
    /// Validated labels, as a JSON object.
    pub labels: Value,
    pub principal: Uuid,
    pub request_id: String,
    pub traceparent: Option<String>,
    /// The `Idempotency-Key` and the request's fingerprint.
    pub idempotency: Option<(String, String)>,
    pub audit: Option<(crate::audit::AuditSlot, u16)>,
}

impl ReadyCreate {
    pub fn idempotency(&self) -> Option<Idempotency<'_>> {
        self.idempotency
            .as_ref()
            .map(|(key, fingerprint)| Idempotency { key, fingerprint })
    }

    pub fn origin(&self) -> Origin<'_> {
        Origin {
            requested_by: Some(self.principal),
            request_id: &self.request_id,
            traceparent: self.traceparent.as_deref(),
            idempotency: self.idempotency(),
        }
    }

    pub fn audit(&self) -> super::Audit<'_> {
        self.audit.as_ref().map(|(slot, status)| (slot, *status))
    }

    /// The resource row to insert, with what it consumes.
    pub fn resource(&self, id: Uuid, footprint: Amounts) -> NewResource<'_> {
        NewResource {
            id,
            tenant: &self.tenant,
            kind: self.rt.kind().clone(),
            zone: &self.zone,
            name: &self.name,
            spec: &self.valid.value,
            labels: &self.labels,
            phase: Phase::Provisioning,
            footprint,
        }
    }

    /// On `conn`: checks what needs the database but takes no lock (the tenant, the
    /// zone, catalog entries, referenced resources); returns what the new resource
    /// consumes.
    pub async fn admit(
        &self,
        engine: &Engine,
        conn: &mut PgConnection,
    ) -> Result<Amounts, LifecycleError> {
        if !engine
            .catalog
            .tenant_exists(&mut *conn, &self.tenant)
            .await?
        {
            return Err(LifecycleError::TenantNotFound);
        }
        let found = check_references(engine, conn, &self.tenant, &self.zone, &self.valid).await?;
        Ok(self.rt.footprint(&self.valid.value, &found))
    }
}

/// Records one create in a transaction of its own. A name a live resource has already is
/// refused naming that resource ([`LifecycleError::NameTaken`]), looked up once the
/// transaction has ended.
pub(super) async fn create_alone(
    engine: &Engine,
    c: &ReadyCreate,
) -> Result<OperationRow, LifecycleError> {
    match record_alone(engine, c).await {
        Err(LifecycleError::NameTaken { kind, name, .. }) => {
            // Only to help the client: if the lookup fails (or the resource went
            // meanwhile), the refusal stands without it.
            let existing = resources::live_id_by_name(&engine.pool, &c.tenant, c.rt.kind(), &name)
                .await
                .ok()
                .flatten();
            Err(LifecycleError::NameTaken {
                kind,
                name,
                existing,
            })
        }
        recorded => recorded,
    }
}

/// [`create_alone`]'s transaction.
async fn record_alone(engine: &Engine, c: &ReadyCreate) -> Result<OperationRow, LifecycleError> {
    let mut tx = Txn::begin(engine).await?;
    tx.audit(c.audit());
    if let Some(op) = replay(&mut tx, c.principal, c.idempotency()).await? {
        return Ok(op);
    }
    let footprint = c.admit(engine, &mut tx).await?;
    let kind = c.rt.kind().clone();
    quotas::check(&mut tx, &c.tenant, &kind, &c.zone, None, &footprint).await?;
    let resource = resources::insert(&mut tx, &c.resource(engine.ids.make(), footprint))
        .await
        .map_err(|e| match crate::store::violated_constraint(&e) {
            Some("resources_live_name") => LifecycleError::NameTaken {
                kind: kind.to_string(),
                name: c.name.clone(),
                existing: None,
            },
            _ => e.into(),
        })?;
    let op = start_operation(
        &mut tx,
        c.origin(),
        &resource,
        Action::create(),
        &json!({}),
        true,
    )
    .await?;
    tx.commit().await?;
    Ok(op)
}

/// Records a `delete` of a live resource. Deleting a resource whose delete is already
/// under way returns that operation: deletes are idempotent.
pub async fn delete(
    engine: &Engine,
    meta: RequestMeta<'_>,
    tenant: &str,
    rt: &ResourceType,
    id: Uuid,
    if_match: Option<i64>,
) -> Result<OperationRow, LifecycleError> {
    let (mut tx, resource) = match lock_for_change(engine, meta, tenant, rt, id, if_match).await? {
        Locked::Replay(op) => return Ok(op),
        Locked::Resource(tx, r) => (tx, r),
    };
    let active = operations::active_for_resource(&mut tx, id).await?;
    if let Some(existing) = active.iter().find(|o| o.action.is_delete()) {
        return Ok(existing.clone());
    }
    let op = start_operation(
        &mut tx,
        meta.origin(),
        &resource,
        Action::delete(),
        &json!({}),
        active.is_empty(),
    )
    .await?;
    tx.commit().await?;
    Ok(op)
}

enum Locked<'e> {
    Replay(OperationRow),
    Resource(Txn<'e>, ResourceRow),
}

/// Authorizes a change, opens its transaction and locks the live resource, checking
/// `If-Match`; or finds the earlier operation of a replayed request.
async fn lock_for_change<'e>(
    engine: &'e Engine,
    meta: RequestMeta<'_>,
    tenant: &str,
    rt: &ResourceType,
    id: Uuid,
    if_match: Option<i64>,
) -> Result<Locked<'e>, LifecycleError> {
    if !meta.principal.can_read(tenant) {
        return Err(LifecycleError::NotFound);
    }
    if !meta.principal.can_write(tenant) {
        return Err(LifecycleError::Forbidden(
            "this key may not change resources",
        ));
    }
    let mut tx = Txn::begin(engine).await?;
    tx.audit(meta.audit);
    if let Some(op) = replay(&mut tx, meta.principal.id, meta.idempotency).await? {
        return Ok(Locked::Replay(op));
    }
    let resource = resources::lock_live(&mut tx, tenant, &rt.kind().clone(), id)
        .await?
        .ok_or(LifecycleError::NotFound)?;
    if let Some(expected) = if_match {
        if expected != resource.version {
            return Err(LifecycleError::PreconditionFailed {
                current: resource.version,
            });
        }
    }
    Ok(Locked::Resource(tx, resource))
}

/// The type `rt`, or a newer one from the database, if either has action `action`.
async fn with_action(
    engine: &Engine,
    rt: &Arc<ResourceType>,
    action: &Action,
) -> Result<Arc<ResourceType>, LifecycleError> {
    if rt.has_action(action) {
        return Ok(rt.clone());
    }
    match engine.types.fresh(rt).await? {
        Some(newer) if newer.has_action(action) => Ok(newer),
        _ => Err(LifecycleError::UnknownAction {
            kind: rt.kind().to_string(),
            action: action.to_string(),
        }),
    }
}

/// Records a change of a live resource's spec (a patch or an action) and its
/// operation, which runs after the resource's active operations, in order.
pub async fn update(
    engine: &Engine,
    meta: RequestMeta<'_>,
    tenant: &str,
    rt: &Arc<ResourceType>,
    id: Uuid,
    change: Change,
    if_match: Option<i64>,
) -> Result<OperationRow, LifecycleError> {
    let rt = match &change {
        Change::Action(action, _) => with_action(engine, rt, action).await?,
        Change::Patch { .. } => rt.clone(),
    };
    let (mut tx, mut resource) =
        match lock_for_change(engine, meta, tenant, &rt, id, if_match).await? {
            Locked::Replay(op) => return Ok(op),
            Locked::Resource(tx, r) => (tx, r),
        };
    let (action, input, effect) = match change {
        Change::Patch { spec, labels } => {
            if let Some(patch) = labels {
                resource = patch_labels(&mut tx, &resource, patch).await?;
            }
            let merged = merge_patch(&resource.spec, &spec);
            (Action::update(), json!({}), Effect::NewSpec(merged))
        }
        Change::Action(action, input) => {
            let effect = rt
                .apply_action(&action, &resource.spec, &input)
                .expect("the type has the action")?;
            (action, input, effect)
        }
    };
    let next = match effect {
        Effect::NewSpec(next) => {
            let (rt, valid) = validated(engine, &rt, &next, Some(&resource.spec)).await?;
            let found = check_references(engine, &mut tx, tenant, &resource.zone, &valid).await?;
            (valid.value != resource.spec)
                .then(|| (rt.footprint(&valid.value, &found), valid.value))
        }
        Effect::Imperative => None,
    };
    let active = operations::active_for_resource(&mut tx, id).await?;
    if active.iter().any(|o| o.action.is_delete()) {
        return Err(LifecycleError::ResourceDeleting);
    }
    if let Some((footprint, spec)) = next {
        let (kind, zone) = (&resource.kind, &resource.zone);
        quotas::check(&mut tx, tenant, &kind.clone(), zone, Some(id), &footprint).await?;
        resource = resources::update_spec(&mut tx, id, &spec, &footprint).await?;
    }
    let input = if input.is_null() { json!({}) } else { input };
    let op = start_operation(
        &mut tx,
        meta.origin(),
        &resource,
        action,
        &input,
        active.is_empty(),
    )
    .await?;
    tx.commit().await?;
    Ok(op)
}

/// Applies a label patch to a locked resource, checking the labels it leaves.
async fn patch_labels(
    txn: &mut Txn<'_>,
    resource: &ResourceRow,
    patch: LabelPatch,
) -> Result<ResourceRow, LifecycleError> {
    let mut labels: std::collections::BTreeMap<String, String> =
        serde_json::from_value(resource.labels.clone()).unwrap_or_default();
    for (key, value) in patch {
        match value {
            Some(v) => labels.insert(key, v),
            None => labels.remove(&key),
        };
    }
    names::validate_labels(&labels)?;
    let value = serde_json::to_value(&labels).expect("labels serialize");
    txn.changed(resource.id);
    Ok(resources::set_labels(txn, resource.id, &value).await?)
}

/// Inserts an operation on `resource`: `pending` with its outbox row when `run_now`
/// (its events are still `operation.created` then `operation.pending`, recorded in one
/// row: migrations 0016 and 0020),
/// else `queued` behind the resource's active operation.
pub(super) async fn start_operation(
    txn: &mut Txn<'_>,
    origin: Origin<'_>,
    resource: &ResourceRow,
    action: Action,
    input: &Value,
    run_now: bool,
) -> sqlx::Result<OperationRow> {
    let new = new_operation(
        txn.engine(),
        origin,
        resource.into(),
        action.clone(),
        input,
        run_now,
    );
    let op = if run_now {
        let mut ops = dispatch::insert_dispatched(txn, &[new], &[resource.into()]).await?;
        ops.pop().expect("one operation inserted")
    } else {
        operations::insert(txn, &new).await?
    };
    txn.created(&op);
    if run_now && !action.is_create() {
        resources::set_phase(txn, resource.id, Phase::on_start(&action)).await?;
    }
    Ok(op)
}

/// A new operation on `resource`, at its generation: `pending` with its first message
/// when it runs at once (`run_now`), else `queued`.
pub(super) fn new_operation<'a>(
    engine: &Engine,
    origin: Origin<'a>,
    resource: dispatch::Target<'a>,
    action: Action,
    input: &'a Value,
    run_now: bool,
) -> NewOperation<'a> {
    let (state, dispatches) = match run_now {
        true => (OperationState::Pending, 1),
        false => (OperationState::Queued, 0),
    };
    NewOperation {
        id: engine.ids.make(),
        tenant: resource.tenant,
        resource_id: resource.id,
        kind: resource.kind.clone(),
        zone: resource.zone,
        action,
        state,
        dispatches,
        input,
        target_generation: resource.generation,
        idempotency_key: origin.idempotency.map(|i| i.key),
        request_fingerprint: origin.idempotency.map(|i| i.fingerprint),
        requested_by: origin.requested_by,
        request_id: origin.request_id,
        traceparent: origin.traceparent,
        deadline: engine.deadline(),
    }
}

/// Checks what a spec names against the database: zone, catalog entries, bounds in
/// their attributes, and other resources. Returns the attributes of the catalog
/// entries it names, by field.
async fn check_references(
    engine: &Engine,
    conn: &mut PgConnection,
    tenant: &str,
    zone: &str,
    valid: &ValidSpec,
) -> Result<BTreeMap<String, Value>, LifecycleError> {
    if !engine.catalog.zone_exists(&mut *conn, zone).await? {
        let why = format!("no zone named {zone:?}");
        return Err(ValidationError::new("unknown_zone", "zone", why).into());
    }
    let mut found = BTreeMap::new();
    for r in &valid.catalog {
        let attributes = engine
            .catalog
            .entry(&mut *conn, r.category, &r.name)
            .await?
            .ok_or_else(|| {
                let why = format!(
                    "no {} named {:?} in the catalog",
                    r.category.as_str(),
                    r.name
                );
                ValidationError::new("unknown_catalog_item", r.field.clone(), why)
            })?;
        found.insert(r.field.clone(), Arc::unwrap_or_clone(attributes));
    }
    for range in &valid.ranges {
        check_range(range, &found)?;
    }
    for reference in &valid.references {
        let target = resources::get_live(&mut *conn, tenant, &reference.kind, reference.id).await?;
        let why = match target {
            Some(t) if t.zone == zone => continue,
            Some(_) => format!("the {} is in another zone", reference.kind),
            None => format!("no {} {} in this tenant", reference.kind, reference.id),
        };
        let code = reference.code.clone();
        return Err(ValidationError::new(code, reference.field.clone(), why).into());
    }
    Ok(found)
}

/// Checks a number against the bounds its catalog entry's attributes set.
fn check_range(
    range: &crate::domain::resource_type::CatalogRange,
    found: &BTreeMap<String, Value>,
) -> Result<(), ValidationError> {
    let Some(entry) = found.get(&range.entry_field) else {
        return Ok(());
    };
    let bound = |attr: &Option<String>| {
        attr.as_ref()
            .and_then(|a| entry.get(a))
            .and_then(Value::as_f64)
    };
    let (min, max) = (bound(&range.min), bound(&range.max));
    let below = min.is_some_and(|m| range.value < m);
    let above = max.is_some_and(|m| range.value > m);
    if below || above {
        let show = |b: Option<f64>| b.map_or("any".into(), |b| b.to_string());
        let why = format!(
            "{} takes {} to {}, got {}",
            range.entry_field,
            show(min),
            show(max),
            range.value
        );
        return Err(ValidationError::new(
            "invalid_spec",
            range.field.clone(),
            why,
        ));
    }
    Ok(())
}
