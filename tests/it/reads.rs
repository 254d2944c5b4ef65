//! Reads stay flat as a tenant grows: a resource read or a write's lookup uses the
//! primary key, never a scan of the tenant's resources (issue 12).

use crate::common::{example_spec, spawn_with, Options};
use reqwest::StatusCode;
use serde_json::json;

/// Index scans of `index` so far (statistics are flushed before reading them).
async fn scans(pool: &sqlx::PgPool, index: &str) -> i64 {
    sqlx::query_scalar("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1")
        .bind(index)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn resource_reads_and_locks_use_the_primary_key_not_the_tenants_list_index() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let op = app
            .create(
                &tenant,
                "vms",
                &format!("vm-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        ids.push(op["resource_id"].as_str().unwrap().to_owned());
    }
    // The generic plan is what a pooled prepared statement runs after a few executions.
    sqlx::query("ALTER DATABASE CURRENT SET plan_cache_mode = force_generic_plan")
        .execute(&app.pool)
        .await
        .ok();
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    let list_before = scans(&app.pool, "resources_list").await;
    for _ in 0..10 {
        for id in &ids {
            let a = app.get(&format!("/v1/tenants/{tenant}/vms/{id}")).await;
            assert_eq!(a.status, StatusCode::OK);
        }
    }
    // A write's lookup too: a label change locks the resource.
    let a = app
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/tenants/{tenant}/vms/{}", ids[0]),
            Some(&app.admin_key),
            Some(&json!({"labels": {"env": "prod"}})),
        )
        .await;
    assert!(a.status.is_success(), "{:?}", a.body);
    // Someone else's ID in my tenant's path is not found, and not locked either.
    let other = app.tenant().await;
    let a = app
        .get(&format!("/v1/tenants/{other}/vms/{}", ids[1]))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = app
        .delete(&format!("/v1/tenants/{other}/vms/{}", ids[1]))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = app
        .get(&format!("/v1/tenants/{tenant}/volumes/{}", ids[1]))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "another kind's path");
    // Statistics reach pg_stat_user_indexes asynchronously: wait until the reads show.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pkey = scans(&app.pool, "resources_pkey").await;
        if pkey >= 30 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pkey} primary-key scans"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The creates' own statistics may land late (PostgreSQL flushes them within a
    // second): a few scans, never one per read as when reads used the list index.
    let list = scans(&app.pool, "resources_list").await - list_before;
    assert!(list < 5, "{list} scans of the list index for 30 reads");
}
