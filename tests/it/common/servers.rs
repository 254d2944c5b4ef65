//! Private servers and real gateway processes for fault-injection tests.
//!
//! A test that stops a server must not stop the shared one everything else uses, so it
//! starts its own: [`Nats`] (a `nats-server -js` with a store in a temporary directory)
//! or [`Postgres`] (a throwaway cluster made by `initdb`, run by `pg_ctl`), each on a
//! free port. [`Gateway`] runs the real `gateway` binary (`serve`, `relay`, `migrate`)
//! configured by environment, and [`Deployment`] is what they share. Everything is killed
//! and removed on drop, even when the test panicked, so nothing outlives the test.

use super::{example_spec, http_client, unique, Answer, Client, Sandbox, ZONES};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new directory named `{prefix}-{unique}`.
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Its path.
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

/// A child process with its output in a log file, killed (`SIGKILL`: a crash, not a
/// shutdown) on drop.
struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Runs `command`, its stdout and stderr appended to `log`.
    fn spawn(command: &mut Command, log: PathBuf, what: &str) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{what} runs: {e}"));
        Self {
            child: Some(child),
            log,
        }
    }

    /// Kills the process (if it still runs) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process still runs.
    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// The OS process ID.
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the process exits by itself.
    fn wait(&mut self) -> ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// The end of what the process wrote so far (the end is what failure messages need).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private NATS server with JetStream, on a free port, with its store in a temporary
/// directory that survives restarts (so streams and messages do).
pub struct Nats {
    pub port: u16,
    // Declared before `dir`: the server dies before its store is removed.
    process: Option<Process>,
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
            process: None,
            dir: TempDir::new("gwtest-nats"),
            config,
        };
        nats.resume();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its JetStream store (of a server started without a configuration file).
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Kills the server (`SIGKILL`: a crash, not a shutdown) and waits until its port is
    /// closed.
    pub fn kill(&mut self) {
        drop(self.process.take());
        wait_for_port_closed(self.port, Duration::from_secs(10), "nats-server");
    }

    /// Makes the server read its configuration again (`SIGHUP`, as
    /// `nats-server --signal reload` does).
    pub fn reload(&self) {
        let pid = self.process.as_ref().expect("nats-server runs").pid();
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP nats-server");
    }

    /// Starts the server again on the same port with the same store.
    pub fn resume(&mut self) {
        assert!(self.process.is_none(), "nats-server already runs");
        let mut command = Command::new(nats_server_bin());
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command
                .arg("-js")
                .arg("-sd")
                .arg(self.dir.path().join("store")),
        };
        let process = Process::spawn(
            command
                .args(["-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string()),
            self.dir.path().join("nats.log"),
            "nats-server (set NATS_SERVER_BIN)",
        );
        self.process = Some(process);
        wait_for_port(self.port, Duration::from_secs(10), "nats-server");
    }
}

/// A throwaway PostgreSQL cluster on a free port (trust authentication, user
/// `postgres`). PostgreSQL refuses to run as root, so as root every command runs as the
/// `postgres` OS user, which owns the cluster's directory.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    running: bool,
    /// Started with `ssl=on` ([`Postgres::start_tls`]).
    ssl: bool,
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
        let mut pg = Self::create();
        pg.resume();
        pg
    }

    /// [`Postgres::start`], with a cluster that accepts TLS connections only: its
    /// certificate and key are `server.pem` and `server.key` of `certs`
    /// ([`super::tls::certificates`]), and a connection without TLS is rejected.
    pub fn start_tls(certs: &Path) -> Self {
        let mut pg = Self::create();
        let data = pg.dir.path().join("data");
        for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key")] {
            std::fs::copy(certs.join(from), data.join(to)).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let key = data.join("server.key").display().to_string();
        let owner = ["server.crt", "server.key", "pg_hba.conf"].map(|f| data.join(f));
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .args(&owner)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the TLS files to postgres");
        }
        let ok = Command::new("chmod")
            .args(["600", &key])
            .status()
            .unwrap()
            .success();
        assert!(ok, "chmod of the server key");
        pg.ssl = true;
        pg.resume();
        pg
    }

    /// A new cluster, not started.
    fn create() -> Self {
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
        Self {
            port: free_port(),
            dir,
            running: false,
            ssl: false,
        }
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
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 -c ssl={}",
            self.port,
            self.dir.path().display(),
            if self.ssl { "on" } else { "off" }
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
    // Declared before `_dir`: the process dies before its log is removed.
    process: Process,
    /// `GATEWAY_LISTEN`'s port (`serve`: the API; `relay`: health and metrics).
    pub port: Option<u16>,
    _dir: TempDir,
}

impl Gateway {
    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process's resident set, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.process.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

/// The environment every gateway process of one test shares.
#[derive(Clone, Debug)]
pub struct GatewayEnv {
    pub database_url: String,
    pub nats_url: String,
    pub admin_key: String,
    pub stream: String,
    pub subject_prefix: String,
    pub events_prefix: String,
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
            (
                "EVENTS_SUBJECT_PREFIX".to_owned(),
                self.events_prefix.clone(),
            ),
            ("DATABASE_MAX_CONNECTIONS".to_owned(), "8".to_owned()),
            ("RELAY_POLL_INTERVAL_MS".to_owned(), "200".to_owned()),
            ("RECONCILE_INTERVAL_MS".to_owned(), "500".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        v.extend(self.extra.iter().cloned());
        v
    }

    /// `gateway <args>` in this environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
        command
            .args(args)
            .envs(self.vars())
            .env_remove("LOG_FORMAT");
        command
    }
}

impl Gateway {
    fn spawn(command: &'static str, env: &GatewayEnv, port: Option<u16>) -> Self {
        let dir = TempDir::new("gwtest-proc");
        let mut process = env.command(&[command]);
        if let Some(port) = port {
            process.env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"));
        }
        let process = Process::spawn(
            &mut process,
            dir.path().join(format!("{command}.log")),
            "the gateway binary",
        );
        Self {
            process,
            port,
            _dir: dir,
        }
    }

    /// Runs `gateway migrate` to completion (migrations, JetStream definitions, admin key).
    pub fn migrate(env: &GatewayEnv) {
        let mut g = Self::spawn("migrate", env, None);
        let status = g.process.wait();
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

    /// Starts `gateway up` (everything: migrations, API, relay, reconciler, simulated
    /// workers for the zones it serves) on `port` and waits until `/healthz` answers.
    pub async fn up(env: &GatewayEnv, port: u16) -> Self {
        let g = Self::spawn("up", env, Some(port));
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

    /// `SIGKILL`: the process dies at once, wherever it is, as in a crash.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The end of what the process wrote so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// One deployment under test: a [`Sandbox`] on the given servers, migrated by a real
/// `gateway migrate`, and the environment its gateway processes share.
pub struct Deployment {
    pub env: GatewayEnv,
    /// The relays' dispatch signing key (in `env`); workers trust its public half.
    pub dispatch_key: gateway_proto::signing::SigningKey,
    pub names: gateway::config::NatsNames,
    /// The test's own connection to the deployment's database.
    pub pool: sqlx::PgPool,
    /// An HTTP client for raw requests (pooled connections dropped after 5 s idle).
    pub http: reqwest::Client,
    _sandbox: Sandbox,
}

impl Deployment {
    /// Migrates a new deployment on the PostgreSQL at `pg_base` (no database in the URL)
    /// and the NATS at `nats_url`. `extra` adds or overrides gateway variables.
    pub async fn new(pg_base: &str, nats_url: &str, extra: &[(&str, &str)]) -> Self {
        let sandbox = Sandbox::new(pg_base, nats_url);
        let names = sandbox.names.clone();
        let dispatch_key = gateway_proto::signing::SigningKey::from_seed(rand::random());
        let key_var = ("GATEWAY_DISPATCH_SIGNING_KEY", dispatch_key.to_text());
        let env = GatewayEnv {
            database_url: sandbox.database_url(),
            nats_url: nats_url.to_owned(),
            admin_key: format!("admin-{}", uuid::Uuid::new_v4().simple()),
            stream: names.stream.clone(),
            subject_prefix: names.subject_prefix.clone(),
            events_prefix: names.events_prefix.clone(),
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
            http: http_client(Some(Duration::from_secs(30))),
            _sandbox: sandbox,
        };
        let env = deployment.env.clone();
        tokio::task::spawn_blocking(move || Gateway::migrate(&env))
            .await
            .unwrap();
        deployment
    }

    /// Two `gateway serve` replicas of this deployment, and an admin client of each.
    pub async fn two_replicas(&self) -> [(Gateway, Client); 2] {
        let (a, b) = (
            Gateway::serve(&self.env).await,
            Gateway::serve(&self.env).await,
        );
        let (ca, cb) = (self.client(&a.url()), self.client(&b.url()));
        [(a, ca), (b, cb)]
    }

    /// A client of the API at `url` (one of this deployment's `gateway serve`), with the
    /// admin key.
    pub fn client(&self, url: &str) -> Client {
        Client {
            url: url.to_owned(),
            admin_key: self.env.admin_key.clone(),
            http: self.http.clone(),
        }
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
        let zones: Vec<String> = ZONES.iter().map(|z| z.to_string()).collect();
        gateway::jetstream::apply_definitions(
            &self.jetstream().await,
            &self.names,
            &zones,
            &super::builtin_services(),
            &defs,
        )
        .await
        .unwrap();
    }

    /// Creates a tenant through the API at `url`.
    pub async fn tenant(&self, url: &str) -> String {
        self.client(url).tenant().await
    }

    /// `POST` with the admin key to the API at `url`; the answer's status and JSON body.
    pub async fn post(&self, url: &str, path: &str, body: Value) -> (reqwest::StatusCode, Value) {
        let Answer { status, body, .. } = self.client(url).post(path, body).await;
        (status, body)
    }

    /// Submits a create of `kind` (an API path segment) with its example spec through
    /// the API at `url`, and returns the 202's body.
    pub async fn create(
        &self,
        url: &str,
        tenant: &str,
        kind: &str,
        name: &str,
        zone: &str,
    ) -> Value {
        self.client(url)
            .create(tenant, kind, name, zone, example_spec(kind))
            .await
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
        super::metric(url, series).await
    }

    /// Waits (at most `timeout`) until the outbox is empty: a relay deletes its rows
    /// only after JetStream's acks, which may trail the workers' reports.
    pub async fn wait_outbox_empty(&self, timeout: Duration) {
        super::wait_outbox_empty(&self.pool, timeout).await;
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
        super::scalar(&self.pool, sql).await
    }

    /// Messages in the operations stream.
    pub async fn stream_messages(&self) -> u64 {
        let js = self.jetstream().await;
        let mut stream = js.get_stream(&self.names.stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Waits (at most `timeout`) until every message of the operations stream has been
    /// acknowledged (acks trail the reports).
    pub async fn wait_stream_empty(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.stream_messages().await;
            if left == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} messages never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
        // Never cancelled: pools end by being killed, as worker processes would.
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        for (service, zone) in pools {
            let key = gateway::app::worker_key(&self.pool, service, zone)
                .await
                .unwrap();
            for replica in 0..replicas {
                let client = async_nats::ConnectOptions::new()
                    .retry_on_initial_connect()
                    .connect(&self.env.nats_url)
                    .await
                    .unwrap();
                let config = workers::PoolConfig {
                    service: service.clone(),
                    zone: zone.to_string(),
                    stream: self.names.stream.clone(),
                    gateway_url: gateway_urls[replica % gateway_urls.len()].clone(),
                    gateway_key: key.clone(),
                    concurrency: 16,
                    max_deliver,
                    dispatch_keys: self.dispatch_key.public_key().into(),
                    report_batch: workers::PoolConfig::DEFAULT_REPORT_BATCH,
                };
                let (driver, stop) = (driver.clone(), shutdown.clone());
                tasks.push(tokio::spawn(async move {
                    let js = async_nats::jetstream::new(client);
                    workers::run_pool(js, config, driver, stop).await.unwrap();
                }));
            }
        }
        Workers { tasks }
    }
}

/// Every `(service, zone)` pool.
pub fn all_pools() -> Vec<(gateway_proto::Service, &'static str)> {
    let mut pools = Vec::new();
    for zone in ZONES {
        for service in super::builtin_services() {
            pools.push((service, zone));
        }
    }
    pools
}

/// In-process worker pools standing in for worker processes; killed on drop.
pub struct Workers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
}

impl Drop for Workers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
