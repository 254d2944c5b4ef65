//! Fault injection around PostgreSQL (acceptance 5), with real `gateway serve` and
//! `gateway relay` processes against a private, throwaway PostgreSQL cluster.

use crate::common;
use crate::common::{all_pools, heavy, id_of, nats_url, Deployment, Gateway, Postgres, KINDS};
use reqwest::StatusCode;
use serde_json::json;
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
