//! Reads stay flat as a tenant grows: a resource read or a write's lookup uses the
//! primary key, never a scan of the tenant's resources (issue 12).

use crate::common::{example_spec, spawn_with, vm_path, Options};
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
    // Every read reaches the database: the read cache is off.
    let app = spawn_with(Options {
        tweak: |c| c.read_cache_ttl = std::time::Duration::ZERO,
        ..Options::api_only()
    })
    .await;
    let tenant = app.tenant().await;
    let ids: Vec<String> = app
        .create_vms(&tenant, 3)
        .await
        .iter()
        .map(|op| op["resource_id"].as_str().unwrap().to_owned())
        .collect();
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

/// A second gateway (API only) on `app`'s database and NATS, as a second replica, and
/// an admin client of it.
async fn replica(app: &crate::common::TestApp) -> (gateway::app::Running, crate::common::Client) {
    let backends = gateway::app::connect(&app.config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let parts = gateway::app::Parts {
        api: true,
        ..Default::default()
    };
    let running = gateway::app::start(&app.config, backends, Some(listener), parts)
        .await
        .unwrap();
    let client = crate::common::Client {
        url: format!("http://{}", running.addr.unwrap()),
        ..crate::common::Client::clone(app)
    };
    (running, client)
}

#[tokio::test]
async fn a_change_through_one_replica_drops_every_replicas_cached_reads() {
    // Entries would live a minute: only the change notifications can refresh them.
    let app = spawn_with(Options {
        tweak: |c| c.read_cache_ttl = std::time::Duration::from_secs(60),
        ..Options::api_only()
    })
    .await;
    let (running, other) = replica(&app).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "cached", "zone-a", example_spec("vms"))
        .await;
    let vm = vm_path(&tenant, &op);
    let op_path = format!("/v1/operations/{}", op["id"].as_str().unwrap());
    let misses = || {
        crate::common::metric(
            &other.url,
            r#"gateway_cache_requests_total{cache="resources",result="miss"}"#,
        )
    };

    // The other replica caches both reads.
    assert_eq!(other.get(&vm).await.body["labels"], json!({}));
    assert_eq!(other.get(&op_path).await.body["state"], "pending");
    let missed = misses().await;
    assert!(missed >= 1.0);
    other.get(&vm).await;
    assert_eq!(misses().await, missed, "a hit");

    // Proof that it serves from memory: a change made behind the gateway's back (SQL)
    // is not seen, unless the request asks for a fresh read (in any of the ways HTTP
    // has to ask).
    sqlx::query("UPDATE resources SET labels = '{\"by\": \"sql\"}' WHERE id = $1::uuid")
        .bind(op["resource_id"].as_str().unwrap())
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(other.get(&vm).await.body["labels"], json!({}));
    for fresh in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("cache-control", "private, No-Store"),
        ("pragma", "no-cache"),
    ] {
        assert_eq!(
            other.get_with(&vm, &[fresh]).await.body["labels"],
            json!({"by": "sql"}),
            "{fresh:?} reads the database"
        );
    }
    assert_eq!(
        other
            .get_with(&vm, &[("cache-control", "max-age=60")])
            .await
            .body["labels"],
        json!({}),
        "other directives leave the cache in use"
    );

    // A change through this replica: seen here at once, and there within moments
    // (a notification on NATS), not after the entries' minute.
    label_prod(&app, &vm).await;
    assert_eq!(app.get(&vm).await.body["labels"]["env"], "prod");
    let id = op["id"].as_str().unwrap();
    let started = app
        .report_as_vm_worker(id, json!({"attempt": 1, "state": "running"}))
        .await;
    assert_eq!(started.status, StatusCode::OK, "{:?}", started.body);
    assert_eq!(app.get(&op_path).await.body["state"], "running");
    crate::common::eventually("the other replica serves the changed rows", || async {
        let vm = other.get(&vm).await.body;
        let op = other.get(&op_path).await.body;
        (vm["labels"]["env"] == "prod" && op["state"] == "running").then_some(())
    })
    .await;
    running.stop().await;
}

/// Changes announced while a replica's NATS connection was down are never heard: once
/// it is connected again, the replica forgets everything it cached before.
#[tokio::test]
async fn a_replica_that_lost_nats_forgets_what_it_cached_before() {
    let mut nats = crate::common::Nats::start();
    let d = crate::common::Deployment::new(
        &crate::common::pg_base(),
        &nats.url(),
        // Entries would live a minute: only forgetting them can make the read fresh.
        &[("GATEWAY_READ_CACHE_MS", "60000")],
    )
    .await;
    let [(a, ca), (_b, cb)] = d.two_replicas().await;
    let tenant = d.tenant(&a.url()).await;
    let op = ca
        .create(&tenant, "vms", "kept", "zone-a", example_spec("vms"))
        .await;
    let vm = vm_path(&tenant, &op);
    assert_eq!(cb.get(&vm).await.body["labels"], json!({}));
    // NATS goes away; a change made meanwhile is announced to no one. The replica,
    // which cannot hear changes now, reads the database meanwhile.
    nats.kill();
    label_prod(&ca, &vm).await;
    crate::common::eventually("the other replica reads the database", || async {
        (cb.get(&vm).await.body["labels"]["env"] == "prod").then_some(())
    })
    .await;
    // Those reads were not kept, and once NATS is back the entry from before the outage
    // is gone too.
    nats.resume();
    crate::common::eventually("the other replica reads the change", || async {
        (cb.get(&vm).await.body["labels"]["env"] == "prod").then_some(())
    })
    .await;
}

/// A resource read with `If-None-Match` naming the version the client holds answers
/// `304 Not Modified` with the `ETag` and no body; a changed resource answers in full.
#[tokio::test]
async fn a_read_naming_the_current_version_is_answered_not_modified() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "etag", "zone-a", example_spec("vms"))
        .await;
    let path = vm_path(&tenant, &op);
    let read = |tags: Option<&'static str>| {
        let mut req = app
            .http
            .get(format!("{}{path}", app.url))
            .bearer_auth(&app.admin_key);
        if let Some(tags) = tags {
            req = req.header("if-none-match", tags);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status();
            let etag = res.headers()["etag"].to_str().unwrap().to_owned();
            let body = res.bytes().await.unwrap();
            (status, etag, body.len())
        }
    };
    let (status, etag, len) = read(None).await;
    assert_eq!((status, etag.as_str()), (StatusCode::OK, "\"1\""));
    assert!(len > 0);
    for held in ["\"1\"", "W/\"1\"", "\"7\", \"1\"", "*", "1"] {
        let (status, tag, len) = read(Some(held)).await;
        assert_eq!(
            (status, tag.as_str(), len),
            (StatusCode::NOT_MODIFIED, "\"1\"", 0),
            "If-None-Match: {held}"
        );
    }
    for other in ["\"2\"", "nonsense", "\"\""] {
        let (status, _, len) = read(Some(other)).await;
        assert_eq!(status, StatusCode::OK, "If-None-Match: {other}");
        assert!(len > 0);
    }
    // A change makes a new version: the old tag gets the whole resource again.
    label_prod(&app, &path).await;
    let (status, tag, _) = read(Some("\"1\"")).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(tag, "\"1\"");

    // The client's conditional read: nothing while the version holds, the resource once
    // it changed.
    let client = app.typed();
    let id: uuid::Uuid = op["resource_id"].as_str().unwrap().parse().unwrap();
    let now = client.get_resource(&tenant, "vms", id).await.unwrap();
    let held = now.etag.clone().unwrap();
    assert_eq!(held, tag);
    let unchanged = client
        .get_resource_if_changed(&tenant, "vms", id, &held)
        .await;
    assert!(unchanged.unwrap().is_none());
    let changed = client
        .get_resource_if_changed(&tenant, "vms", id, "\"1\"")
        .await
        .unwrap()
        .expect("the resource changed since version 1");
    assert_eq!(changed.etag.as_deref(), Some(held.as_str()));
}

/// Labels the resource at `path` `env=prod` through `client`; the change is accepted.
async fn label_prod(client: &crate::common::Client, path: &str) {
    let patch = client
        .request(
            reqwest::Method::PATCH,
            path,
            Some(&client.admin_key),
            Some(&json!({"labels": {"env": "prod"}})),
        )
        .await;
    assert_eq!(patch.status, StatusCode::ACCEPTED, "{:?}", patch.body);
}
