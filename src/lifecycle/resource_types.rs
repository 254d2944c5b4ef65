//! Registering, changing and removing resource types (`/v1/resource-types`).
//!
//! A change is checked against the stored version ([`evolution::check`]) under the
//! type's row lock, so two concurrent changes cannot both pass against the same old
//! version. After commit this process reloads its registry at once; the others reload on
//! the notification the commit sends (and, until then, re-read a type that refuses a
//! request: see [`crate::registry`]).

use super::txn::commit_audited;
use super::{Audit, Engine, LifecycleError};
use crate::domain::resource_type::{evolution, ResourceType, TypeDef};
use crate::domain::{Kind, ValidationError};
use crate::store::resource_types::{self, TypeRow};
use std::collections::BTreeSet;

/// What a `PUT` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The kind is new (version 1).
    Created,
    /// The definition changed (a new version).
    Updated,
    /// It was the same as stored; nothing changed.
    Unchanged,
}

fn conflict(code: &'static str, field: &str, message: String) -> LifecycleError {
    LifecycleError::Invalid(ValidationError::new(code, field, message))
}

/// Checks `def` on its own: it compiles, and the kinds it references are registered
/// (`kinds`, read in the caller's transaction).
fn compiles(def: &TypeDef, kinds: &BTreeSet<String>) -> Result<(), ValidationError> {
    let known = |k: &Kind| kinds.contains(k.as_str());
    ResourceType::compile(def.clone(), 1, &known).map(drop)
}

/// Registers `def`, or changes the registered type of its kind when `replace` (a
/// `PUT`); without `replace` (a `POST`) an existing kind is `409 resource_type_exists`.
pub async fn put(
    engine: &Engine,
    def: TypeDef,
    replace: bool,
    audit: Audit<'_>,
) -> Result<(TypeRow, Outcome), LifecycleError> {
    let mut tx = crate::store::begin(&engine.pool).await?;
    let rows = resource_types::all(&mut *tx).await?;
    let kinds: BTreeSet<String> = rows.iter().map(|r| r.kind.clone()).collect();
    compiles(&def, &kinds)?;
    let (row, outcome) = match resource_types::lock(&mut tx, def.kind.as_str()).await? {
        None => {
            let row = resource_types::insert(&mut tx, &def).await.map_err(|e| {
                match crate::store::violated_constraint(&e) {
                    Some("resource_types_plural_key") => conflict(
                        "plural_taken",
                        "plural",
                        format!("another kind already uses the URL segment {:?}", def.plural),
                    ),
                    // Registered by a concurrent request since the lock above.
                    Some("resource_types_pkey") => conflict(
                        "resource_type_exists",
                        "kind",
                        format!("a resource type {} exists; PUT changes it", def.kind),
                    ),
                    _ => e.into(),
                }
            })?;
            (row, Outcome::Created)
        }
        Some(_) if !replace => {
            let why = format!("a resource type {} exists; PUT changes it", def.kind);
            return Err(conflict("resource_type_exists", "kind", why));
        }
        Some(old) => {
            let old_def = old.to_def().map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            if old_def == def {
                (old, Outcome::Unchanged)
            } else {
                evolution::check(&old_def, &def)?;
                (
                    resource_types::update(&mut tx, &def).await?,
                    Outcome::Updated,
                )
            }
        }
    };
    commit_audited(tx, audit).await?;
    // Served here at once; a failed read leaves it to the notification the commit sent.
    engine.types.reload_logged().await;
    Ok((row, outcome))
}

/// Removes the type of `kind`: refused while live resources have it, or while another
/// type's specs may name it.
pub async fn delete(engine: &Engine, kind: &str, audit: Audit<'_>) -> Result<(), LifecycleError> {
    let mut tx = crate::store::begin(&engine.pool).await?;
    if resource_types::lock(&mut tx, kind).await?.is_none() {
        return Err(LifecycleError::NotFound);
    }
    if resource_types::has_live_resources(&mut *tx, kind).await? {
        let why = format!("live resources of kind {kind} exist; delete them first");
        return Err(conflict("resource_type_in_use", "kind", why));
    }
    for row in resource_types::all(&mut *tx).await? {
        let Ok(def) = row.to_def() else { continue };
        let names_it = def.kind != kind
            && crate::domain::resource_type::rules::FieldRules::parse(
                &def.spec_schema,
                &def.kind,
                &|_| true,
            )
            .is_ok_and(|r| r.referenced_kinds().any(|k| k == kind));
        if names_it {
            let why = format!("the specs of {} name resources of kind {kind}", def.kind);
            return Err(conflict("resource_type_in_use", "kind", why));
        }
    }
    resource_types::delete(&mut tx, kind).await?;
    commit_audited(tx, audit).await?;
    engine.types.reload_logged().await;
    Ok(())
}
