//! Fault injection around PostgreSQL (acceptance 5), with real `gateway serve` and
//! `gateway relay` processes against a private, throwaway PostgreSQL cluster.

use crate::common;
use crate::common::{all_pools, heavy, id_of, nats_url, Deployment, Gateway, Postgres, KINDS};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use workers::{SimConfig, SimDriver};

/// Acceptance 5: PostgreSQL down. Writes answer `503 database_unavailable`, nothing is
/// half-written, and the system recovers by itself when PostgreSQL returns: no process
/// is restarted, operations in flight finish (their workers retry their reports), and
/// new writes are accepted and complete.
///
/// The fault: the private cluster is stopped with `pg_ctl stop -m immediate` (every
/// connection dropped, no checkpoint: a crash) while an operation runs, and started
/// again on the same port.
#[tokio::test]
async fn postgres_down_refuses_writes_cleanly_and_everything_recovers_by_itself() {
    let _heavy = heavy().await;
    let mut pg = Postgres::start();
    let d = Deployment::new(&pg.url(), &nats_url(), &[]).await;
    let api = Gateway::serve(&d.env).await;
    let _relay = Gateway::relay(&d.env);
    // `slow-` names take 3 × 500 ms.
    let sim = SimConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(500),
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    };
    let driver = SimDriver::new(sim);
    let _workers = d
        .workers(&[api.url()], driver.clone(), &all_pools(), 1, 5)
        .await;
    let tenant = d.tenant(&api.url()).await;
    let before = id_of(
        &d.create(&api.url(), &tenant, "vms", "before", "zone-a")
            .await,
    );
    assert_eq!(
        d.wait_terminal(before, Duration::from_secs(30)).await.0,
        "succeeded"
    );
    let in_flight = id_of(
        &d.create(&api.url(), &tenant, "vms", "slow-web", "zone-b")
            .await,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while d.operation(in_flight).await.0 != "running" {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The relay deletes a row after JetStream's ack, which can trail the worker's
    // `running` report: count once the outbox has settled.
    d.wait_outbox_empty(Duration::from_secs(10)).await;
    let counts = "SELECT (SELECT count(*) FROM resources) * 1000000
                       + (SELECT count(*) FROM operations) * 1000
                       + (SELECT count(*) FROM outbox)";
    let before_counts = d.scalar(counts).await;

    pg.crash();
    let (url, d_ref, tenant_ref) = (api.url(), &d, &tenant);
    let refused: Vec<_> = futures::future::join_all(KINDS.iter().map(|kind| {
        let url = url.clone();
        async move {
            d_ref
                .post(
                    &url,
                    &format!("/v1/tenants/{tenant_ref}/{kind}"),
                    json!({"name": "refused", "zone": "zone-a", "spec": common::example_spec(kind)}),
                )
                .await
        }
    }))
    .await;
    for (status, body) in &refused {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["code"], "database_unavailable", "{body}");
    }
    // The worker finished meanwhile and keeps retrying its report (503s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while driver.effects(in_flight) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the driver never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pg.resume();
    let (state, attempt, _) = d.wait_terminal(in_flight, Duration::from_secs(30)).await;
    assert_eq!(
        (state.as_str(), attempt),
        ("succeeded", 1),
        "the report landed once PostgreSQL was back\n{}",
        api.log()
    );
    assert_eq!(
        d.scalar(counts).await,
        before_counts,
        "the refused writes left nothing behind"
    );
    assert_eq!(
        d.scalar("SELECT count(*) FROM resources WHERE name = 'refused'")
            .await,
        0
    );
    // Writes work again, through the same processes.
    let after = d
        .create(&api.url(), &tenant, "vms", "refused", "zone-a")
        .await;
    let (state, ..) = d
        .wait_terminal(id_of(&after), Duration::from_secs(30))
        .await;
    assert_eq!(state, "succeeded");
    d.wait_all_terminal(Duration::from_secs(30)).await;
    assert_eq!(
        d.scalar(
            "SELECT count(*) FROM resources r
             WHERE NOT EXISTS (SELECT 1 FROM operations o WHERE o.resource_id = r.id)"
        )
        .await,
        0,
        "no resource without its operation"
    );
    d.wait_outbox_empty(Duration::from_secs(30)).await;
    assert_eq!(driver.executions(in_flight), 1);
}

/// Group commit through a crash: creates that share transactions when PostgreSQL
/// crashes are each answered on their own, `202` (committed) or `503` (not), and once
/// it is back their clients' retries with the same `Idempotency-Key` leave exactly one
/// resource, operation and message per name: nothing half-written, nothing twice (a
/// batch whose commit went through unanswered is found by its keys).
#[tokio::test]
async fn creates_batched_when_postgres_crashes_end_recorded_once_each_after_retries() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _heavy = heavy().await;
    let mut pg = Postgres::start();
    let d = Deployment::new(&pg.url(), &nats_url(), &[]).await;
    let api = Gateway::serve(&d.env).await;
    let tenant = d.tenant(&api.url()).await;
    const N: usize = 200;
    let create = |i: usize| {
        let (d, url, tenant) = (&d, api.url(), &tenant);
        async move {
            let res = d
                .http
                .post(format!("{url}/v1/tenants/{tenant}/vms"))
                .bearer_auth(&d.env.admin_key)
                .header("Idempotency-Key", format!("batch-{i}"))
                .json(&json!({"name": format!("b{i}"), "zone": "zone-a",
                              "spec": common::example_spec("vms")}))
                .send()
                .await
                .expect("the gateway answers");
            let status = res.status();
            let body: Value = res.json().await.unwrap_or_default();
            (status, body["code"].as_str().unwrap_or_default().to_owned())
        }
    };
    let accepted = AtomicUsize::new(0);
    // Fewer at once than the gateway admits writes (`GATEWAY_MAX_IN_FLIGHT_WRITES`, 32),
    // so none is refused as `overloaded`; enough for batches to form behind the first lane.
    let submit = futures::stream::iter(0..N)
        .map(|i| {
            let (create, accepted) = (&create, &accepted);
            async move {
                let answer = create(i).await;
                if answer.0 == StatusCode::ACCEPTED {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                (i, answer)
            }
        })
        .buffer_unordered(24)
        .collect::<Vec<_>>();
    let crash = async {
        while accepted.load(Ordering::SeqCst) < 40 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pg.crash();
    };
    let (first, ()) = tokio::join!(submit, crash);
    let refused: Vec<usize> = first
        .iter()
        .filter(|(_, (status, _))| *status != StatusCode::ACCEPTED)
        .map(|(i, _)| *i)
        .collect();
    for (i, (status, code)) in &first {
        assert!(
            *status == StatusCode::ACCEPTED
                || (*status == StatusCode::SERVICE_UNAVAILABLE && code == "database_unavailable"),
            "create {i}: {status} {code}"
        );
    }
    assert!(
        !refused.is_empty() && refused.len() < N,
        "{} refused",
        refused.len()
    );
    let batches = common::metric(&api.url(), "gateway_write_batch_size_count").await;
    let batched = common::metric(&api.url(), "gateway_write_batch_size_sum").await;
    assert!(
        batched > batches,
        "creates shared transactions: {batched} in {batches}"
    );

    pg.resume();
    for i in refused {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while create(i).await.0 != StatusCode::ACCEPTED {
            assert!(
                tokio::time::Instant::now() < deadline,
                "create {i} never recorded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let counts: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM resources WHERE name LIKE 'b%'),
                (SELECT count(DISTINCT name) FROM resources WHERE name LIKE 'b%'),
                (SELECT count(*) FROM operations o JOIN resources r ON r.id = o.resource_id
                  WHERE r.name LIKE 'b%'),
                (SELECT count(*) FROM outbox)",
    )
    .fetch_one(&d.pool)
    .await
    .unwrap();
    let n = N as i64;
    assert_eq!(
        counts,
        (n, n, n, n),
        "one resource, operation and message each\n{}",
        api.log()
    );
}

/// A database that takes no writes for a while (a standby, or a primary demoted during a
/// failover, behind the writable address): writes are answered `503
/// database_unavailable` with `Retry-After`, as when it is away, not `500`; reads go on;
/// nothing is half-written; and writes are accepted again once it takes them.
#[tokio::test]
async fn a_read_only_database_refuses_writes_with_503_and_serves_reads() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    // On a connection of its own: a session setting on one of the gateway's pooled
    // connections would outlive this and be used by the gateway.
    let read_only = |on: bool| {
        let url = app.config.database_url.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query("SET default_transaction_read_only = off")
                .execute(&mut conn)
                .await
                .unwrap();
            let db: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let change = if on {
                format!("ALTER DATABASE \"{db}\" SET default_transaction_read_only = on")
            } else {
                format!("ALTER DATABASE \"{db}\" RESET default_transaction_read_only")
            };
            sqlx::query(&change).execute(&mut conn).await.unwrap();
            // Every other session of the database starts again, with the new setting.
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
    };
    read_only(true).await;
    // On a connection of its own too: the gateway's pool may still hold a connection
    // the termination ended, which fails its first use (answered 503 in the gateway).
    let counts = || async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&app.config.database_url)
            .await
            .unwrap();
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM resources), (SELECT count(*) FROM operations),
                    (SELECT count(*) FROM outbox)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let before = counts().await;
    let body = json!({"name": "second", "zone": "zone-a", "spec": common::example_spec("vms")});
    let path = format!("/v1/tenants/{tenant}/vms");
    // The first try may meet a session the termination just ended (also a 503).
    for _ in 0..3 {
        let refused = app.post(&path, body.clone()).await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            "{:?}",
            refused.body
        );
        assert!(refused.header("retry-after").is_some());
    }
    assert_eq!(counts().await, before, "nothing half-written");
    let read = app.get(&format!("/v1/operations/{}", id_of(&first))).await;
    assert_eq!(read.status, StatusCode::OK, "reads go on: {:?}", read.body);

    read_only(false).await;
    common::eventually("writes are accepted again", || async {
        let a = app.post(&path, body.clone()).await;
        (a.status == StatusCode::ACCEPTED).then_some(())
    })
    .await;
}

/// A database out of resources (SQLSTATE class 53: a full disk, no memory, too many
/// connections) is an outage to wait out, not a fault of the request: a create and a
/// worker's report are answered `503 database_unavailable` with `Retry-After` (so the
/// worker retries), nothing of either is written, and both go through once the
/// database has room again.
#[tokio::test]
async fn a_database_out_of_resources_answers_503_and_writes_nothing() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    // The disk "fills up" under the tables a create and a report write.
    sqlx::raw_sql(
        "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'
             USING ERRCODE = 'disk_full'; END $$;
         CREATE TRIGGER full_disk BEFORE INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION full_disk();
         CREATE TRIGGER full_disk BEFORE UPDATE ON operations
             FOR EACH ROW EXECUTE FUNCTION full_disk();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let counts = || async {
        sqlx::query_as::<_, (i64, i64, i64, String)>(
            "SELECT (SELECT count(*) FROM resources), (SELECT count(*) FROM operations),
                    (SELECT count(*) FROM outbox),
                    (SELECT state FROM operations WHERE id = $1::uuid)",
        )
        .bind(&first_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let before = counts().await;
    let path = format!("/v1/tenants/{tenant}/vms");
    let body = json!({"name": "second", "zone": "zone-a", "spec": common::example_spec("vms")});
    let running = json!({"attempt": 1, "state": "running"});
    let create = app.post(&path, body.clone()).await;
    let report = app.report_as_vm_worker(&first_id, running.clone()).await;
    for (what, refused) in [("create", &create), ("report", &report)] {
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            "{what}: {:?}",
            refused.body
        );
        assert!(refused.header("retry-after").is_some(), "{what}");
        let message = refused.body["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("space"),
            "{what}: nothing internal: {message}"
        );
    }
    assert_eq!(counts().await, before, "nothing half-written");

    sqlx::raw_sql("DROP TRIGGER full_disk ON outbox; DROP TRIGGER full_disk ON operations")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(app.post(&path, body).await.status, StatusCode::ACCEPTED);
    let report = app.report_as_vm_worker(&first_id, running).await;
    assert_eq!(report.status, StatusCode::OK, "{:?}", report.body);
}

/// The pool checks a connection before handing it out only once it has been idle for
/// `store::PING_IF_IDLE_FOR` (a round trip saved on every busy acquire). Those are the
/// connections a database restart or an idle timeout may have ended: one ended while
/// idle is replaced before use, and the query on it goes through.
#[tokio::test]
async fn a_connection_ended_while_idle_is_replaced_before_it_is_used() {
    use sqlx::Connection;
    let sandbox = common::Sandbox::new(&common::pg_base(), &nats_url());
    let url = sandbox.database_url();
    // One connection, so the query below can only run on the one that was ended.
    let pool = gateway::store::connect(&url, 1).await.unwrap();
    let before: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(before)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(ended);
    tokio::time::sleep(gateway::store::PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
    let after: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the ended connection was replaced before use");
    assert_ne!(after, before);
    pool.close().await;
}

/// A statement the database cancels — its `statement_timeout` (30 s) ran out, or an
/// operator cancelled it — is the database not answering in time: `503
/// database_unavailable` with `Retry-After`, nothing written, as for an outage (it was
/// `500 internal`).
#[tokio::test]
async fn a_statement_the_database_cancels_is_answered_503_and_writes_nothing() {
    use sqlx::Connection;
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, op) = a_vm(&app, "held").await;
    let id = op["resource_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/tenants/{tenant}/vms/{id}");
    // Another session holds the resource's row lock, so the gateway's change waits.
    let mut holder = sqlx::PgConnection::connect(&app.config.database_url)
        .await
        .unwrap();
    let mut held = sqlx::Connection::begin(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM resources WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *held)
        .await
        .unwrap();
    let patch = {
        let app = common::Client::clone(&app);
        let path = path.clone();
        tokio::spawn(async move {
            app.request(
                reqwest::Method::PATCH,
                &path,
                Some(&app.admin_key),
                Some(&json!({"labels": {"env": "prod"}})),
            )
            .await
        })
    };
    // Cancel the gateway's statement once it waits for the lock.
    let url = app.config.database_url.clone();
    let cancelled = common::eventually("the gateway's change waits for the lock", || {
        let url = url.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'gateway'
                   AND wait_event_type = 'Lock') c",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap();
            (n > 0).then_some(n)
        }
    })
    .await;
    assert_eq!(cancelled, 1);
    let answer = patch.await.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        answer.body
    );
    assert_eq!(answer.code(), "database_unavailable");
    assert!(answer.header("retry-after").is_some());
    held.rollback().await.unwrap();
    // Nothing was written: no label, no second operation.
    let vm = app.get_with(&path, &common::NO_CACHE).await;
    assert_eq!(vm.body["labels"], json!({}));
    let ops: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE resource_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(ops, 1);
}

/// Pooled connections used within the last second are handed out unchecked (a check
/// costs a round trip: `store::PING_IF_IDLE_FOR`). When the database has ended them
/// meanwhile (`pg_terminate_backend`, a proxy dropping connections), the first statement
/// on one fails before anything ran: a key's lookup, a read by ID and a write's `BEGIN`
/// are made again on another connection, so the requests are answered rather than 503.
#[tokio::test]
async fn requests_that_meet_connections_the_database_ended_go_on_on_others() {
    // Every request looks its key up in the database.
    let app = common::spawn_with(common::Options {
        tweak: |c| c.key_cache_ttl = Duration::ZERO,
        ..common::Options::api_only()
    })
    .await;
    let (tenant, first) = a_vm(&app, "first").await;
    let vm = common::vm_path(&tenant, &first);
    let end_every_connection = || end_every_connection(&app, &vm);
    for round in 0..3 {
        end_every_connection().await;
        let read = app.get_with(&vm, &common::NO_CACHE).await;
        assert_eq!(read.status, StatusCode::OK, "round {round}: the read");
        end_every_connection().await;
        let body = json!({"name": format!("after-{round}"), "zone": "zone-a",
                          "spec": common::example_spec("vms")});
        let answer = app.post(&format!("/v1/tenants/{tenant}/vms"), body).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "round {round}: the write: {:?}",
            answer.body
        );
    }
}

/// A create whose caches are warm (key, tenant, zone, catalog) uses the database for one
/// statement only, outside a transaction block: when that statement meets a connection
/// the database ended, it is made again on another with the same IDs. Each create is
/// answered, recorded once and audited once.
#[tokio::test]
async fn a_create_whose_one_statement_meets_an_ended_connection_is_made_once_on_another() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    let vm = common::vm_path(&tenant, &first);
    for round in 0..3 {
        end_every_connection(&app, &vm).await;
        let name = format!("after-{round}");
        let body = json!({"name": name, "zone": "zone-a", "spec": common::example_spec("vms")});
        let answer = app.post(&format!("/v1/tenants/{tenant}/vms"), body).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "round {round}: {:?}",
            answer.body
        );
        let resources = app.count(&format!("resources WHERE name = '{name}'")).await;
        assert_eq!(resources, 1, "round {round}");
        let op = answer.body["id"].as_str().unwrap();
        assert_eq!(
            app.count(&format!("outbox WHERE operation_id = '{op}'"))
                .await,
            1
        );
        let request = answer.header("x-request-id").unwrap().to_owned();
        let audited = format!("request_id = '{request}'");
        app.wait_audit(&audited, 1).await;
        assert_eq!(app.count(&format!("audit_log WHERE {audited}")).await, 1);
    }
}

/// A tenant's first create reads the tenant from the database (the cache keeps only
/// tenants it has seen) on the connection its one statement will use. When the database
/// has ended that connection, the check is made again on another (it only reads), and
/// the create is answered `202`, not `503`.
#[tokio::test]
async fn a_first_create_whose_checks_meet_an_ended_connection_goes_on_on_another() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    let vm = common::vm_path(&tenant, &first);
    for round in 0..3 {
        let fresh = app.tenant().await;
        end_every_connection(&app, &vm).await;
        let body = json!({"name": "vm", "zone": "zone-a", "spec": common::example_spec("vms")});
        let answer = app.post(&format!("/v1/tenants/{fresh}/vms"), body).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "round {round}: {:?}",
            answer.body
        );
        let made = format!("resources WHERE tenant = '{fresh}'");
        assert_eq!(app.count(&made).await, 1, "round {round}");
    }
}

/// A gateway that reaches PostgreSQL through a link the test cuts, a tenant, and a
/// transaction (on a direct connection) holding an uncommitted resource named `cut` in
/// it: a create of that name, once its statement runs, waits for it on the unique index
/// (a lock on the table would hold up the statement's parse instead, before it runs).
struct CutSetup {
    link: crate::common::link::Link,
    app: common::TestApp,
    tenant: String,
    holder: tokio::sync::Mutex<sqlx::PgConnection>,
    watcher: sqlx::PgPool,
}

impl CutSetup {
    async fn new() -> Self {
        use sqlx::Connection;
        let pg = reqwest::Url::parse(&common::pg_base()).unwrap();
        let link = crate::common::link::Link::start(pg.port().unwrap_or(5432)).await;
        let app = common::spawn_with(common::Options {
            database_port: Some(link.port),
            ..common::Options::api_only()
        })
        .await;
        let (tenant, _) = a_vm(&app, "first").await;
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        let direct = format!("{}/{database}", common::pg_base());
        let mut holder = sqlx::PgConnection::connect(&direct).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query(
            "INSERT INTO resources (id, tenant, kind, zone, name, spec, phase)
             VALUES (gen_random_uuid(), $1, 'vm', 'zone-a', 'cut', '{}', 'provisioning')",
        )
        .bind(&tenant)
        .execute(&mut holder)
        .await
        .unwrap();
        let watcher = sqlx::PgPool::connect(&direct).await.unwrap();
        Self {
            link,
            app,
            tenant,
            holder: tokio::sync::Mutex::new(holder),
            watcher,
        }
    }

    /// The create of `cut`, with `key` as its `Idempotency-Key` if any.
    async fn create(&self, key: Option<&str>) -> common::Answer {
        let body = json!({"name": "cut", "zone": "zone-a", "spec": common::example_spec("vms")});
        let mut req = self
            .app
            .http
            .post(format!("{}/v1/tenants/{}/vms", self.app.url, self.tenant))
            .bearer_auth(&self.app.admin_key)
            .json(&body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        common::Answer::read(req.send().await.unwrap()).await
    }

    /// Waits until `n` statements of the gateway wait for a lock.
    async fn until_waiting(&self, n: i64) {
        let waiting = "SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.scalar(waiting).await < n {
            assert!(tokio::time::Instant::now() < deadline, "{n} never waited");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.watcher)
            .await
            .unwrap()
    }

    /// Lets the name go (the holder rolls back).
    async fn release(&self) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *self.holder.lock().await)
            .await
            .unwrap();
    }

    /// Resources named `cut`, and the operations on them.
    async fn made(&self) -> (i64, i64) {
        let resources = self
            .scalar("SELECT count(*) FROM resources WHERE name = 'cut'")
            .await;
        let ops = self
            .scalar(
                "SELECT count(*) FROM operations o JOIN resources r ON r.id = o.resource_id
                 WHERE r.name = 'cut'",
            )
            .await;
        (resources, ops)
    }
}

/// A create's one statement is its own transaction: if the connection is lost while it
/// runs (a network cut), it may still commit, and the gateway cannot tell. Here the
/// network stays down: the create is answered `503` (its run again on another
/// connection cannot connect); the first statement commits once the name it waited for
/// is free; the client's retry with the same `Idempotency-Key` is answered with that
/// operation, and the resource exists once.
#[tokio::test]
async fn a_create_whose_connection_is_cut_mid_statement_is_answered_503_and_found_by_its_key() {
    let s = CutSetup::new().await;
    let cut = async {
        s.until_waiting(1).await;
        s.link.cut();
    };
    let (first, ()) = tokio::join!(s.create(Some("cut-key")), cut);
    assert_eq!(
        (first.status, first.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
        "{:?}",
        first.body
    );
    s.link.restore();
    s.release().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.made().await != (1, 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cut statement did not commit: {:?}",
            s.made().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client retries as a `503` asks it to (the gateway answers `503` until its
    // database check passes again).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let again = s.create(Some("cut-key")).await;
        if again.status != StatusCode::SERVICE_UNAVAILABLE {
            break again;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:?}", again.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    assert_eq!(s.made().await, (1, 1));
    let op = again.body["id"].as_str().unwrap();
    let recorded = format!("SELECT count(*) FROM operations WHERE id = '{op}'");
    assert_eq!(s.scalar(&recorded).await, 1);
    // Without the key, the same create meets its own resource, and the refusal names it:
    // a client whose keyless create was cut off can tell it made the resource after all.
    let keyless = s.create(None).await;
    assert_eq!(
        (keyless.status, keyless.code()),
        (StatusCode::CONFLICT, "name_taken")
    );
    assert_eq!(
        keyless.body["details"]["resource_id"], again.body["resource_id"],
        "{:?}",
        keyless.body
    );
}

/// A cut the network recovers from at once: the create's statement is run again on a
/// new connection with the same IDs while the first run still waits on the database.
/// Whichever inserts first, the other fails on its rows, and the create is answered
/// `202` with one resource and one operation.
#[tokio::test]
async fn a_create_whose_connection_is_cut_mid_statement_is_made_once_on_another() {
    let s = CutSetup::new().await;
    let cut = async {
        s.until_waiting(1).await;
        s.link.cut();
        s.link.restore();
        // The first run and the second both wait for the name.
        s.until_waiting(2).await;
        s.release().await;
    };
    let (answer, ()) = tokio::join!(s.create(None), cut);
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "a run still waits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.made().await, (1, 1));
    let op = answer.body["id"].as_str().unwrap();
    let recorded = format!("SELECT count(*) FROM operations WHERE id = '{op}'");
    assert_eq!(s.scalar(&recorded).await, 1);
}

/// Lists and other reads, each the first to use the database after it ended every
/// connection the gateway had just used (the key is cached, so the read itself meets the
/// ended connection): each is answered, on a new connection.
#[tokio::test]
async fn reads_that_meet_connections_the_database_ended_go_on_on_others() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    let vm = common::vm_path(&tenant, &first);
    let reads = [
        format!("/v1/tenants/{tenant}/vms"),
        format!("/v1/tenants/{tenant}/operations"),
        format!("/v1/tenants/{tenant}/quotas"),
        format!("/v1/tenants/{tenant}/keys"),
        format!("/v1/tenants/{tenant}/webhooks"),
        format!("/v1/tenants/{tenant}"),
        "/v1/tenants".to_owned(),
        "/v1/zones".to_owned(),
        "/v1/catalog/flavor".to_owned(),
        "/v1/resource-types".to_owned(),
        "/v1/audit".to_owned(),
    ];
    for path in &reads {
        end_every_connection(&app, &vm).await;
        let read = app.get(path).await;
        assert_eq!(read.status, StatusCode::OK, "{path}: {:?}", read.body);
    }
}

/// The relay's passes and the audit sealer begin on a connection the database has not
/// ended: the first of each after the database ended every pooled connection does its
/// work, rather than failing and backing off.
#[tokio::test]
async fn background_passes_after_the_database_ended_its_connections_go_on_on_others() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let (tenant, first) = a_vm(&app, "first").await;
    let vm = common::vm_path(&tenant, &first);
    let relay = crate::outbox::relay_for(&app);
    end_every_connection(&app, &vm).await;
    let pass = relay.pass().await.expect("the dispatch pass goes on");
    assert_eq!(pass.published, 1);
    end_every_connection(&app, &vm).await;
    let events = relay.events_pass().await.expect("the events pass goes on");
    assert!(events.published > 0);
    end_every_connection(&app, &vm).await;
    // The gateway's own sealer runs beside it: how many rows are left to seal varies.
    gateway::audit::seal(&app.pool)
        .await
        .expect("the sealer goes on");
}

/// Uses several of `app`'s pooled connections at once (reads of `path` from the
/// database), as load does, then has the database end every connection the gateway holds.
async fn end_every_connection(app: &common::TestApp, path: &str) {
    use sqlx::Connection;
    let warm = (0..8).map(|_| app.get_with(path, &common::NO_CACHE));
    futures::future::join_all(warm).await;
    let mut admin = sqlx::PgConnection::connect(&app.config.database_url)
        .await
        .unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'gateway') t",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended > 0);
}

/// A new tenant of `app` and the create of VM `name` in it (in `zone-a`).
async fn a_vm(app: &common::TestApp, name: &str) -> (String, Value) {
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", name, "zone-a", common::example_spec("vms"))
        .await;
    (tenant, op)
}

/// A proxy to PostgreSQL on `127.0.0.1:5432` that holds each answer 5 ms: a slow
/// database, so a request can be given up while its statement's answer is on its way.
async fn slow_answers() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", 5432))
                .await
                .unwrap();
            let (mut from_client, mut to_client) = tokio::io::split(client);
            let (mut from_server, mut to_server) = tokio::io::split(server);
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = from_server.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_begin_cancelled_midway_leaves_no_transaction_on_the_pooled_connection() {
    let app = common::spawn_with(common::Options::api_only()).await;
    let port = slow_answers().await;
    let url = app
        .config
        .database_url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
    let url = match url.contains('?') {
        true => format!("{url}&sslmode=disable"),
        false => format!("{url}?sslmode=disable"),
    };
    assert!(url.contains(&format!(":{port}/")), "{url}");
    // One connection, so every begin and the check below use the same session.
    let pool = gateway::store::connect(&url, 1).await.unwrap();
    // Inside one transaction `now()` stands still; statements of their own move it.
    let in_one_transaction = || async {
        let now = "SELECT now()";
        let first: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar(now).fetch_one(&pool).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar(now).fetch_one(&pool).await.unwrap();
        first == second
    };
    assert!(!in_one_transaction().await, "the check itself");
    // Begins given up while their `BEGIN`'s answer is on its way (a client gone, a
    // request's deadline): the window sqlx 0.8.6 leaks a transaction in.
    for _ in 0..10 {
        let begin = gateway::store::begin(&pool);
        let _ = tokio::time::timeout(Duration::from_millis(2), begin).await;
    }
    assert!(
        !in_one_transaction().await,
        "a cancelled begin left its connection inside a transaction"
    );
}
