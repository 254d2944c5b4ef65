//! The test harness, against the real PostgreSQL and NATS.
//!
//! Every test works in a [`Sandbox`]: its own database and its own JetStream stream and
//! subjects, removed on drop even if the test panicked. On top of one:
//!
//! - [`TestApp`] ([`spawn_app`], [`spawn_with`]): a whole gateway in this process, on
//!   port 0, with the parts [`Options`] asks for;
//! - [`Deployment`]: a deployment migrated by a real `gateway migrate`, run by real
//!   [`Gateway`] processes, on the shared servers or on private ones ([`Nats`],
//!   [`Postgres`]) that a fault-injection test may kill.
//!
//! Both speak HTTP through one [`Client`]. Tests that run real processes take
//! [`heavy`] first.

/// The checkout the tests run in: `CARGO_MANIFEST_DIR` as `cargo test` sets it when it
/// runs the binary, not as it was when the binary was compiled. With a target directory
/// shared between checkouts, a test binary compiled in one and run in another would
/// otherwise read the first checkout's files (its scripts, migrations, documents).
pub fn repo_root() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

pub mod link;
pub mod schema;
mod servers;
pub mod tls;

pub use servers::{
    all_pools, free_port, Deployment, Gateway, GatewayEnv, Nats, Postgres, TempDir, Workers,
};

/// The events waiting in the events outbox, one row each, as the relay publishes them
/// (`events::cloud_events`): a row of an operation inserted in a state other than
/// `queued` stands for `operation.created` (`queued`, no dispatch) and then
/// `operation.<state>` (migration 0020). Columns:
/// `id`, `operation_id` and `resource_id` of the row; `n` (the event's place in it),
/// `type`, `state` and `dispatches` of the event.
pub const OUTBOX_EVENTS: &str = "(SELECT e.id, e.operation_id, e.resource_id, v.n, v.type,
        v.state, v.dispatches
    FROM event_outbox e CROSS JOIN LATERAL (VALUES
        (1, e.type,
         CASE WHEN e.row IS NULL THEN 'queued' ELSE e.row->>'state' END,
         CASE WHEN e.row IS NULL THEN '0' ELSE e.row->>'dispatches' END),
        (2, 'operation.' || (e.state_row->>'state'), e.state_row->>'state',
         e.state_row->>'dispatches')
    ) v(n, type, state, dispatches)
    WHERE v.n = 1 OR e.state_row IS NOT NULL)";

use gateway::app::{self, Parts, Running};
use gateway::config::{Config, NatsNames};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use uuid::Uuid;

/// Base URL of the PostgreSQL server tests use (a database is appended per test).
pub fn pg_base() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// URL of the NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A unique suffix for names.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
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

/// Polls `done` every 50 ms until it returns `Some`, failing after 30 s.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut done: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = done().await {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The services of the four built-in kinds, as the migration registers them.
pub fn builtin_services() -> Vec<gateway_proto::Service> {
    ["bm", "k8s", "storage", "vm"]
        .map(gateway_proto::Service::named)
        .to_vec()
}

/// The path of the VM that `op` (an operation of `tenant`) creates or acts on.
pub fn vm_path(tenant: &str, op: &Value) -> String {
    format!(
        "/v1/tenants/{tenant}/vms/{}",
        op["resource_id"].as_str().unwrap()
    )
}

/// The documented example spec of each API kind path (`vms`, `bare-metal`, `clusters`, `volumes`).
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

/// The ID of an operation (a 202's body, or a `GET /v1/operations/{id}`).
pub fn id_of(op: &Value) -> Uuid {
    op["id"].as_str().unwrap().parse().unwrap()
}

/// The value of one series in `url`'s `/metrics` (0 when absent).
pub async fn metric(url: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    sample(&text, series)
}

/// The value of the sample `name{labels}` in a `/metrics` exposition (labels given as
/// they appear, sorted as encoded), or 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Slots for tests that run real processes; see [`heavy`].
static HEAVY: Semaphore = Semaphore::const_new(2);

/// Runs `sql` (with `id` as `$1`, if given) in a transaction of its own with the
/// triggers off, as someone with superuser rights could.
pub async fn tamper(pool: &PgPool, sql: &str, id: Option<i64>) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut query = sqlx::query(sql);
    if let Some(id) = id {
        query = query.bind(id);
    }
    query.execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

/// Runs `sql` on audit row `id` (bound as `$1`) the way someone with superuser rights
/// could, bypassing the append-only triggers, then checks that the audit chain's
/// verification names that row.
pub async fn tamper_and_verify(pool: &PgPool, sql: &str, id: i64) {
    tamper(pool, sql, Some(id)).await;
    match gateway::audit::verify(pool).await.unwrap() {
        gateway::audit::Verdict::Broken { id: at, .. } => assert_eq!(at, id),
        other => panic!("tampering not found: {other:?}"),
    }
}

/// Taken first, and held to the end, by every test that runs real processes (gateways,
/// relays, a private `nats-server` or PostgreSQL), mostly fault injections with time
/// limits in their assertions: at most two of them run at once, whatever
/// `--test-threads` says. Each fault file used to be a binary of its own, run after the
/// others; in one binary every test may start at once. In-process tests do not take it.
pub async fn heavy() -> SemaphorePermit<'static> {
    HEAVY.acquire().await.expect("never closed")
}

/// [`heavy`], both slots: for a test that loads every core by itself and has a time
/// budget, so no other heavy test runs beside it.
pub async fn heavy_alone() -> SemaphorePermit<'static> {
    HEAVY.acquire_many(2).await.expect("never closed")
}

/// A test's own database (`gwtest_…`, created by the migration) and JetStream stream,
/// advisory stream and subject prefix, on the PostgreSQL at `pg_base` and the NATS at
/// `nats_url`. Dropping it deletes the streams and drops the database, even when the
/// test panicked; own it last, so it goes after whatever uses them.
pub struct Sandbox {
    database: String,
    pub names: NatsNames,
    pg_base: String,
    nats_url: String,
}

impl Sandbox {
    pub fn new(pg_base: &str, nats_url: &str) -> Self {
        let id = unique();
        Self {
            database: format!("gwtest_{id}"),
            names: NatsNames {
                region: None,
                stream: format!("T{id}"),
                subject_prefix: format!("t{id}.ops"),
                events_prefix: format!("t{id}.events"),
            },
            pg_base: pg_base.to_owned(),
            nats_url: nats_url.to_owned(),
        }
    }

    /// The URL of the sandbox's database.
    pub fn database_url(&self) -> String {
        format!("{}/{}", self.pg_base, self.database)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let (database, nats_url, pg_base) = (
            self.database.clone(),
            self.nats_url.clone(),
            self.pg_base.clone(),
        );
        let streams = gateway::jetstream::stream_names(&self.names).unwrap_or_default();
        // A runtime of its own: drop may run outside one, or inside one that is ending.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Bounded: the servers may be private ones a test left stopped.
                let nats = async_nats::ConnectOptions::new().connect(&nats_url);
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), nats).await {
                    let js = async_nats::jetstream::new(client);
                    for stream in &streams {
                        let _ = js.delete_stream(stream).await;
                    }
                }
                let admin = format!("{pg_base}/postgres");
                let pg = PgPool::connect(&admin);
                if let Ok(Ok(pool)) = tokio::time::timeout(Duration::from_secs(5), pg).await {
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

/// One `bigint` from `sql`.
async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits (at most `timeout`) until the outbox is empty: a relay deletes its rows only
/// after JetStream's acks, which may trail the workers' reports.
async fn wait_outbox_empty(pool: &PgPool, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Both outboxes: operations, and events (the relay publishes both).
        let left = scalar(
            pool,
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_outbox)",
        )
        .await;
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} outbox and event rows left after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    /// Reads a whole response.
    pub async fn read(res: reqwest::Response) -> Self {
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap_or_default();
        Self {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// The HTTP client under every [`Client`], with a timeout per request if given. Pooled
/// connections are dropped after 5 s idle: a gateway closes a keep-alive connection that
/// sends no request within its header timeout (`GATEWAY_HEADER_TIMEOUT_MS`, 10 s), and a
/// request sent on it just then is reset.
fn http_client(timeout: Option<Duration>) -> reqwest::Client {
    let builder = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(5));
    match timeout {
        Some(t) => builder.timeout(t),
        None => builder,
    }
    .build()
    .unwrap()
}

/// The request header that asks a gateway for the database's answer rather than its
/// read cache's.
pub const NO_CACHE: [(&str, &str); 1] = [("cache-control", "no-cache")];

/// A client of one gateway's API, holding the admin key.
#[derive(Clone)]
pub struct Client {
    /// The API's base URL (`http://127.0.0.1:…`).
    pub url: String,
    pub admin_key: String,
    pub http: reqwest::Client,
}

impl Client {
    /// Sends a request with `key` (if any) and a JSON body (if any).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let answer = Answer::read(req.send().await.expect("request sent")).await;
        // Every answer must be one the published contract allows.
        schema::check(method.as_str(), path, answer.status.as_u16(), &answer.body);
        answer
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, Some(&self.admin_key), None)
            .await
    }

    /// `GET` with the admin key and the request headers `headers` (`Cache-Control`,
    /// `If-None-Match`, …); the answer is checked against the contract as any other.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin_key);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let answer = Answer::read(req.send().await.expect("request sent")).await;
        schema::check("GET", path, answer.status.as_u16(), &answer.body);
        answer
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.request(Method::POST, path, Some(&self.admin_key), Some(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.request(Method::DELETE, path, Some(&self.admin_key), None)
            .await
    }

    /// The typed client (crate `gateway-client`) on this connection pool, with the admin
    /// key: the helpers below talk to the API through it, as the CLI does.
    pub fn typed(&self) -> gateway_client::Client {
        gateway_client::Client::with_http(self.http.clone(), &self.url, &self.admin_key)
    }

    /// Creates a tenant with a unique ID and returns it.
    pub async fn tenant(&self) -> String {
        let id = format!("t-{}", unique());
        let made = self.typed().create_tenant(&id, "").await;
        assert_eq!(made.expect("the tenant is created").id, id);
        id
    }

    /// Submits a create and returns the 202's operation (as JSON, for the tests'
    /// assertions).
    pub async fn create(
        &self,
        tenant: &str,
        kind: &str,
        name: &str,
        zone: &str,
        spec: Value,
    ) -> Value {
        let resource = gateway_client::NewResource {
            name: name.to_owned(),
            zone: zone.to_owned(),
            spec,
            labels: Default::default(),
        };
        let op = self.typed().create_resource(tenant, kind, &resource).await;
        serde_json::to_value(op.expect("the create is accepted")).expect("JSON")
    }

    /// Submits `n` creates of VMs `vm-0`, `vm-1`, … in zone-a, one after another, and
    /// returns their operations.
    pub async fn create_vms(&self, tenant: &str, n: usize) -> Vec<Value> {
        let mut ops = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("vm-{i}");
            ops.push(
                self.create(tenant, "vms", &name, "zone-a", example_spec("vms"))
                    .await,
            );
        }
        ops
    }
}

/// What to run.
pub struct Options {
    pub parts: Parts,
    pub tweak: fn(&mut Config),
    /// The gateway reaches PostgreSQL through this local port (a [`link::Link`] a test
    /// cuts), instead of directly.
    pub database_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            parts: Parts {
                api: true,
                relay: true,
                reconciler: true,
                workers: Some(fast_sim()),
                webhooks: false,
            },
            tweak: |_| {},
            database_port: None,
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

/// A gateway running in this process for one test. It is a [`Client`] of its own API
/// (`app.url`, `app.get(…)`, …), and holds its database pool, configuration and parts.
pub struct TestApp {
    client: Client,
    pub pool: PgPool,
    pub config: Config,
    pub running: Option<Running>,
    _sandbox: Sandbox,
}

impl std::ops::Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Everything, with in-process workers: [`Options::default`].
pub async fn spawn_app() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(options: Options) -> TestApp {
    let sandbox = Sandbox::new(&pg_base(), &nats_url());
    let mut config = Config::for_tests(sandbox.database_url(), sandbox.names.clone());
    config.nats_url = nats_url();
    (options.tweak)(&mut config);
    if let Some(port) = options.database_port {
        let mut url = reqwest::Url::parse(&config.database_url).unwrap();
        url.set_port(Some(port)).unwrap();
        config.database_url = url.to_string();
    }
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
        client: Client {
            url: format!("http://{}", running.addr.expect("the API runs")),
            admin_key,
            http: http_client(None),
        },
        pool,
        config,
        running: Some(running),
        _sandbox: sandbox,
    }
}

impl TestApp {
    /// A worker pool of `service` in `zone-a` reporting to this gateway with `key`.
    pub fn pool_config(&self, service: gateway_proto::Service, key: String) -> workers::PoolConfig {
        workers::PoolConfig {
            service,
            zone: "zone-a".into(),
            stream: self.config.nats.stream.clone(),
            gateway_url: self.url.clone(),
            gateway_key: key,
            concurrency: 4,
            max_deliver: 5,
            dispatch_keys: self.config.dispatch_public_keys(),
            report_batch: workers::PoolConfig::DEFAULT_REPORT_BATCH,
        }
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

    /// Holds the next code of this app to reach `point` ([`gateway::pause`]): the first
    /// channel says it got there, and it goes on once the second is sent to.
    pub fn pause(
        &self,
        point: gateway::pause::Point,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let options = self.pool.connect_options();
        gateway::pause::at(point, options.get_database().expect("a database"))
    }

    /// Waits (10 s at most) until the outbox is empty: the relay deletes a row after
    /// JetStream's ack, which can trail the worker's reports.
    pub async fn wait_outbox_empty(&self) {
        wait_outbox_empty(&self.pool, Duration::from_secs(10)).await;
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
        scalar(&self.pool, &format!("SELECT count(*) FROM {table}")).await
    }

    /// The types of operation `id`'s events waiting in the events outbox, in order (a
    /// row standing for two events, migration 0020, gives both).
    pub async fn operation_events(&self, id: &str) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "SELECT e.type FROM {OUTBOX_EVENTS} e
             WHERE e.operation_id = $1::uuid AND e.type LIKE 'operation.%' ORDER BY e.id, e.n"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Reports `report` on operation `id` with a worker key of the `vm` pool of zone-a.
    pub async fn report_as_vm_worker(&self, id: &str, report: Value) -> Answer {
        let key = app::worker_key(&self.pool, &gateway_proto::Service::named("vm"), "zone-a")
            .await
            .unwrap();
        let path = format!("/v1/operations/{id}/reports");
        self.request(Method::POST, &path, Some(&key), Some(&report))
            .await
    }
}
