//! Acceptance 7: several gateways, relays and workers against one PostgreSQL and one
//! NATS work together without duplicated effects.

use crate::common::{
    all_pools, fast_sim, heavy_alone, nats_url, pg_base, Deployment, Gateway, KINDS, ZONES,
};
use futures::StreamExt;
use std::time::{Duration, Instant};
use uuid::Uuid;
use workers::SimDriver;

const OPERATIONS: usize = 2000;

/// 2 `gateway serve` + 2 `gateway relay` processes and 2 workers per pool (every
/// service in both zones), 2,000 operations submitted through both gateways at once:
/// every one ends `succeeded`, none is executed twice, and the outbox and the stream
/// end empty.
#[tokio::test]
async fn two_gateways_two_relays_and_two_workers_per_pool_run_two_thousand_operations_once() {
    let _heavy = heavy_alone().await;
    let unlimited = [
        ("GATEWAY_RATE_LIMIT_PER_SECOND", "1000000"),
        ("GATEWAY_RATE_LIMIT_BURST", "1000000"),
        ("RELAY_BATCH_SIZE", "128"),
    ];
    let d = Deployment::new(&pg_base(), &nats_url(), &unlimited).await;
    let apis = [Gateway::serve(&d.env).await, Gateway::serve(&d.env).await];
    let _relays = [Gateway::relay(&d.env), Gateway::relay(&d.env)];
    let urls: Vec<String> = apis.iter().map(Gateway::url).collect();
    let driver = SimDriver::new(fast_sim());
    let _workers = d.workers(&urls, driver.clone(), &all_pools(), 2, 5).await;
    let tenants = [d.tenant(&urls[0]).await, d.tenant(&urls[1]).await];

    let started = Instant::now();
    let d = &d;
    let submitted: Vec<Uuid> = futures::stream::iter(0..OPERATIONS)
        .map(|i| {
            let (url, tenant) = (&urls[i % 2], &tenants[(i / 2) % 2]);
            let (kind, zone) = (KINDS[(i / 4) % 4], ZONES[(i / 16) % 2]);
            async move {
                let op = d.create(url, tenant, kind, &format!("r-{i}"), zone).await;
                op["id"].as_str().unwrap().parse::<Uuid>().unwrap()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let submit_time = started.elapsed();
    d.wait_all_terminal(Duration::from_secs(120)).await;
    let total = started.elapsed();

    let census: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM operations GROUP BY state")
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(census, vec![("succeeded".to_string(), OPERATIONS as i64)]);
    let pools: i64 = d
        .scalar("SELECT count(DISTINCT (kind, zone)) FROM operations")
        .await;
    assert_eq!(pools, 8, "every service in every zone");
    for id in &submitted {
        assert_eq!(driver.executions(*id), 1, "{id} executed once");
        assert_eq!(driver.effects(*id), 1, "{id}");
    }
    d.wait_outbox_empty(Duration::from_secs(30)).await;
    // Contention must never surface as errors: no deadlock, no pool exhaustion, no 5xx
    // answered to a client or a worker (workers retry, so a pass above proves less).
    for url in &urls {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let errors: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("gateway_http_requests_total{") && l.contains("status=\"5xx\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        assert_eq!(errors, 0.0, "{url} answered 5xx under load:\n{text}");
    }
    d.wait_stream_empty(Duration::from_secs(15)).await;
    eprintln!("{OPERATIONS} operations: submitted in {submit_time:?}, all done in {total:?}");
}
