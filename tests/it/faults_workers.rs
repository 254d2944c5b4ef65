//! Fault injection around workers, with real `gateway serve` and `gateway relay`
//! processes and in-process worker pools standing in for worker processes: a worker
//! killed mid-operation (acceptance 3), the gateway down while a worker reports
//! (acceptance 4), and poison messages (acceptance 6).

use crate::common::{fast_sim, free_port, heavy, id_of, nats_url, pg_base, Deployment, Gateway};
use gateway_proto::{Dispatch, Service};
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;
use workers::{Driver, DriverError, SimConfig, SimDriver};

fn latency(max_ms: u64) -> SimConfig {
    SimConfig {
        max_latency: Duration::from_millis(max_ms),
        ..fast_sim()
    }
}

/// Polls `cond` every 20 ms until it holds; fails with `what` after `timeout`.
async fn until<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(messages awaiting ack, messages in the stream)` of the `vm-zone-a` pool.
async fn pool_backlog(d: &Deployment) -> (usize, u64) {
    let js = d.jetstream().await;
    let mut stream = js.get_stream(&d.names.stream).await.unwrap();
    let info = stream
        .consumer_info(gateway_proto::consumer_name(
            &Service::named("vm"),
            "zone-a",
        ))
        .await
        .unwrap();
    (
        info.num_ack_pending,
        stream.info().await.unwrap().state.messages,
    )
}

/// Acceptance 3: kill a worker in the middle of an operation; the message is delivered
/// again and the operation completes once: the driver saw it twice and created once.
///
/// The fault: the worker pool task is aborted while its driver is inside the
/// operation: nothing is reported, acknowledged or handed back, and its NATS
/// connection closes, as when a worker process is killed. The pool consumer's ack wait
/// is shortened (by re-applying the definitions) so the redelivery comes in seconds.
#[tokio::test]
async fn a_worker_killed_mid_operation_is_replaced_and_the_operation_completes_once() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    d.apply_definitions(|defs| {
        defs.pool_consumer.ack_wait_seconds = 3;
        defs.pool_consumer.backoff_seconds = vec![];
    })
    .await;
    let api = Gateway::serve(&d.env).await;
    let _relay = Gateway::relay(&d.env);
    // `slow-` names take 3 × 400 ms: long enough to be killed in, shorter than ack wait.
    let driver = SimDriver::new(latency(400));
    let pools = [(Service::named("vm"), "zone-a")];
    let doomed = d.workers(&[api.url()], driver.clone(), &pools, 1, 5).await;
    let tenant = d.tenant(&api.url()).await;
    let op = id_of(
        &d.create(&api.url(), &tenant, "vms", "slow-web", "zone-a")
            .await,
    );

    until(Duration::from_secs(20), "the driver starts", || async {
        driver.executions(op) == 1
    })
    .await;
    doomed.kill().await;
    let (state, attempt, _) = d.operation(op).await;
    assert_eq!((state.as_str(), attempt), ("running", 1));
    assert_eq!(driver.effects(op), 0, "killed before the effect");

    let _replacement = d.workers(&[api.url()], driver.clone(), &pools, 1, 5).await;
    let (state, attempt, _) = d.wait_terminal(op, Duration::from_secs(30)).await;
    assert_eq!(
        (state.as_str(), attempt),
        ("succeeded", 2),
        "delivered again"
    );
    assert_eq!(driver.executions(op), 2, "the driver saw it twice");
    assert_eq!(driver.effects(op), 1, "and created once");
    until(
        Duration::from_secs(10),
        "the message is acknowledged",
        || async { pool_backlog(&d).await == (0, 0) },
    )
    .await;
}

/// Acceptance 4: the gateway is down while a worker reports; the worker retries, the
/// report lands when the gateway is back, and only then is the message acknowledged.
///
/// The fault: the only `gateway serve` process is `SIGKILL`ed while the worker's driver
/// runs, and a new one is started on the same port a few seconds after the driver is
/// done.
#[tokio::test]
async fn a_report_sent_while_the_gateway_is_down_lands_when_it_returns_and_then_is_acked() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let port = free_port();
    let mut api = Gateway::serve_on(&d.env, port).await;
    let _relay = Gateway::relay(&d.env);
    // `slow-` names take 3 × 600 ms.
    let driver = SimDriver::new(latency(600));
    let _workers = d
        .workers(
            &[api.url()],
            driver.clone(),
            &[(Service::named("vm"), "zone-a")],
            1,
            5,
        )
        .await;
    let tenant = d.tenant(&api.url()).await;
    let op = id_of(
        &d.create(&api.url(), &tenant, "vms", "slow-web", "zone-a")
            .await,
    );
    // Running in the database is not enough: the gateway commits before it answers, and
    // a kill in between leaves the worker retrying its `running` report instead of
    // driving. The driver starting means the worker has its answer.
    until(
        Duration::from_secs(20),
        "the worker reports running and its driver starts",
        || async { d.operation(op).await.0 == "running" && driver.executions(op) == 1 },
    )
    .await;
    api.kill();

    until(Duration::from_secs(20), "the driver finishes", || async {
        driver.effects(op) == 1
    })
    .await;
    // The gateway stays down for 3 s after the work is done: the worker keeps trying,
    // and holds the message unacknowledged all along.
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        assert_eq!(d.operation(op).await.0, "running");
        assert_eq!(
            pool_backlog(&d).await,
            (1, 1),
            "not acknowledged before the report lands"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let _api = Gateway::serve_on(&d.env, port).await;
    let (state, attempt, _) = d.wait_terminal(op, Duration::from_secs(30)).await;
    assert_eq!((state.as_str(), attempt), ("succeeded", 1));
    until(
        Duration::from_secs(10),
        "the message is acknowledged",
        || async { pool_backlog(&d).await == (0, 0) },
    )
    .await;
    assert_eq!(driver.executions(op), 1, "never delivered again");
}

/// A driver that always fails transiently on resources named `poison-…`, and is the
/// simulated driver for everything else.
#[derive(Clone)]
struct Poisoned(SimDriver);

impl Driver for Poisoned {
    async fn execute(&self, op: &Dispatch) -> Result<Value, DriverError> {
        if op.name.starts_with("poison-") {
            return Err(DriverError::Transient("the backend times out".into()));
        }
        self.0.execute(op).await
    }
}

/// Submits a poison operation then `others` ordinary ones on the same pool; checks that
/// the ordinary ones all complete while the poison one is still being retried.
async fn poison_and_others(d: &Deployment, api: &str, others: usize) -> (Uuid, Vec<Uuid>) {
    let tenant = d.tenant(api).await;
    let poison = id_of(&d.create(api, &tenant, "vms", "poison-web", "zone-a").await);
    let mut ok = Vec::new();
    for i in 0..others {
        ok.push(id_of(
            &d.create(api, &tenant, "vms", &format!("web-{i}"), "zone-a")
                .await,
        ));
    }
    for id in &ok {
        let (state, ..) = d.wait_terminal(*id, Duration::from_secs(30)).await;
        assert_eq!(state, "succeeded");
    }
    let (state, ..) = d.operation(poison).await;
    assert!(
        ["dispatched", "running"].contains(&state.as_str()),
        "the queue flowed past the poison message while it was retried: {state}"
    );
    (poison, ok)
}

/// Acceptance 6, as the worker sees it: a message whose driver always fails
/// transiently is handed back with a growing delay, and on the consumer's last delivery
/// the worker fails the operation (`retries_exhausted`). Other operations of the same
/// pool flow meanwhile. A `fail-` resource fails permanently at once, and the
/// terminated-message advisory that follows leaves its outcome alone.
#[tokio::test]
async fn a_poison_message_fails_after_max_deliver_while_the_queue_keeps_flowing() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    d.apply_definitions(|defs| {
        defs.pool_consumer.max_deliver = 3;
        defs.pool_consumer.backoff_seconds = vec![];
    })
    .await;
    let api = Gateway::serve(&d.env).await;
    let _relay = Gateway::relay(&d.env);
    let driver = Poisoned(SimDriver::new(fast_sim()));
    let _workers = d
        .workers(
            &[api.url()],
            driver.clone(),
            &[(Service::named("vm"), "zone-a")],
            2,
            3,
        )
        .await;
    let (poison, _) = poison_and_others(&d, &api.url(), 16).await;
    let tenant = d.tenant(&api.url()).await;
    let permanent = id_of(
        &d.create(&api.url(), &tenant, "vms", "fail-web", "zone-a")
            .await,
    );

    let (state, attempt, code) = d.wait_terminal(poison, Duration::from_secs(40)).await;
    assert_eq!(
        (state.as_str(), attempt, code.as_deref()),
        ("failed", 3, Some("retries_exhausted"))
    );
    let (state, attempt, code) = d.wait_terminal(permanent, Duration::from_secs(20)).await;
    assert_eq!(
        (state.as_str(), attempt, code.as_deref()),
        ("failed", 1, Some("simulated_failure"))
    );
    until(Duration::from_secs(10), "every message is gone", || async {
        pool_backlog(&d).await == (0, 0)
    })
    .await;
    // Both terminated messages raised advisories; the gateway handled them (they leave
    // the advisory stream) without touching the outcomes.
    let js = d.jetstream().await;
    let advisories = gateway::jetstream::advisory_stream_name(&d.names);
    until(
        Duration::from_secs(20),
        "the advisories are handled",
        || async {
            let mut s = js.get_stream(&advisories).await.unwrap();
            s.info().await.unwrap().state.messages == 0
        },
    )
    .await;
    assert_eq!(
        d.operation(permanent).await.2.as_deref(),
        Some("simulated_failure")
    );
}

/// Acceptance 6, as JetStream sees it: workers that never give up (they do not know
/// `max_deliver`, or crash on the message) keep handing it back until JetStream stops
/// delivering it. The `MAX_DELIVERIES` advisory makes the gateway fail the operation
/// (`delivery_exhausted`) and delete the dead message; the queue flows meanwhile.
#[tokio::test]
async fn a_message_jetstream_gives_up_on_is_dead_lettered_and_removed() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    d.apply_definitions(|defs| {
        defs.pool_consumer.max_deliver = 3;
        defs.pool_consumer.backoff_seconds = vec![];
    })
    .await;
    let api = Gateway::serve(&d.env).await;
    let _relay = Gateway::relay(&d.env);
    let driver = Poisoned(SimDriver::new(fast_sim()));
    // max_deliver 0: the workers do not know the limit and never fail it themselves.
    let _workers = d
        .workers(
            &[api.url()],
            driver.clone(),
            &[(Service::named("vm"), "zone-a")],
            2,
            0,
        )
        .await;
    let (poison, _) = poison_and_others(&d, &api.url(), 16).await;

    let (state, attempt, code) = d.wait_terminal(poison, Duration::from_secs(40)).await;
    assert_eq!(
        (state.as_str(), attempt, code.as_deref()),
        ("failed", 3, Some("delivery_exhausted"))
    );
    until(
        Duration::from_secs(10),
        "the dead message is deleted",
        || async { pool_backlog(&d).await == (0, 0) },
    )
    .await;
    let resource: (String, Option<String>) = sqlx::query_as(
        "SELECT r.phase, r.status->'last_error'->>'code' FROM resources r
         JOIN operations o ON o.resource_id = r.id WHERE o.id = $1",
    )
    .bind(poison)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(
        resource,
        ("failed".to_string(), Some("delivery_exhausted".to_string()))
    );
    // Operators see it: the dead-letter counter of the pool moved.
    let series = r#"gateway_dead_letters_total{service="vm",zone="zone-a"}"#;
    assert_eq!(d.metric(&api.url(), series).await, 1.0);
}
