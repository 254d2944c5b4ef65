//! Private servers and real gateway processes for fault-injection tests.
//!
//! A test that stops a server must not stop the shared one everything else uses, so it
//! starts its own: [`Nats`] (a `nats-server -js` with a store in a temporary directory)
//! or [`Postgres`] (a throwaway cluster made by `initdb`, run by `pg_ctl`), each on a
//! free port. [`Gateway`] runs the real `gateway` binary (`serve`, `relay`, `migrate`)
//! configured by environment. Everything is killed and removed on drop, even when the
//! test panicked, so nothing outlives the test.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `nats-server`, from `NATS_SERVER_BIN` or the Debian package's path.
fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        if Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server".into()
        } else {
            "nats-server".into()
        }
    })
}

/// The directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`).
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return dir.into();
    }
    for version in ["17", "16", "15", "14"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system's temporary directory, removed by [`TempDir`]'s drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", super::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until something accepts TCP connections on `port`.
fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until nothing accepts TCP connections on `port`.
fn wait_for_port_closed(port: u16, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{what} still listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private NATS server with JetStream, on a free port, with its store in a temporary
/// directory that survives restarts (so streams and messages do).
pub struct Nats {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// The configuration file to run with instead of the JetStream flags.
    config: Option<PathBuf>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a server with the configuration file `config`, which must enable
    /// JetStream itself (`jetstream { store_dir: … }`): with JetStream enabled by flags
    /// only, a reload would shut it down.
    pub fn start_with_config(config: Option<PathBuf>) -> Self {
        let mut nats = Self {
            port: free_port(),
            child: None,
            dir: TempDir::new("gwtest-nats"),
            config,
        };
        nats.resume();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (`SIGKILL`: a crash, not a shutdown) and waits until its port is
    /// closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10), "nats-server");
    }

    /// Makes the server read its configuration again (`SIGHUP`, as
    /// `nats-server --signal reload` does).
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("nats-server runs").id();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP nats-server");
    }

    /// Starts the server again on the same port with the same store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server already runs");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let mut command = Command::new(nats_server_bin());
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command
                .arg("-js")
                .arg("-sd")
                .arg(self.dir.path().join("store")),
        };
        let child = command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (set NATS_SERVER_BIN)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10), "nats-server");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A throwaway PostgreSQL cluster on a free port (trust authentication, user
/// `postgres`). PostgreSQL refuses to run as root, so as root every command runs as the
/// `postgres` OS user, which owns the cluster's directory.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    running: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// Creates and starts a cluster; waits until it accepts connections.
    pub fn start() -> Self {
        let dir = TempDir::new("gwtest-pg");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory to postgres");
        }
        let data = dir.path().join("data");
        let out = Self::command(
            &pg_bin_dir().join("initdb"),
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-D",
                data.to_str().unwrap(),
            ],
        )
        .output()
        .expect("initdb runs (set PG_BIN_DIR)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self {
            port: free_port(),
            dir,
            running: false,
        };
        pg.resume();
        pg
    }

    fn command(program: &Path, args: &[&str]) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args).stdin(Stdio::null());
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_str().unwrap().to_owned()
    }

    /// Base URL (no database) for connections.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the cluster (again) on the same port; waits until it accepts connections.
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        let data = self.data();
        let out = Self::command(
            &pg_bin_dir().join("pg_ctl"),
            &[
                "-D",
                &data,
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
        wait_for_port(self.port, Duration::from_secs(20), "postgres");
    }

    /// Stops the cluster the way a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint, every connection dropped).
    pub fn crash(&mut self) {
        let data = self.data();
        let _ = Self::command(
            &pg_bin_dir().join("pg_ctl"),
            &["-D", &data, "-m", "immediate", "-w", "stop"],
        )
        .output();
        self.running = false;
        wait_for_port_closed(self.port, Duration::from_secs(20), "postgres");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = Self::command(
                &pg_bin_dir().join("pg_ctl"),
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            )
            .output();
        }
    }
}

/// A real `gateway` process (`serve`, `relay` or `migrate`), configured by environment.
/// Its output goes to a log file, printed by [`Gateway::log`] for failure messages.
pub struct Gateway {
    child: Option<Child>,
    pub command: &'static str,
    pub env: Vec<(String, String)>,
    /// `GATEWAY_LISTEN`'s port (`serve`: the API; `relay`: health and metrics).
    pub port: Option<u16>,
    log: PathBuf,
    _dir: TempDir,
}

/// The environment every gateway process of one test shares.
#[derive(Clone, Debug)]
pub struct GatewayEnv {
    pub database_url: String,
    pub nats_url: String,
    pub admin_key: String,
    pub stream: String,
    pub subject_prefix: String,
    /// Further variables (`RELAY_*`, `RECONCILE_*`, …).
    pub extra: Vec<(String, String)>,
}

impl GatewayEnv {
    fn vars(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("DATABASE_URL".to_owned(), self.database_url.clone()),
            ("NATS_URL".to_owned(), self.nats_url.clone()),
            ("GATEWAY_ADMIN_KEY".to_owned(), self.admin_key.clone()),
            ("OPS_STREAM".to_owned(), self.stream.clone()),
            ("OPS_SUBJECT_PREFIX".to_owned(), self.subject_prefix.clone()),
            ("DATABASE_MAX_CONNECTIONS".to_owned(), "8".to_owned()),
            ("RELAY_POLL_INTERVAL_MS".to_owned(), "200".to_owned()),
            ("RECONCILE_INTERVAL_MS".to_owned(), "500".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        v.extend(self.extra.iter().cloned());
        v
    }
}

impl Gateway {
    fn spawn(command: &'static str, env: &GatewayEnv, port: Option<u16>) -> Self {
        let dir = TempDir::new("gwtest-proc");
        let log = dir.path().join(format!("{command}.log"));
        let mut vars = env.vars();
        if let Some(port) = port {
            vars.push(("GATEWAY_LISTEN".into(), format!("127.0.0.1:{port}")));
        }
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg(command)
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("the gateway binary runs");
        Self {
            child: Some(child),
            command,
            env: vars,
            port,
            log,
            _dir: dir,
        }
    }

    /// Runs `gateway migrate` to completion (migrations, JetStream definitions, admin key).
    pub fn migrate(env: &GatewayEnv) {
        let mut g = Self::spawn("migrate", env, None);
        let status = g.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "gateway migrate failed:\n{}", g.log());
    }

    /// Starts `gateway serve` (API + reconciler + dead letters) on a free port and waits
    /// until `/healthz` answers.
    pub async fn serve(env: &GatewayEnv) -> Self {
        Self::serve_on(env, free_port()).await
    }

    /// Starts `gateway serve` on `port`.
    pub async fn serve_on(env: &GatewayEnv, port: u16) -> Self {
        let g = Self::spawn("serve", env, Some(port));
        g.wait_healthy().await;
        g
    }

    /// Starts `gateway relay` (its health and metrics on a free port).
    pub fn relay(env: &GatewayEnv) -> Self {
        Self::spawn("relay", env, Some(free_port()))
    }

    /// The base URL of `GATEWAY_LISTEN` (for `serve`, the API).
    pub fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.port.expect("a listening process")
        )
    }

    async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway serve did not come up:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The OS process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `SIGKILL`: the process dies at once, wherever it is, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// What the process wrote so far.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Keep failure messages readable: the end is what matters.
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One deployment under test: a fresh database, its own stream and subject prefix, and
/// the shared environment of its gateway processes, migrated by a real `gateway
/// migrate`. On drop it removes its database and streams (they may live on the shared
/// servers).
pub struct Deployment {
    pub env: GatewayEnv,
    /// The relays' dispatch signing key (in `env`); workers trust its public half.
    pub dispatch_key: gateway_proto::signing::SigningKey,
    pub names: gateway::config::NatsNames,
    /// The test's own connection to the deployment's database.
    pub pool: sqlx::PgPool,
    pub http: reqwest::Client,
    database: String,
    pg_base: String,
}

impl Deployment {
    /// Migrates a new deployment on the PostgreSQL at `pg_base` (no database in the URL)
    /// and the NATS at `nats_url`. `extra` adds or overrides gateway variables.
    pub async fn new(pg_base: &str, nats_url: &str, extra: &[(&str, &str)]) -> Self {
        let id = super::unique();
        let database = format!("gwtest_{id}");
        let names = gateway::config::NatsNames {
            stream: format!("T{id}"),
            subject_prefix: format!("t{id}.ops"),
        };
        let dispatch_key = gateway_proto::signing::SigningKey::from_seed(rand::random());
        let key_var = ("GATEWAY_DISPATCH_SIGNING_KEY", dispatch_key.to_text());
        let env = GatewayEnv {
            database_url: format!("{pg_base}/{database}"),
            nats_url: nats_url.to_owned(),
            admin_key: format!("admin-{}", uuid::Uuid::new_v4().simple()),
            stream: names.stream.clone(),
            subject_prefix: names.subject_prefix.clone(),
            extra: std::iter::once((key_var.0, key_var.1.as_str()))
                .chain(extra.iter().copied())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let deployment = Self {
            pool: sqlx::PgPool::connect_lazy(&env.database_url).unwrap(),
            env,
            dispatch_key,
            names,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            database,
            pg_base: pg_base.to_owned(),
        };
        let env = deployment.env.clone();
        tokio::task::spawn_blocking(move || Gateway::migrate(&env))
            .await
            .unwrap();
        deployment
    }

    /// A JetStream context on the deployment's NATS.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.env.nats_url).await.unwrap();
        async_nats::jetstream::new(client)
    }

    /// Applies the shipped JetStream definitions changed by `tweak` (as `gateway
    /// migrate` would apply an edited `nats/streams.json`).
    pub async fn apply_definitions(
        &self,
        tweak: impl FnOnce(&mut gateway::jetstream::Definitions),
    ) {
        let mut defs = gateway::jetstream::Definitions::shipped().unwrap();
        tweak(&mut defs);
        let zones: Vec<String> = super::ZONES.iter().map(|z| z.to_string()).collect();
        gateway::jetstream::apply_definitions(&self.jetstream().await, &self.names, &zones, &defs)
            .await
            .unwrap();
    }

    /// Creates a tenant through the API at `url`.
    pub async fn tenant(&self, url: &str) -> String {
        let id = format!("t-{}", super::unique());
        let (status, body) = self.post(url, "/v1/tenants", json!({ "id": id })).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        id
    }

    /// `POST` with the admin key; the answer's status and JSON body.
    pub async fn post(&self, url: &str, path: &str, body: Value) -> (reqwest::StatusCode, Value) {
        let res = self
            .http
            .post(format!("{url}{path}"))
            .bearer_auth(&self.env.admin_key)
            .json(&body)
            .send()
            .await
            .expect("the gateway answers");
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Submits a create of `kind` (an API path segment) and returns the 202's body.
    pub async fn create(
        &self,
        url: &str,
        tenant: &str,
        kind: &str,
        name: &str,
        zone: &str,
    ) -> Value {
        let (status, body) = self
            .post(
                url,
                &format!("/v1/tenants/{tenant}/{kind}"),
                json!({"name": name, "zone": zone, "spec": super::example_spec(kind)}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
        body
    }

    /// An operation, read from the database: `(state, attempt, error code)`.
    pub async fn operation(&self, id: uuid::Uuid) -> (String, i32, Option<String>) {
        sqlx::query_as("SELECT state, attempt, error->>'code' FROM operations WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits (at most `timeout`) until operation `id` is in a terminal state; returns
    /// `(state, attempt, error code)`.
    pub async fn wait_terminal(
        &self,
        id: uuid::Uuid,
        timeout: Duration,
    ) -> (String, i32, Option<String>) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let op = self.operation(id).await;
            if ["succeeded", "failed", "cancelled"].contains(&op.0.as_str()) {
                return op;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operation {id} did not end: {op:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one series in `url`'s `/metrics` (0 when absent).
    pub async fn metric(&self, url: &str, series: &str) -> f64 {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits (at most `timeout`) until the outbox is empty: a relay deletes its rows
    /// only after JetStream's acks, which may trail the workers' reports.
    pub async fn wait_outbox_empty(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.scalar("SELECT count(*) FROM outbox").await;
            if left == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} outbox rows left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `timeout`) until no operation is active; panics with a census.
    pub async fn wait_all_terminal(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let active = self
                .scalar(
                    "SELECT count(*) FROM operations
                     WHERE state IN ('queued', 'pending', 'dispatched', 'running')",
                )
                .await;
            if active == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let census: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT state, count(*) FROM operations GROUP BY state ORDER BY state",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap();
                panic!("{active} operations still active after {timeout:?}: {census:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One `bigint` from `sql`.
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Messages in the operations stream.
    pub async fn stream_messages(&self) -> u64 {
        let js = self.jetstream().await;
        let mut stream = js.get_stream(&self.names.stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Starts `replicas` worker pools for each `(service, zone)` of `pools`, replica `i`
    /// reporting to `gateway_urls[i % len]`, all sharing `driver` (so its counters see
    /// every execution). Each replica has its own NATS connection, like a worker process.
    /// Call once per deployment: it gives every pool a new key.
    pub async fn workers<D: workers::Driver + Clone>(
        &self,
        gateway_urls: &[String],
        driver: D,
        pools: &[(gateway_proto::Service, &str)],
        replicas: usize,
        max_deliver: i64,
    ) -> Workers {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        for (service, zone) in pools {
            let key = gateway::app::worker_key(&self.pool, *service, zone)
                .await
                .unwrap();
            for replica in 0..replicas {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(&self.env.nats_url)
                    .await
                    .unwrap();
                let config = workers::PoolConfig {
                    service: *service,
                    zone: zone.to_string(),
                    stream: self.names.stream.clone(),
                    gateway_url: gateway_urls[replica % gateway_urls.len()].clone(),
                    gateway_key: key.clone(),
                    concurrency: 16,
                    max_deliver,
                    dispatch_keys: self.dispatch_key.public_key().into(),
                };
                let (driver, stop) = (driver.clone(), shutdown.clone());
                tasks.push(tokio::spawn(async move {
                    let js = async_nats::jetstream::new(client);
                    workers::run_pool(js, config, driver, stop).await.unwrap();
                }));
            }
        }
        Workers { tasks, shutdown }
    }
}

/// Every `(service, zone)` pool.
pub fn all_pools() -> Vec<(gateway_proto::Service, &'static str)> {
    let mut pools = Vec::new();
    for zone in super::ZONES {
        for service in gateway_proto::Service::ALL {
            pools.push((*service, zone));
        }
    }
    pools
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let (database, stream, nats_url, pg_base) = (
            self.database.clone(),
            self.names.stream.clone(),
            self.env.nats_url.clone(),
            self.pg_base.clone(),
        );
        let advisories = gateway::jetstream::advisory_stream_name(&self.names);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let nats = async_nats::ConnectOptions::new().connect(&nats_url);
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), nats).await {
                    let js = async_nats::jetstream::new(client);
                    let _ = js.delete_stream(&stream).await;
                    let _ = js.delete_stream(&advisories).await;
                }
                let admin = format!("{pg_base}/postgres");
                let pg = sqlx::PgPool::connect(&admin);
                if let Ok(Ok(pool)) = tokio::time::timeout(Duration::from_secs(2), pg).await {
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

/// In-process worker pools standing in for worker processes.
pub struct Workers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Workers {
    /// Kills every pool at once, as a crash would: in-flight messages are neither
    /// acknowledged nor handed back, and their NATS connections close.
    pub async fn kill(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }

    /// Stops every pool gracefully.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
