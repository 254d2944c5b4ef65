//! Test harness: a whole gateway on port 0 with its own database and its own JetStream
//! stream and subjects, against the real PostgreSQL and NATS. Everything it creates is
//! dropped when the `TestApp` goes out of scope, even if the test panicked.

#![allow(dead_code)]

pub mod servers;

use gateway::app::{self, Parts, Running};
use gateway::config::{Config, NatsNames};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;

/// Base URL of the PostgreSQL server tests use (a database is appended per test).
pub fn pg_base() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Simulated workers fast enough for tests.
pub fn fast_sim() -> workers::SimConfig {
    workers::SimConfig {
        min_latency: Duration::from_millis(1),
        max_latency: Duration::from_millis(10),
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    }
}

/// What to run.
pub struct Options {
    pub parts: Parts,
    pub tweak: fn(&mut Config),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            parts: Parts {
                api: true,
                relay: true,
                reconciler: true,
                workers: Some(fast_sim()),
            },
            tweak: |_| {},
        }
    }
}

impl Options {
    /// The API alone: nothing relays, reconciles or works, so tests drive every step.
    pub fn api_only() -> Self {
        Self {
            parts: Parts {
                api: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// API and relay, no workers: operations wait, dispatched, for a test to play the
    /// worker through the report API.
    pub fn api_and_relay() -> Self {
        Self {
            parts: Parts {
                api: true,
                relay: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Drops the test's database and stream when the test ends.
struct Cleanup {
    database: String,
    stream: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (database, stream) = (self.database.clone(), self.stream.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let js = async_nats::jetstream::new(client);
                    let _ = js.delete_stream(&stream).await;
                    let _ = js.delete_stream(format!("{stream}-ADVISORIES")).await;
                }
                if let Ok(pool) = PgPool::connect(&format!("{}/postgres", pg_base())).await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    ))
                    .execute(&pool)
                    .await;
                }
            });
        })
        .join();
    }
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A running gateway for one test.
pub struct TestApp {
    pub url: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub config: Config,
    pub running: Option<Running>,
    _cleanup: Cleanup,
}

/// A unique suffix for names.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(options: Options) -> TestApp {
    let id = unique();
    let database = format!("gwtest_{id}");
    let names = NatsNames {
        stream: format!("T{id}"),
        subject_prefix: format!("t{id}.ops"),
    };
    let cleanup = Cleanup {
        database: database.clone(),
        stream: names.stream.clone(),
    };
    let mut config = Config::for_tests(format!("{}/{database}", pg_base()), names);
    config.nats_url = nats_url();
    (options.tweak)(&mut config);
    let backends = app::connect(&config)
        .await
        .expect("connect to PostgreSQL and NATS");
    let admin_key = app::migrate(&config, &backends, true)
        .await
        .expect("migrate")
        .expect("rotate yields a key");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pool = backends.pool.clone();
    let running = app::start(&config, backends, Some(listener), options.parts)
        .await
        .expect("start");
    TestApp {
        url: format!("http://{}", running.addr.expect("the API runs")),
        admin_key,
        http: reqwest::Client::new(),
        pool,
        config,
        running: Some(running),
        _cleanup: cleanup,
    }
}

/// An HTTP answer, with the body parsed as JSON (`Value::Null` when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    /// Sends a request with `key` (if any) and a JSON body (if any).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap_or_default();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, Some(&self.admin_key), None)
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.request(Method::POST, path, Some(&self.admin_key), Some(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.request(Method::DELETE, path, Some(&self.admin_key), None)
            .await
    }

    /// Creates a tenant with a unique ID and returns it.
    pub async fn tenant(&self) -> String {
        let id = format!("t-{}", unique());
        let a = self.post("/v1/tenants", json!({ "id": id })).await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        id
    }

    /// Submits a create and returns the 202's operation.
    pub async fn create(
        &self,
        tenant: &str,
        kind: &str,
        name: &str,
        zone: &str,
        spec: Value,
    ) -> Value {
        let a = self
            .post(
                &format!("/v1/tenants/{tenant}/{kind}"),
                json!({"name": name, "zone": zone, "spec": spec}),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
        a.body
    }

    /// Polls an operation until it is done (30 s at most) and returns it.
    pub async fn wait_done(&self, op_id: &str) -> Value {
        self.wait_op(op_id, |op| op["done"] == json!(true)).await
    }

    /// Polls an operation until `pred` holds (30 s at most).
    pub async fn wait_op(&self, op_id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.get(&format!("/v1/operations/{op_id}")).await;
            assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
            if pred(&a.body) {
                return a.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {op_id} stuck: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (10 s at most) until the outbox is empty: the relay deletes a row after
    /// JetStream's ack, which can trail the worker's reports.
    pub async fn wait_outbox_empty(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.count("outbox").await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the outbox never drained"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (10 s at most) until the audit log holds `n` rows matching `condition`
    /// (an SQL boolean over `audit_log`): rows are written in batches just after the
    /// answers.
    pub async fn wait_audit(&self, condition: &str, n: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let have = self.count(&format!("audit_log WHERE {condition}")).await;
            if have >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{have} of {n} audit rows where {condition}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The simulated driver shared by the in-process workers.
    pub fn driver(&self) -> &workers::SimDriver {
        self.running
            .as_ref()
            .and_then(|r| r.driver.as_ref())
            .expect("workers run in-process")
    }
}

/// The documented example spec of each API kind path.
pub fn example_spec(kind: &str) -> Value {
    match kind {
        "vms" => json!({"flavor": "m1.small", "image": "debian-12"}),
        "bare-metal" => json!({"machine_class": "bm.standard", "image": "debian-12"}),
        "clusters" => json!({"version": "1.31", "node_count": 3, "node_flavor": "m1.large"}),
        "volumes" => json!({"size_gb": 20, "class": "ssd"}),
        other => panic!("unknown kind {other}"),
    }
}

pub const KINDS: [&str; 4] = ["vms", "bare-metal", "clusters", "volumes"];
pub const ZONES: [&str; 2] = ["zone-a", "zone-b"];
