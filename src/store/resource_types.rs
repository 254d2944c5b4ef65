//! The registry of resource types (`resource_types`): one row per kind, its definition
//! as JSON, and a version that grows with every change. Every change notifies the
//! `resource_types` channel (a trigger), which each process's registry listens on.

use crate::domain::resource_type::TypeDef;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

/// One registered type as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TypeRow {
    /// The kind.
    pub kind: String,
    /// Its URL segment.
    pub plural: String,
    /// Its service.
    pub service: String,
    /// The rest of the definition (schemas, actions, description).
    pub definition: Value,
    /// 1 when registered, one more at each change.
    pub version: i64,
}

impl TypeRow {
    /// The definition this row holds.
    pub fn to_def(&self) -> Result<TypeDef, serde_json::Error> {
        let mut value = self.definition.clone();
        if let Some(map) = value.as_object_mut() {
            map.insert("kind".into(), Value::String(self.kind.clone()));
            map.insert("plural".into(), Value::String(self.plural.clone()));
            map.insert("service".into(), Value::String(self.service.clone()));
        }
        serde_json::from_value(value)
    }
}

/// The stored `definition` of `def`: everything but kind, plural and service.
fn definition(def: &TypeDef) -> Value {
    let mut value = serde_json::to_value(def).expect("definitions serialize");
    if let Some(map) = value.as_object_mut() {
        for key in ["kind", "plural", "service"] {
            map.remove(key);
        }
    }
    value
}

const COLUMNS: &str = "kind, plural, service, definition, version";

/// Every registered type, by kind.
pub async fn all(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<TypeRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resource_types ORDER BY kind"
    ))
    .fetch_all(db)
    .await
}

/// The type of `kind`.
pub async fn get(db: impl PgExecutor<'_>, kind: &str) -> sqlx::Result<Option<TypeRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resource_types WHERE kind = $1"
    ))
    .bind(kind)
    .fetch_optional(db)
    .await
}

/// The type whose URL segment is `plural`.
pub async fn by_plural(db: impl PgExecutor<'_>, plural: &str) -> sqlx::Result<Option<TypeRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resource_types WHERE plural = $1"
    ))
    .bind(plural)
    .fetch_optional(db)
    .await
}

/// Locks the type of `kind` for the rest of the transaction.
pub async fn lock(conn: &mut PgConnection, kind: &str) -> sqlx::Result<Option<TypeRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resource_types WHERE kind = $1 FOR NO KEY UPDATE"
    ))
    .bind(kind)
    .fetch_optional(conn)
    .await
}

/// Registers a new type at version 1. A taken kind or plural violates
/// `resource_types_pkey` or `resource_types_plural_key`.
pub async fn insert(conn: &mut PgConnection, def: &TypeDef) -> sqlx::Result<TypeRow> {
    sqlx::query_as(&format!(
        "INSERT INTO resource_types (kind, plural, service, definition) VALUES ($1, $2, $3, $4)
         RETURNING {COLUMNS}"
    ))
    .bind(def.kind.as_str())
    .bind(&def.plural)
    .bind(def.service.as_str())
    .bind(definition(def))
    .fetch_one(conn)
    .await
}

/// Replaces the definition of a (locked) type and moves it to the next version.
pub async fn update(conn: &mut PgConnection, def: &TypeDef) -> sqlx::Result<TypeRow> {
    sqlx::query_as(&format!(
        "UPDATE resource_types SET definition = $2, version = version + 1, updated_at = now()
         WHERE kind = $1 RETURNING {COLUMNS}"
    ))
    .bind(def.kind.as_str())
    .bind(definition(def))
    .fetch_one(conn)
    .await
}

/// Removes the type of `kind`.
pub async fn delete(conn: &mut PgConnection, kind: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM resource_types WHERE kind = $1")
        .bind(kind)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether any live resource has kind `kind`.
pub async fn has_live_resources(db: impl PgExecutor<'_>, kind: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM resources WHERE kind = $1 AND deleted_at IS NULL)",
    )
    .bind(kind)
    .fetch_one(db)
    .await
}
