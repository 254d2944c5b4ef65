//! Fault injection around the relay and NATS, with real `gateway serve` and `gateway
//! relay` processes: a relay killed between publish and delete (acceptance 1), and NATS
//! down for 20 s while clients keep submitting (acceptance 2).

use crate::common::{
    all_pools, fast_sim, heavy, id_of, nats_url, pg_base, Deployment, Gateway, Nats, KINDS, ZONES,
};
use std::time::Duration;
use workers::SimDriver;

/// Acceptance 1: kill the relay between publish and delete; every operation still
/// completes, once.
///
/// How the fault is injected: a real crash, not a test hook. A statement trigger on
/// `DELETE FROM outbox` in this test's database sleeps the first time it fires (a
/// sequence counts firings; sequences ignore rollbacks, so the crash does not re-arm
/// it). The first relay therefore publishes its whole batch, gets JetStream's acks, and
/// then sits in the statement (its `DELETE`) that would remove the rows and mark the
/// operations `dispatched`. The test waits until that `DELETE` runs, checks that the
/// messages are in JetStream while the rows are still in the outbox, and `SIGKILL`s the
/// relay process. PostgreSQL notices the dead client (`client_connection_check_interval`)
/// and rolls the transaction back, as it would after any crash, so the rows are there
/// and unlocked. A second relay publishes them again under the same `Nats-Msg-Id`;
/// JetStream drops every copy; each operation is executed exactly once.
#[tokio::test]
async fn a_relay_killed_between_publish_and_delete_loses_nothing_and_runs_nothing_twice() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "ALTER DATABASE \"{database}\" SET client_connection_check_interval = '100ms';
         CREATE SEQUENCE relay_crash;
         CREATE FUNCTION hang_first_delete() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('relay_crash') = 1 THEN PERFORM pg_sleep(60); END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER hang_first_delete BEFORE DELETE ON outbox
             FOR EACH STATEMENT EXECUTE FUNCTION hang_first_delete();"
    ))
    .execute(&d.pool)
    .await
    .unwrap();

    let api = Gateway::serve(&d.env).await;
    let tenant = d.tenant(&api.url()).await;
    let mut ops = Vec::new();
    for kind in KINDS {
        for zone in ZONES {
            for i in 0..3 {
                let op = d
                    .create(&api.url(), &tenant, kind, &format!("r{i}-{zone}"), zone)
                    .await;
                ops.push(id_of(&op));
            }
        }
    }
    let n = ops.len() as i64;
    assert_eq!(d.scalar("SELECT count(*) FROM outbox").await, n);

    let mut doomed = Gateway::relay(&d.env);
    // The statement that records a pass deletes the rows in one of its CTEs.
    let in_delete = "SELECT count(*) FROM pg_stat_activity
                     WHERE query LIKE '%DELETE FROM outbox%' AND state = 'active'
                       AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while d.scalar(in_delete).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never reached its DELETE:\n{}",
            doomed.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        d.stream_messages().await,
        n as u64,
        "the relay published every row before deleting"
    );
    assert_eq!(d.scalar("SELECT count(*) FROM outbox").await, n);
    doomed.kill();

    // PostgreSQL sees the client gone and rolls its transaction back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while d.scalar(in_delete).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead relay's transaction lives on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        d.scalar("SELECT count(*) FROM outbox").await,
        n,
        "published, not deleted"
    );
    assert_eq!(
        d.scalar("SELECT count(*) FROM operations WHERE state = 'pending'")
            .await,
        n
    );

    let driver = SimDriver::new(fast_sim());
    let _workers = d
        .workers(&[api.url()], driver.clone(), &all_pools(), 1, 5)
        .await;
    let _relay = Gateway::relay(&d.env);
    d.wait_all_terminal(Duration::from_secs(60)).await;
    for id in &ops {
        let (state, attempt, _) = d.operation(*id).await;
        assert_eq!((state.as_str(), attempt), ("succeeded", 1), "{id}");
        assert_eq!(driver.executions(*id), 1, "{id}: delivered once");
        assert_eq!(driver.effects(*id), 1, "{id}");
    }
    d.wait_outbox_empty(Duration::from_secs(30)).await;
    assert_eq!(
        d.scalar("SELECT count(*) FROM operations WHERE stream_seq IS NULL")
            .await,
        0,
        "the second relay recorded where each message went"
    );
    d.wait_stream_empty(Duration::from_secs(15)).await;
}

/// Acceptance 2: NATS down for 20 s while clients keep submitting. The API keeps
/// answering `202` (the outbox grows), and once NATS is back every operation completes,
/// once.
///
/// The fault: a private `nats-server` (store in a temporary directory) is `SIGKILL`ed
/// and started again on the same port and store 20 s later; gateway, relay and workers
/// reconnect by themselves.
#[tokio::test]
async fn nats_down_for_twenty_seconds_delays_operations_but_loses_none() {
    let _heavy = heavy().await;
    let mut nats = Nats::start();
    let Running {
        d,
        api,
        relay,
        _workers,
        tenant,
        driver,
        before,
    } = Running::start(&nats, &[("METRICS_REFRESH_MS", "100")]).await;

    nats.kill();
    let outage = tokio::time::Instant::now();
    let mut during = Vec::new();
    let mut backlog = 0;
    while outage.elapsed() < Duration::from_secs(20) {
        let i = during.len();
        let (kind, zone) = (KINDS[i % 4], ZONES[(i / 4) % 2]);
        let started = tokio::time::Instant::now();
        // `create` asserts the 202.
        let op = d
            .create(&api.url(), &tenant, kind, &format!("during-{i}"), zone)
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a write waited {:?} on NATS",
            started.elapsed()
        );
        during.push(id_of(&op));
        let now = d.scalar("SELECT count(*) FROM outbox").await;
        assert!(now > backlog, "the outbox grows: {now} after {backlog}");
        backlog = now;
        // Pacing the clients, not waiting for anything.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Writes kept coming the whole outage (paced at 4/s; a loaded CI machine is slower).
    assert!(during.len() >= 10, "{}", during.len());
    assert_eq!(
        backlog,
        during.len() as i64,
        "every write waits in the outbox"
    );
    let unlocked: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox FOR UPDATE SKIP LOCKED")
        .fetch_all(&d.pool)
        .await
        .unwrap();
    assert_eq!(
        unlocked.len() as i64,
        backlog,
        "a relay cut off from NATS holds no rows (no long transactions)"
    );
    for id in &during {
        assert_eq!(d.operation(*id).await.0, "pending");
    }
    // Operators see the backlog on /metrics while NATS is down …
    let pending = async || d.metric(&api.url(), "gateway_outbox_pending").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pending().await < backlog as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway_outbox_pending never showed {backlog}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The API stays ready (it takes writes) and says NATS is down; the relay, whose
    // work needs NATS, is not ready.
    let ready = |url: String| {
        let http = d.http.clone();
        async move {
            let res = http.get(format!("{url}/readyz")).send().await.unwrap();
            (res.status(), res.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = ready(api.url()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "ok", "{body}");
    assert!(
        body["nats"].as_str().unwrap().starts_with("unavailable"),
        "{body}"
    );
    let (status, body) = ready(relay.url()).await;
    assert_eq!(status, 503, "{body}");

    nats.resume();
    d.wait_all_terminal(Duration::from_secs(60)).await;
    let (status, body) = ready(relay.url()).await;
    assert_eq!(status, 200, "the relay is ready again: {body}");
    for id in during.iter().chain([&before]) {
        let (state, ..) = d.operation(*id).await;
        assert_eq!(state, "succeeded", "{id}\nrelay:\n{}", relay.log());
        assert_eq!(driver.executions(*id), 1, "{id}: delivered once");
        assert_eq!(driver.effects(*id), 1, "{id}");
    }
    d.wait_outbox_empty(Duration::from_secs(30)).await;
    d.wait_stream_empty(Duration::from_secs(15)).await;
    // … and see it drain once NATS is back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pending().await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway_outbox_pending never drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A NATS server that lost its store (a disk replaced) comes back empty: the relay makes
/// the deployment's streams and consumers again within seconds, and operations go on.
/// Nothing was published (new operations stayed `pending`) until a `gateway migrate`
/// or a restart of `up` (found by an outside probe).
#[tokio::test]
async fn a_nats_server_that_lost_its_store_gets_its_streams_back_and_work_goes_on() {
    let _heavy = heavy().await;
    let mut nats = Nats::start();
    let Running {
        d,
        api,
        relay: _relay,
        _workers,
        tenant,
        ..
    } = Running::start(&nats, &[]).await;
    nats.kill();
    std::fs::remove_dir_all(nats.store()).unwrap();
    nats.resume();
    let after = id_of(
        &d.create(&api.url(), &tenant, "vms", "after", "zone-a")
            .await,
    );
    let (state, ..) = d.wait_terminal(after, Duration::from_secs(60)).await;
    assert_eq!(state, "succeeded");
}

/// A deployment on `nats` (publishes time out after 1 s; `extra` settings too): `gateway
/// serve`, `gateway relay`, workers for every pool (their driver), and a tenant whose
/// first VM was made (`before`, its operation).
struct Running {
    d: Deployment,
    api: Gateway,
    relay: Gateway,
    _workers: crate::common::Workers,
    tenant: String,
    driver: SimDriver,
    before: uuid::Uuid,
}

impl Running {
    async fn start(nats: &Nats, extra: &[(&str, &str)]) -> Self {
        let settings: Vec<(&str, &str)> = std::iter::once(("NATS_PUBLISH_TIMEOUT_MS", "1000"))
            .chain(extra.iter().copied())
            .collect();
        let d = Deployment::new(&pg_base(), &nats.url(), &settings).await;
        let api = Gateway::serve(&d.env).await;
        let relay = Gateway::relay(&d.env);
        let driver = SimDriver::new(fast_sim());
        let workers = d
            .workers(&[api.url()], driver.clone(), &all_pools(), 1, 5)
            .await;
        let tenant = d.tenant(&api.url()).await;
        let before = id_of(
            &d.create(&api.url(), &tenant, "vms", "before", "zone-a")
                .await,
        );
        let (state, ..) = d.wait_terminal(before, Duration::from_secs(30)).await;
        assert_eq!(state, "succeeded");
        Self {
            d,
            api,
            relay,
            _workers: workers,
            tenant,
            driver,
            before,
        }
    }
}
