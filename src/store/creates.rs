//! The one statement that records a batch of creates: their resources, operations,
//! dispatch messages and audit rows.

use super::audit::AuditRow;
use super::operations::{NewOperation, OperationRow};
use super::outbox::NewMessage;
use super::resources::NewResource;
use sqlx::PgConnection;
use std::sync::LazyLock;
use uuid::Uuid;

/// What one statement records for a batch of creates.
pub struct Creates<'r, 'a> {
    /// The new resources.
    pub resources: &'r [NewResource<'a>],
    /// Their `create` operations, `pending`, in submission order.
    pub operations: &'r [NewOperation<'a>],
    /// The operations' first messages, in the order the relay is to publish them.
    pub messages: &'r [NewMessage],
    /// The requests' audit rows.
    pub audit: &'r [AuditRow],
}

/// Records `c` in one statement. Run outside a transaction block, the statement is its
/// own transaction: one round trip instead of a `BEGIN`, four inserts and a `COMMIT`.
///
/// It inserts nothing, and answers no rows, when a check it cannot make applies: one of
/// the batch's tenants has quota limits (they need the tenant's quota row locked and
/// its usage summed), or one of its `(principal, Idempotency-Key)` pairs names an
/// operation already (a replay). The caller then records the batch in a transaction
/// that makes those checks. Otherwise it answers the operations, in insertion order.
pub async fn insert_unchecked(
    conn: &mut PgConnection,
    c: &Creates<'_, '_>,
) -> sqlx::Result<Vec<OperationRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        // $1: tenants; $2, $3: principals and keys; then each table's arrays.
        let resources = 4;
        let messages = resources + super::resources::INSERT_PARAMS;
        let audit = messages + super::outbox::INSERT_PARAMS;
        let operations = audit + super::audit::INSERT_PARAMS;
        let free = "WHERE NOT (SELECT blocked FROM checks)";
        // The operations are inserted once every resource is (the count reads all of
        // `r` first): their events follow their resources' `resource.created`, as in a
        // transaction that inserts the resources first. A blocked batch has no
        // resources, so no operations.
        format!(
            "WITH checks AS MATERIALIZED (
                 SELECT EXISTS (SELECT 1 FROM quotas WHERE tenant = ANY($1::text[]))
                     OR EXISTS (SELECT 1 FROM operations
                                WHERE (requested_by, idempotency_key) IN
                                      (SELECT * FROM UNNEST($2::uuid[], $3::text[])))
                     AS blocked
             ),
             r AS ({} {free} RETURNING 1),
             m AS ({} {free}),
             a AS ({} {free})
             {} WHERE (SELECT count(*) FROM r) > 0 RETURNING {}",
            super::resources::insert_sql(resources),
            super::outbox::insert_sql(messages),
            super::audit::insert_sql(audit),
            super::operations::insert_sql(operations),
            super::operations::COLUMNS,
        )
    });
    let mut tenants: Vec<&str> = c.resources.iter().map(|r| r.tenant).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let keyed: Vec<(Uuid, &str)> = c
        .operations
        .iter()
        .filter_map(|o| Some((o.requested_by?, o.idempotency_key?)))
        .collect();
    let resources = super::resources::in_lock_order(c.resources);
    let query = sqlx::query_as(&SQL)
        .bind(tenants)
        .bind(keyed.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(keyed.iter().map(|k| k.1).collect::<Vec<_>>());
    let query = super::resources::bind_all(query, &resources);
    let query = super::outbox::bind_all(query, c.messages);
    let query = super::audit::bind_all(query, c.audit);
    let mut rows: Vec<OperationRow> = super::operations::bind_all(query, c.operations)
        .fetch_all(conn)
        .await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}
