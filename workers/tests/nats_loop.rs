//! The consume loop against a real NATS JetStream server (`NATS_URL`, default
//! `nats://127.0.0.1:4222`) and a stand-in gateway: a few lines of HTTP on a
//! `TcpListener` that record reports and answer them, answer reads of VMs from a
//! table, and answer `GET /healthz`. Each test uses a stream of its own.
//!
//! The full path (gateway, relay, PostgreSQL, workers) is tested in the gateway's tests.

use async_nats::jetstream::{self, consumer::pull, stream};
use chrono::Utc;
use gateway_proto::signing::{self, SigningKey, TrustedKeys};
use gateway_proto::{
    consumer_name, ops_subject, Action, Dispatch, Kind, OperationState, Report, ReportAck,
    ReportState, REQUEST_ID_HEADER,
};
use prometheus_client::registry::Registry;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workers::{
    run_pool, run_pool_with_metrics, Driver, DriverError, PoolConfig, Service, SimConfig,
    SimDriver, WorkerMetrics,
};

const ZONE: &str = "zone-a";

/// What the stand-in gateway received: operation, report, `X-Request-Id`.
type Seen = Arc<Mutex<Vec<(Uuid, Report, Option<String>)>>>;

/// Reads the stand-in gateway received: path, `X-Request-Id`, `Authorization`.
type Reads = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>;

/// A stand-in gateway that accepts every report, after answering `503` to the first
/// `outage` requests.
async fn fake_gateway(outage: usize) -> (String, Seen) {
    let gateway = stand_in(outage, HashMap::new(), 0).await;
    (gateway.url, gateway.seen)
}

/// A running stand-in gateway.
struct StandIn {
    url: String,
    seen: Seen,
    reads: Reads,
}

/// A stand-in gateway that accepts every report after answering `503` to the first
/// `outage` requests, and answers `GET /v1/tenants/{t}/vms/{id}` from `vms` (`404` for
/// any other VM) after answering `503` to the first `read_outage` of those.
async fn stand_in(
    outage: usize,
    vms: HashMap<Uuid, serde_json::Value>,
    read_outage: usize,
) -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let reads: Reads = Arc::default();
    let failures_left = Arc::new(AtomicUsize::new(outage));
    let read_failures_left = Arc::new(AtomicUsize::new(read_outage));
    let vms = Arc::new(vms);
    let (recorded, recorded_reads) = (seen.clone(), reads.clone());
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let (seen, reads, failures_left, read_failures_left, vms) = (
                recorded.clone(),
                recorded_reads.clone(),
                failures_left.clone(),
                read_failures_left.clone(),
                vms.clone(),
            );
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                let mut request_line = String::new();
                socket.read_line(&mut request_line).await.unwrap();
                let (mut length, mut request_id, mut authorization) = (0, None, None);
                loop {
                    let mut line = String::new();
                    socket.read_line(&mut line).await.unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "x-request-id" => request_id = Some(value.trim().to_owned()),
                        "authorization" => authorization = Some(value.trim().to_owned()),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                socket.read_exact(&mut body).await.unwrap();
                let failing = |left: &AtomicUsize| {
                    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                };
                let unavailable = || {
                    (
                        "503 Service Unavailable",
                        json!({"code": "unavailable", "message": "down"}),
                    )
                };
                let answer = if request_line.starts_with("GET /healthz ") {
                    ("200 OK", json!("ok"))
                } else if failing(&failures_left) {
                    unavailable()
                } else if let Some(path) = request_line.strip_prefix("GET ") {
                    let path = path.split_whitespace().next().unwrap().to_owned();
                    reads
                        .lock()
                        .unwrap()
                        .push((path.clone(), request_id, authorization));
                    let segments: Vec<&str> = path.split('/').collect();
                    let vm = match segments[..] {
                        ["", "v1", "tenants", _, "vms", id] => id.parse::<Uuid>().ok(),
                        _ => None,
                    };
                    if failing(&read_failures_left) {
                        unavailable()
                    } else {
                        match vm.and_then(|id| vms.get(&id)) {
                            Some(vm) => ("200 OK", vm.clone()),
                            None => (
                                "404 Not Found",
                                json!({"code": "not_found", "message": "resource not found", "request_id": "r"}),
                            ),
                        }
                    }
                } else {
                    let id: Uuid = request_line.split('/').nth(3).unwrap().parse().unwrap();
                    let report: Report = serde_json::from_slice(&body).unwrap();
                    let ack = ReportAck {
                        operation_id: id,
                        state: match report.state {
                            ReportState::Running => OperationState::Running,
                            ReportState::Succeeded => OperationState::Succeeded,
                            ReportState::Failed => OperationState::Failed,
                            ReportState::Cancelled => OperationState::Cancelled,
                        },
                        attempt: report.attempt,
                        cancel_requested: false,
                    };
                    seen.lock().unwrap().push((id, report, request_id));
                    ("200 OK", serde_json::to_value(ack).unwrap())
                };
                let body = answer.1.to_string();
                let response = format!(
                    "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    answer.0,
                    body.len()
                );
                socket
                    .get_mut()
                    .write_all(response.as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    StandIn { url, seen, reads }
}

/// A stream and the vm pool's consumer for `ZONE`, as `gateway migrate` would make them.
async fn create_stream(js: &jetstream::Context, name: &str, prefix: &str, max_deliver: i64) {
    create_stream_for(js, name, prefix, max_deliver, Service::named("vm")).await;
}

/// A stream and `service`'s consumer for `ZONE`.
async fn create_stream_for(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    max_deliver: i64,
    service: Service,
) {
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{prefix}.*.*")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(consumer_name(&service, ZONE)),
            filter_subject: ops_subject(prefix, &service, ZONE),
            ack_wait: Duration::from_secs(30),
            max_deliver,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn connect() -> jetstream::Context {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    jetstream::new(async_nats::connect(url).await.unwrap())
}

fn dispatch(name: &str) -> Dispatch {
    Dispatch {
        operation_id: Uuid::now_v7(),
        tenant: "acme".into(),
        resource_id: Uuid::now_v7(),
        kind: Kind::named("vm"),
        zone: ZONE.into(),
        name: name.into(),
        action: Action::create(),
        generation: 1,
        spec: json!({"flavor": "m1.small", "image": "debian-12", "power_state": "running"}),
        input: json!({}),
        deadline: Utc::now() + chrono::Duration::minutes(5),
    }
}

/// The gateway's dispatch signing key in these tests.
fn signing_key() -> SigningKey {
    SigningKey::from_seed([11; 32])
}

/// Publishes `op` as the relay does: with a message ID and signed.
async fn publish(js: &jetstream::Context, prefix: &str, op: &Dispatch) {
    let service = if op.kind == "volume" { "storage" } else { "vm" };
    let subject = ops_subject(prefix, &Service::named(service), ZONE);
    let (msg_id, body) = (
        format!("{}.1", op.operation_id),
        serde_json::to_vec(op).unwrap(),
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REQUEST_ID_HEADER, format!("req-{}", op.name).as_str());
    headers.insert(signing::MSG_ID_HEADER, msg_id.as_str());
    for (name, value) in signing_key().sign(&subject, &msg_id, &body) {
        headers.insert(name, value.as_str());
    }
    js.publish_with_headers(subject, headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Polls `done` every 20 ms until it holds, failing after `within`.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pool(stream: &str, gateway_url: &str, max_deliver: i64) -> PoolConfig {
    PoolConfig {
        service: Service::named("vm"),
        ..storage_pool(stream, gateway_url, max_deliver)
    }
}

fn storage_pool(stream: &str, gateway_url: &str, max_deliver: i64) -> PoolConfig {
    PoolConfig {
        service: Service::named("storage"),
        zone: ZONE.into(),
        stream: stream.into(),
        gateway_url: gateway_url.into(),
        gateway_key: "wk_test".into(),
        concurrency: 4,
        max_deliver,
        dispatch_keys: TrustedKeys::new(vec![signing_key().public_key()]),
        // The fake gateway here answers single reports only; batches are tested
        // against the real one (the gateway's `reports::` tests).
        report_batch: 1,
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_pool_started_before_its_stream_reports_and_acks_every_operation_through_an_outage() {
    let js = connect().await;
    let (stream_name, prefix) = (unique("WTEST"), unique("wtest"));
    let (gateway_url, seen) = fake_gateway(3).await;
    let driver = SimDriver::new(SimConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(5),
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run_pool(
        js.clone(),
        pool(&stream_name, &gateway_url, 5),
        driver.clone(),
        shutdown.clone(),
    ));

    // The pool is up before `migrate` made its stream: it waits for it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    create_stream(&js, &stream_name, &prefix, 5).await;
    let ops: Vec<Dispatch> = ["web-1", "web-2", "web-3", "web-4", "web-5", "fail-web"]
        .into_iter()
        .map(dispatch)
        .collect();
    for op in &ops {
        publish(&js, &prefix, op).await;
    }

    let terminal = |seen: &Seen| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, r, _)| r.state != ReportState::Running)
            .map(|(id, r, _)| (*id, r.clone()))
            .collect::<HashMap<_, _>>()
    };
    eventually(
        Duration::from_secs(15),
        "every operation has an outcome",
        || terminal(&seen).len() == ops.len(),
    )
    .await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(consumer_name(&Service::named("vm"), ZONE), &stream_name)
        .await
        .unwrap();
    let mut settled = false;
    for _ in 0..100 {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "every message is acked or terminated");

    let outcomes = terminal(&seen);
    for op in &ops {
        let report = &outcomes[&op.operation_id];
        if op.name.starts_with("fail-") {
            assert_eq!(report.state, ReportState::Failed);
            assert_eq!(report.error.as_ref().unwrap().code, "simulated_failure");
        } else {
            assert_eq!(report.state, ReportState::Succeeded);
            assert_eq!(report.status.as_ref().unwrap()["flavor"], "m1.small");
            assert_eq!(driver.effects(op.operation_id), 1);
        }
        assert_eq!(report.attempt, 1);
    }
    for (id, _, request_id) in seen.lock().unwrap().iter() {
        let op = ops.iter().find(|op| op.operation_id == *id).unwrap();
        assert_eq!(
            request_id.as_deref(),
            Some(format!("req-{}", op.name).as_str())
        );
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the pool stops promptly when idle")
        .unwrap()
        .unwrap();
    js.delete_stream(&stream_name).await.unwrap();
}

/// Fails transiently on its first `failures` executions, then succeeds.
#[derive(Clone)]
struct FlakyDriver {
    executions: Arc<AtomicUsize>,
    failures: usize,
}

impl Driver for FlakyDriver {
    fn execute(
        &self,
        _op: &Dispatch,
    ) -> impl Future<Output = Result<serde_json::Value, DriverError>> + Send {
        let n = self.executions.fetch_add(1, Ordering::SeqCst);
        std::future::ready(if n < self.failures {
            Err(DriverError::Transient(format!("busy ({n})")))
        } else {
            Ok(json!({"ok": true}))
        })
    }
}

#[tokio::test]
async fn a_transient_failure_hands_the_message_back_and_the_next_delivery_finishes_it() {
    let js = connect().await;
    let (stream_name, prefix) = (unique("WTEST"), unique("wtest"));
    create_stream(&js, &stream_name, &prefix, 5).await;
    let (gateway_url, seen) = fake_gateway(0).await;
    // One execution plus three in-process retries fail: delivery 1 is handed back.
    let driver = FlakyDriver {
        executions: Arc::default(),
        failures: 4,
    };
    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let metrics = WorkerMetrics::register(&mut registry);
    let running = tokio::spawn(run_pool_with_metrics(
        js.clone(),
        pool(&stream_name, &gateway_url, 5),
        driver.clone(),
        metrics,
        shutdown.clone(),
    ));
    let http = serve_http(registry, &js, &gateway_url, &shutdown).await;

    let op = dispatch("web-1");
    publish(&js, &prefix, &op).await;
    eventually(Duration::from_secs(15), "the operation succeeds", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(_, r, _)| r.state == ReportState::Succeeded)
    })
    .await;

    let reports: Vec<(ReportState, i32)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r, _)| (r.state, r.attempt))
        .collect();
    assert_eq!(
        reports,
        [
            (ReportState::Running, 1),
            (ReportState::Running, 2),
            (ReportState::Succeeded, 2)
        ]
    );
    assert_eq!(driver.executions.load(Ordering::SeqCst), 5);

    // The same story, scraped: delivery 1 retried, delivery 2 succeeded; five driver
    // calls, of which three were in-process retries.
    let vm = |name: &str, outcome: Option<&str>| series(name, "vm", outcome);
    let text = scrape_until(&http, "the success is counted", |text| {
        value(text, &vm("worker_messages_total", Some("succeeded"))) == 1.0
    })
    .await;
    assert_eq!(
        value(&text, &vm("worker_messages_total", Some("retried"))),
        1.0
    );
    assert_eq!(value(&text, &vm("worker_driver_attempts_total", None)), 5.0);
    assert_eq!(value(&text, &vm("worker_driver_retries_total", None)), 3.0);
    assert_eq!(
        value(
            &text,
            &vm("worker_driver_duration_seconds_count", Some("transient"))
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            &vm("worker_driver_duration_seconds_count", Some("ok"))
        ),
        1.0
    );
    scrape_until(&http, "nothing is in flight", |text| {
        value(text, &vm("worker_in_flight", None)) == 0.0
    })
    .await;
    let ready = reqwest::get(format!("{http}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap(),
        json!({"nats": "ok", "gateway": "ok"})
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the pool stops promptly when idle")
        .unwrap()
        .unwrap();
    js.delete_stream(&stream_name).await.unwrap();
}

/// The pool takes `max_deliver` from its consumer, not from its own configuration: with
/// a consumer that delivers once, the first delivery of a transient failure is the last
/// and fails the operation (`retries_exhausted`), although the pool was told 5.
#[tokio::test]
async fn the_last_delivery_is_the_consumers_max_deliver_not_a_setting() {
    let js = connect().await;
    let (stream_name, prefix) = (unique("WTEST"), unique("wtest"));
    create_stream(&js, &stream_name, &prefix, 1).await;
    let (gateway_url, seen) = fake_gateway(0).await;
    let driver = FlakyDriver {
        executions: Arc::default(),
        failures: usize::MAX,
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run_pool_with_metrics(
        js.clone(),
        pool(&stream_name, &gateway_url, 5),
        driver.clone(),
        WorkerMetrics::default(),
        shutdown.clone(),
    ));
    publish(&js, &prefix, &dispatch("web-1")).await;
    eventually(Duration::from_secs(15), "the operation fails", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(_, r, _)| r.state == ReportState::Failed)
    })
    .await;
    let failed = seen
        .lock()
        .unwrap()
        .iter()
        .find(|(_, r, _)| r.state == ReportState::Failed)
        .map(|(_, r, _)| r.clone())
        .unwrap();
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.error.unwrap().code, "retries_exhausted");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the pool stops promptly when idle")
        .unwrap()
        .unwrap();
    js.delete_stream(&stream_name).await.unwrap();
}

/// Serves the worker's HTTP endpoints for `registry` on port 0, as the `worker` binary
/// does; returns the base URL.
async fn serve_http(
    registry: Registry,
    js: &jetstream::Context,
    gateway_url: &str,
    shutdown: &CancellationToken,
) -> String {
    let state =
        workers::http::HttpState::new(Arc::new(registry), js.client(), gateway_url, "k").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(workers::http::serve(listener, state, shutdown.clone()));
    url
}

/// `name{service=…,zone="zone-a"[,outcome=…]}`.
fn series(name: &str, service: &str, outcome: Option<&str>) -> String {
    let outcome = outcome.map_or(String::new(), |o| format!(",outcome=\"{o}\""));
    format!("{name}{{service=\"{service}\",zone=\"{ZONE}\"{outcome}}}")
}

/// The value of `series` in the OpenMetrics `text`; fails if it is absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Scrapes `{base}/metrics` every 20 ms until `done` holds of the text (at most 10 s).
async fn scrape_until(base: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_hands_an_unfinished_message_back_and_counts_it() {
    let js = connect().await;
    let (stream_name, prefix) = (unique("WTEST"), unique("wtest"));
    create_stream(&js, &stream_name, &prefix, 5).await;
    let (gateway_url, seen) = fake_gateway(0).await;
    let slow = SimDriver::new(SimConfig {
        min_latency: Duration::from_secs(600),
        max_latency: Duration::from_secs(600),
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    });
    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let metrics = WorkerMetrics::register(&mut registry);
    let running = tokio::spawn(run_pool_with_metrics(
        js.clone(),
        pool(&stream_name, &gateway_url, 5),
        slow,
        metrics,
        shutdown.clone(),
    ));
    // Served until the end of the test, not the pool's.
    let http_stop = CancellationToken::new();
    let http = serve_http(registry, &js, &gateway_url, &http_stop).await;

    publish(&js, &prefix, &dispatch("web-1")).await;
    let vm = |name: &str, outcome: Option<&str>| series(name, "vm", outcome);
    scrape_until(&http, "the message is in flight", |text| {
        value(text, &vm("worker_in_flight", None)) == 1.0
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(
        workers::consume::SHUTDOWN_GRACE + Duration::from_secs(5),
        running,
    )
    .await
    .expect("the pool stops after its grace period")
    .unwrap()
    .unwrap();
    let text = scrape_until(&http, "the hand-back is counted", |text| {
        value(text, &vm("worker_messages_total", Some("handed_back"))) == 1.0
    })
    .await;
    assert_eq!(value(&text, &vm("worker_in_flight", None)), 0.0);
    assert_eq!(
        value(
            &text,
            &vm("worker_driver_duration_seconds_count", Some("ok"))
        ),
        0.0
    );
    let states: Vec<ReportState> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r, _)| r.state)
        .collect();
    assert_eq!(states, [ReportState::Running], "no outcome was reported");

    http_stop.cancel();
    js.delete_stream(&stream_name).await.unwrap();
}

/// A volume of `acme` in `ZONE` attached to `vm`.
fn attached_volume(name: &str, vm: Uuid) -> Dispatch {
    Dispatch {
        kind: Kind::named("volume"),
        spec: json!({"size_gb": 20, "class": "ssd", "attached_to": vm}),
        ..dispatch(name)
    }
}

/// A VM as the gateway shows it: live in `ZONE`, `ready`, on `host`.
fn vm_resource(id: Uuid, host: &str) -> serde_json::Value {
    json!({
        "id": id, "tenant": "acme", "kind": "vm", "zone": ZONE, "name": "db",
        "spec": {"flavor": "m1.small", "image": "debian-12"},
        "status": {"power_state": "running", "host": host, "ip": "10.0.0.7", "generation": 1},
        "phase": "ready", "generation": 1, "observed_generation": 1,
        "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
    })
}

/// Runs a storage pool against `gateway` until `op` has a terminal report; returns it
/// and the reads the gateway received.
async fn run_storage_op(
    gateway: StandIn,
    op: &Dispatch,
) -> (Report, Vec<(String, Option<String>, Option<String>)>) {
    let js = connect().await;
    let (stream_name, prefix) = (unique("WTEST"), unique("wtest"));
    create_stream_for(&js, &stream_name, &prefix, 5, Service::named("storage")).await;
    let driver = SimDriver::new(SimConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(5),
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(run_pool(
        js.clone(),
        storage_pool(&stream_name, &gateway.url, 5),
        driver,
        shutdown.clone(),
    ));
    publish(&js, &prefix, op).await;
    let terminal = || {
        gateway
            .seen
            .lock()
            .unwrap()
            .iter()
            .find(|(id, r, _)| *id == op.operation_id && r.state != ReportState::Running)
            .map(|(_, r, _)| r.clone())
    };
    eventually(
        Duration::from_secs(15),
        "the operation has an outcome",
        || terminal().is_some(),
    )
    .await;
    let report = terminal().unwrap();
    for (_, _, request_id) in gateway.seen.lock().unwrap().iter() {
        assert_eq!(
            request_id.as_deref(),
            Some(format!("req-{}", op.name).as_str())
        );
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the pool stops promptly when idle")
        .unwrap()
        .unwrap();
    js.delete_stream(&stream_name).await.unwrap();
    let reads = gateway.reads.lock().unwrap().clone();
    (report, reads)
}

#[tokio::test]
async fn an_attachment_to_a_vm_the_gateway_does_not_show_fails_with_attachment_target_missing() {
    let vm = Uuid::now_v7();
    let gateway = stand_in(0, HashMap::new(), 0).await;
    let op = attached_volume("data-1", vm);
    let (report, reads) = run_storage_op(gateway, &op).await;

    assert_eq!(report.state, ReportState::Failed);
    let error = report.error.unwrap();
    assert_eq!(error.code, "attachment_target_missing");
    assert!(error.message.contains(&vm.to_string()), "{}", error.message);
    assert!(!error.retryable);
    assert_eq!(reads.len(), 1, "a 404 is an answer: not asked again");
    let (path, request_id, authorization) = &reads[0];
    assert_eq!(path, &format!("/v1/tenants/acme/vms/{vm}"));
    assert_eq!(request_id.as_deref(), Some("req-data-1"));
    assert_eq!(authorization.as_deref(), Some("Bearer wk_test"));
}

#[tokio::test]
async fn an_attachment_reports_the_host_of_its_vm_as_the_gateway_shows_it() {
    let vm = Uuid::now_v7();
    let vms = HashMap::from([(vm, vm_resource(vm, "zone-a-host-3"))]);
    // The first read meets an outage: it is asked again.
    let gateway = stand_in(0, vms, 1).await;
    let op = attached_volume("data-2", vm);
    let (report, reads) = run_storage_op(gateway, &op).await;

    assert_eq!(report.state, ReportState::Succeeded, "{:?}", report.error);
    let status = report.status.unwrap();
    assert_eq!(status["attached_to"], vm.to_string());
    assert_eq!(status["attached_host"], "zone-a-host-3");
    assert_eq!(status["size_gb"], 20);
    assert_eq!(reads.len(), 2, "one outage, then the answer");
    for (path, request_id, authorization) in &reads {
        assert_eq!(path, &format!("/v1/tenants/acme/vms/{vm}"));
        assert_eq!(request_id.as_deref(), Some("req-data-2"));
        assert_eq!(authorization.as_deref(), Some("Bearer wk_test"));
    }
}
