//! On-demand benchmark: `cargo bench --bench throughput`.
//!
//! Each measurement runs next to a raw baseline measured in the same run, on the same
//! PostgreSQL and NATS, and prints the ratio, so numbers from different machines compare:
//!
//! 1. **Submit**: `POST /v1/tenants/{t}/vms` through the whole gateway (auth, rate limit,
//!    validation, idempotency, group commit, audit row) vs. the raw baseline of the
//!    same three INSERTs (resource, operation, outbox) in one transaction with sqlx, at
//!    8 and at 32 clients, in [`ROUNDS`] rounds that alternate the two; with the CPU an
//!    operation cost each side and how busy the machine was (a ratio below one with the
//!    machine idle half the time is waiting, not work), the gateway's mean time to
//!    answer a create and how many creates shared a transaction.
//!    `BENCH_WRITE_BATCH` sets the gateway's `GATEWAY_WRITE_BATCH` (`1`: a transaction
//!    per create, as before the group commit).
//! 2. **Relay**: outbox rows to JetStream acks through the relay (its operations loops,
//!    each passing again as soon as its own pass is done, as `Relay::run` runs them)
//!    vs. raw `publish_with_headers` of the same messages (bodies and headers, the
//!    signature copied rather than computed; [`RAW_COPIES`] copies of each) with as
//!    many acks outstanding as the relay's loops together may have (batch size ×
//!    loops), in [`ROUNDS`] rounds that alternate the two; with the CPU a message cost
//!    each side (this process, PostgreSQL, `nats-server`), which says where the relay's
//!    extra time goes.
//!    `BENCH_RELAY_BATCH` and `BENCH_RELAY_PASSES` set the batch size and the loops.
//! 3. **Reads**: `GET /v1/operations/{id}` and `GET /v1/tenants/{t}/vms/{id}` through
//!    the gateway vs. the raw primary-key `SELECT` of the same row from sqlx, at the
//!    same concurrency: 10,000 reads round robin over the 4,000 rows the submits made
//!    (each read two or three times, as polls repeat; the share the read cache answered
//!    is printed), then again with `Cache-Control: no-cache`, every read from the
//!    database; in [`ROUNDS`] rounds, each reading its own quarter of the rows all three
//!    ways, so a row's first read is its only miss however fast the machine is.
//! 4. **End to end**: create → `succeeded` with in-process workers (zero-latency
//!    simulated driver), operations per second and latency percentiles, in a burst and
//!    then at a steady quarter and half of the burst's rate; with the lag from a change's commit to
//!    its event reaching a reader of the events stream (on NATS) and a watch client
//!    (server-sent events through the gateway's API), each phase once what the
//!    earlier ones left is published and sealed; then half the rate again without
//!    those two readers, under the burst's own load, and likewise at 500 operations/s
//!    (the rate issue 12 sets its relay-lag target at), and at any further rates
//!    `BENCH_RATES` lists (`BENCH_RATES=50,100,200`: what an operation costs against the
//!    rate, down to the fixed cost of one operation alone). Each steady phase also prints the
//!    gateway's mean time to answer for the routes an operation's life takes (create,
//!    long-poll, single and batched reports), from its own request histogram. The burst
//!    and each steady phase print the CPU time an operation cost (this process — the
//!    gateway, its workers and the clients —, PostgreSQL's processes, `nats-server`),
//!    how busy the machine was, and the database transactions per operation (reads
//!    included): a latency that grows with the rate is CPU queueing when the machine is
//!    busy, and the transactions say how well the work was batched.
//!
//! 5. **Growth** (`BENCH_GROWTH=1`): submit, reads (each from the database) and a list
//!    page through a gateway whose database holds 1,000,000 (`BENCH_GROWTH_ROWS`) live
//!    resources and finished operations, against a gateway alike on an empty database,
//!    in [`ROUNDS`] rounds that alternate the two; the ratios and the grown tables'
//!    sizes.
//! 6. **Overload** (`BENCH_OVERLOAD=1`): a `gateway serve` process of its own, and
//!    1,000 clients, each on its own connection, submitting as fast as they can: admitted
//!    and refused (`503 overloaded`) rates, the admitted requests' latency (seen by the
//!    clients, and measured by the gateway), and the gateway's peak memory.
//!
//! `BENCH_OPS` sets the operations per phase (2,000), for a longer run or one long
//! enough to profile; `BENCH_STATEMENTS=1` adds each phase's costliest statements
//! (from `pg_stat_statements`, see [`statements_wanted`]). Memory is the process's
//! resident set size before and after.
//! Needs PostgreSQL and NATS as for the tests (`scripts/services.sh`). Each gateway it
//! starts has a database and streams of its own, removed at the end of its phases, and
//! also when the run is stopped early (Ctrl-C, `SIGTERM`) or a phase panics.

/// The allocator the `gateway` binary runs with (`src/main.rs`): the gateway measured here
/// is the one that binary runs, and the raw baselines share the process.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use gateway::app::{self, Parts};
use gateway::config::{Config, NatsNames};
use gateway_proto::signing::SigningKey;
use serde_json::json;
use std::time::{Duration, Instant};

/// Operations per phase: `BENCH_OPS`, 2,000 unless set (more for a longer, steadier
/// run, or to profile one phase).
fn ops() -> usize {
    static OPS: std::sync::LazyLock<usize> =
        std::sync::LazyLock::new(|| env_or("BENCH_OPS", 2_000));
    *OPS
}
const CONCURRENCY: usize = 32;
/// The submit and read comparisons run in this many rounds, the raw baseline and the
/// gateway taking turns on equal slices of the load, and each side's times are added up:
/// a machine that slows down or speeds up during the run (other tenants of the host,
/// its clock) moves both sides alike instead of whichever ran in the slow stretch.
const ROUNDS: usize = 4;
/// The relay comparison's raw baseline publishes each message this many times (each copy
/// a message of its own): the relay's slice of a round takes about a tenth of a second,
/// and the raw publish of the same messages once, a few hundredths, short enough for a
/// scheduler's hiccup to halve or double its rate between runs.
const RAW_COPIES: usize = 4;

fn rss_mib() -> f64 {
    proc_status_mib("/proc/self/status", "VmRSS:")
}

/// A memory figure (`VmRSS:`, `VmHWM:`) of a `/proc/…/status` file, in MiB.
fn proc_status_mib(path: &str, field: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time used so far, in seconds: by this process (the gateway, its in-process
/// workers and the benchmark's clients), by PostgreSQL's processes (with the backends
/// that have exited, counted by their parent) and by `nats-server`; and the machine's
/// busy and total time (`/proc/stat`), to say how busy it was.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    this: f64,
    postgres: f64,
    nats: f64,
    busy: f64,
    total: f64,
}

/// Clock ticks per second of `/proc`'s CPU times.
fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

impl Cpu {
    fn now() -> Self {
        let mut cpu = Self::default();
        let ticks = ticks();
        let this = std::process::id().to_string();
        let dirs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        for dir in dirs {
            let Ok(stat) = std::fs::read_to_string(dir.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: utime, stime, cutime, cstime are the 14th to
            // 17th fields, the 12th to 15th after the command's closing parenthesis.
            let Some((head, tail)) = stat.rsplit_once(") ") else {
                continue;
            };
            let comm = head.split_once(" (").map_or("", |(_, c)| c);
            let f: Vec<f64> = tail
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse().ok())
                .collect();
            if f.len() < 4 {
                continue;
            }
            let own = (f[0] + f[1]) / ticks;
            if dir.file_name() == this.as_str() {
                cpu.this = own;
            } else if comm == "postgres" {
                cpu.postgres += own + (f[2] + f[3]) / ticks;
            } else if comm == "nats-server" {
                cpu.nats += own;
            }
        }
        if let Some(line) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let f: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            cpu.total = f.iter().sum::<f64>() / ticks;
            // idle and iowait
            cpu.busy = cpu.total - (f.get(3).unwrap_or(&0.0) + f.get(4).unwrap_or(&0.0)) / ticks;
        }
        cpu
    }

    /// Adds what was used from `before` to now.
    fn add_since(&mut self, before: &Cpu) {
        let now = Cpu::now();
        self.this += now.this - before.this;
        self.postgres += now.postgres - before.postgres;
        self.nats += now.nats - before.nats;
        self.busy += now.busy - before.busy;
        self.total += now.total - before.total;
    }

    /// What was used since `before`, per operation of `ops`, as a line.
    fn per_op(&self, before: &Cpu, ops: usize) -> String {
        let ms = |a: f64, b: f64| (a - b) / ops as f64 * 1e3;
        format!(
            "cpu        per operation: {:.2} ms this process (gateway, workers, clients), \
             {:.2} ms PostgreSQL, {:.2} ms NATS; machine {:.0} % busy",
            ms(self.this, before.this),
            ms(self.postgres, before.postgres),
            ms(self.nats, before.nats),
            (self.busy - before.busy) / (self.total - before.total).max(1e-9) * 100.0
        )
    }
}

/// The CPU used, and the transactions committed in the benchmark's database, since a
/// phase began.
struct Spent {
    cpu: Cpu,
    commits: i64,
}

impl Spent {
    async fn since_now(pool: &sqlx::PgPool) -> Self {
        if statements_wanted() {
            // Counted from here (the extension's counters are the whole server's). Its
            // functions exist in a database once the extension is created there; each
            // statement on its own, so a server that does not preload it keeps the
            // extension and its reason ("must be loaded via shared_preload_libraries").
            for sql in [
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
                "SELECT pg_stat_statements_reset()",
            ] {
                let _ = sqlx::query(sql).execute(pool).await;
            }
        }
        Self {
            cpu: Cpu::now(),
            commits: commits(pool).await,
        }
    }

    /// What the phase used per operation of `ops`, as a line (and, with
    /// `BENCH_STATEMENTS`, a line per statement).
    async fn per_op(&self, pool: &sqlx::PgPool, ops: usize) -> String {
        let cpu = Cpu::now().per_op(&self.cpu, ops);
        // The statistics reach `pg_stat_database` when a backend reports them, at most
        // a second late: let the phase's last ones arrive.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let commits = (commits(pool).await - self.commits) as f64 / ops as f64;
        let mut out = format!("{cpu}; {commits:.1} database transactions (reads too)");
        if statements_wanted() {
            out.push_str(&statements(pool, ops).await);
        }
        out
    }
}

/// `BENCH_STATEMENTS=1`: each phase's `cpu` line is followed by the statements the
/// benchmark's database spent the most time on in it (calls and time per operation, and
/// the mean time of a call), from `pg_stat_statements` (which the server must preload:
/// `shared_preload_libraries = 'pg_stat_statements'`).
fn statements_wanted() -> bool {
    std::env::var_os("BENCH_STATEMENTS").is_some()
}

/// The phase's costliest statements in the benchmark's database, per operation.
async fn statements(pool: &sqlx::PgPool, ops: usize) -> String {
    let rows: Result<Vec<(i64, f64, f64, String)>, _> = sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time DESC LIMIT 16",
    )
    .fetch_all(pool)
    .await;
    match rows {
        Ok(rows) => rows
            .into_iter()
            .map(|(calls, total, mean, query)| {
                format!(
                    "\nstatement  {:>6.2}/op  {:>6.3} ms/op  mean {:.3} ms  {query}",
                    calls as f64 / ops as f64,
                    total / ops as f64,
                    mean
                )
            })
            .collect(),
        Err(e) => format!("\nstatement  pg_stat_statements unavailable: {e}"),
    }
}

/// Transactions committed in the benchmark's database so far.
async fn commits(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[((n - 1) as f64 * p).round() as usize],
    }
}

struct Bench {
    config: Config,
    running: app::Running,
    url: String,
    key: String,
    http: reqwest::Client,
}

/// `BENCH_WRITE_BATCH`, if set, as the gateway's `GATEWAY_WRITE_BATCH`.
fn write_batch(c: &mut Config) {
    c.write_batch = env_or("BENCH_WRITE_BATCH", c.write_batch);
}

/// Starts the parts asked for on a database and streams of their own, with `tweak`
/// applied to the configuration first.
async fn start_with(parts: Parts, tweak: impl FnOnce(&mut Config)) -> Bench {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let base = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    // PostgreSQL on the same host is reached without TLS, as a deployment would reach
    // it (over loopback, TLS only costs CPU: about a third of the read rate here); a
    // `TEST_DATABASE_URL` of your own is used as it is (`PGSSLMODE` applies).
    let tls = if std::env::var_os("TEST_DATABASE_URL").is_none() {
        "?sslmode=disable"
    } else {
        ""
    };
    let names = NatsNames {
        region: None,
        stream: format!("B{id}"),
        subject_prefix: format!("b{id}.ops"),
        events_prefix: format!("b{id}.events"),
    };
    let mut config = Config::for_tests(format!("{base}/gwbench_{id}{tls}"), names);
    config.database_max_connections = 40;
    // The shipped background intervals, not the tests' quicker ones: the metrics'
    // database gauges every 100 ms and the reconciler's sweeps every 500 ms are load a
    // deployment does not carry.
    let shipped = Config::from_lookup(|_| None).expect("the defaults are valid");
    config.metrics_refresh = shipped.metrics_refresh;
    config.reconcile_interval = shipped.reconcile_interval;
    config.relay_poll_interval = shipped.relay_poll_interval;
    tweak(&mut config);
    Leftovers::of(&config).register();
    let backends = app::connect(&config).await.expect("PostgreSQL and NATS");
    let key = app::migrate(&config, &backends, true)
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = app::start(&config, backends, Some(listener), parts)
        .await
        .unwrap();
    let url = format!("http://{}", running.addr.unwrap());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    Bench {
        config,
        running,
        url,
        key,
        http,
    }
}

impl Bench {
    async fn tenant(&self) -> String {
        self.tenant_named("bench").await
    }

    async fn tenant_named(&self, id: &str) -> String {
        let t = id.to_string();
        self.http
            .post(format!("{}/v1/tenants", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"id": t}))
            .send()
            .await
            .unwrap();
        t
    }

    /// Submits `n` creates with `CONCURRENCY` clients; returns (elapsed, per-request latencies, op IDs).
    async fn submit(
        &self,
        tenant: &str,
        prefix: &str,
        n: usize,
    ) -> (Duration, Vec<Duration>, Vec<String>) {
        self.submit_from(CONCURRENCY, tenant, prefix, n).await
    }

    /// [`Self::submit`] from `clients` clients.
    async fn submit_from(
        &self,
        clients: usize,
        tenant: &str,
        prefix: &str,
        n: usize,
    ) -> (Duration, Vec<Duration>, Vec<String>) {
        let started = Instant::now();
        let chunks: Vec<Vec<usize>> = (0..clients)
            .map(|c| (c..n).step_by(clients).collect())
            .collect();
        let results = futures::future::join_all(chunks.into_iter().map(|idx| async move {
            let mut out = Vec::new();
            for i in idx {
                let t0 = Instant::now();
                let res = self
                    .http
                    .post(format!("{}/v1/tenants/{tenant}/vms", self.url))
                    .bearer_auth(&self.key)
                    .json(&json!({"name": format!("{prefix}{i}"), "zone": if i % 2 == 0 { "zone-a" } else { "zone-b" },
                                  "spec": {"flavor": "m1.small", "image": "debian-12"}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 202);
                let op: serde_json::Value = res.json().await.unwrap();
                out.push((t0.elapsed(), op["id"].as_str().unwrap().to_owned()));
            }
            out
        }))
        .await;
        let elapsed = started.elapsed();
        let (lat, ids) = results.into_iter().flatten().unzip();
        (elapsed, lat, ids)
    }

    async fn stop(self) {
        self.running.stop().await;
        Leftovers::of(&self.config).remove().await;
    }
}

/// What a gateway of the benchmark leaves on the machine's NATS and PostgreSQL: its
/// streams (each reserves its maximum size on the server, so streams left behind by
/// interrupted runs end in `insufficient storage resources available`) and its
/// database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leftovers {
    nats_url: String,
    streams: Vec<String>,
    database: String,
}

/// The leftovers of the gateways running now, removed by [`remove_everything`] if the
/// run ends (Ctrl-C, `SIGTERM`, a panic) before their phases do.
static RUNNING: std::sync::Mutex<Vec<Leftovers>> = std::sync::Mutex::new(Vec::new());

/// The `gateway serve` processes running now (their IDs), stopped by
/// [`remove_everything`]: `exit` runs no destructor, so [`Server`]'s would not.
static SERVERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

impl Leftovers {
    fn of(config: &Config) -> Self {
        Self {
            nats_url: config.nats_url.clone(),
            streams: gateway::jetstream::stream_names(&config.nats).unwrap(),
            database: config
                .database_url
                .rsplit('/')
                .next()
                .and_then(|name| name.split('?').next())
                .unwrap()
                .to_owned(),
        }
    }

    /// Counted as running, for [`on_interrupt`] to remove.
    fn register(self) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }

    /// Deletes the streams and drops the database; no longer counted as running.
    async fn remove(self) {
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| *l != self);
        // A stream or database that was never made is no error; an unreachable server
        // leaves them behind, and says so.
        match async_nats::connect(&self.nats_url).await {
            Ok(client) => {
                let js = async_nats::jetstream::new(client);
                for stream in &self.streams {
                    let _ = js.delete_stream(stream).await;
                }
            }
            Err(e) => eprintln!("streams {:?} left on NATS: {e}", self.streams),
        }
        let base = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let db = &self.database;
        match sqlx::PgPool::connect(&format!("{base}/postgres")).await {
            Ok(admin) => {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .execute(&admin)
                    .await;
            }
            Err(e) => eprintln!("database {db} left on PostgreSQL: {e}"),
        }
    }
}

/// Waits for Ctrl-C or `SIGTERM`; then [`remove_everything`] and exits, so a run
/// stopped early (after the line it was run for, say) leaves nothing behind.
async fn on_interrupt() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("\ninterrupted: removing the benchmark's streams and databases");
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    remove_everything().await;
    std::process::exit(130);
}

/// Set once [`on_interrupt`] removes everything: a phase that panics from then on (its
/// database dropped under it) waits for the exit instead of ending the run, and the
/// removal with it.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops the `gateway serve` processes and removes what the running gateways made
/// (streams, databases): for a run that ends before its phases do.
async fn remove_everything() {
    for pid in std::mem::take(&mut *SERVERS.lock().unwrap_or_else(|e| e.into_inner())) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for leftovers in running {
        leftovers.remove().await;
    }
}

/// The raw baseline of a submit: the same three rows in one transaction, without the
/// event triggers (recording events is part of the gateway's work being measured): `n`
/// creates from `clients` clients, the resources named `{prefix}{i}`.
async fn raw_inserts(
    pool: &sqlx::PgPool,
    clients: usize,
    tenant: &str,
    prefix: &str,
    n: usize,
) -> Duration {
    let triggers = |on: bool| {
        let verb = if on { "ENABLE" } else { "DISABLE" };
        format!(
            "ALTER TABLE resources {verb} TRIGGER USER;
             ALTER TABLE operations {verb} TRIGGER USER;"
        )
    };
    sqlx::raw_sql(&triggers(false)).execute(pool).await.unwrap();
    let started = Instant::now();
    let chunks: Vec<Vec<usize>> = (0..clients)
        .map(|c| (c..n).step_by(clients).collect())
        .collect();
    futures::future::join_all(chunks.into_iter().map(|idx| async move {
        for i in idx {
            let mut tx = pool.begin().await.unwrap();
            let rid = uuid::Uuid::now_v7();
            let oid = uuid::Uuid::now_v7();
            let spec = json!({"flavor": "m1.small", "image": "debian-12", "power_state": "running"});
            sqlx::query("INSERT INTO resources (id, tenant, kind, zone, name, spec, phase) VALUES ($1, $2, 'vm', 'zone-a', $3, $4, 'provisioning')")
                .bind(rid).bind(tenant).bind(format!("{prefix}{i}")).bind(&spec)
                .execute(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO operations (id, tenant, resource_id, kind, zone, action, state, target_generation, request_id, deadline) VALUES ($1, $2, $3, 'vm', 'zone-a', 'create', 'pending', 1, 'raw', now() + interval '1 hour')")
                .bind(oid).bind(tenant).bind(rid)
                .execute(&mut *tx).await.unwrap();
            sqlx::query("INSERT INTO outbox (operation_id, subject, msg_id, payload) VALUES ($1, 'raw.vm.zone-a', $2, $3)")
                .bind(oid).bind(format!("{oid}.1")).bind(&spec)
                .execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
    }))
    .await;
    let elapsed = started.elapsed();
    sqlx::raw_sql(&triggers(true)).execute(pool).await.unwrap();
    elapsed
}

/// `n` requests for `paths` (round robin) from `CONCURRENCY` clients.
async fn gets(b: &Bench, paths: &[String], n: usize) -> Duration {
    gets_with(b, paths, n, false).await
}

/// [`gets`]; with `fresh`, each asks for a database read (`Cache-Control: no-cache`).
async fn gets_with(b: &Bench, paths: &[String], n: usize, fresh: bool) -> Duration {
    let started = Instant::now();
    futures::future::join_all((0..CONCURRENCY).map(|c| async move {
        for i in (c..n).step_by(CONCURRENCY) {
            let mut req = b
                .http
                .get(format!("{}{}", b.url, paths[i % paths.len()]))
                .bearer_auth(&b.key);
            if fresh {
                req = req.header("cache-control", "no-cache");
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.bytes().await.unwrap();
        }
    }))
    .await;
    started.elapsed()
}

/// `n` primary-key `SELECT`s of `ids` (round robin) from `CONCURRENCY` clients.
async fn raw_selects(pool: &sqlx::PgPool, sql: &str, ids: &[uuid::Uuid], n: usize) -> Duration {
    let started = Instant::now();
    futures::future::join_all((0..CONCURRENCY).map(|c| async move {
        for i in (c..n).step_by(CONCURRENCY) {
            let row: Option<sqlx::postgres::PgRow> = sqlx::query(sql)
                .bind(ids[i % ids.len()])
                .fetch_optional(pool)
                .await
                .unwrap();
            assert!(row.is_some());
        }
    }))
    .await;
    started.elapsed()
}

/// Reads through the gateway vs raw primary-key `SELECT`s of the same rows.
async fn reads(b: &Bench, tenant: &str) {
    let pool = b.running.backends.pool.clone();
    let rows: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
        "SELECT o.id, o.resource_id FROM operations o WHERE o.tenant = $1 AND o.request_id <> 'raw'",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    // Each case runs about a second: shorter runs were noisier than the ratio's gap.
    let n = ops() * 5;
    let cases = [
        (
            "read op ",
            rows.iter()
                .map(|r| format!("/v1/operations/{}", r.0))
                .collect::<Vec<_>>(),
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            "SELECT * FROM operations WHERE id = $1",
        ),
        (
            "read vm ",
            rows.iter()
                .map(|r| format!("/v1/tenants/{tenant}/vms/{}", r.1))
                .collect(),
            rows.iter().map(|r| r.1).collect(),
            "SELECT * FROM resources WHERE id = $1",
        ),
    ];
    for (what, paths, ids, sql) in cases {
        let hits = || {
            cache_hits(
                b,
                if what.contains("op") {
                    "operations"
                } else {
                    "resources"
                },
            )
        };
        let (mut raw, mut through, mut fresh, mut hit) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0.0);
        // Each round reads its own quarter of the rows, each two or three times.
        let group = paths.len().div_ceil(ROUNDS);
        for (paths, ids) in paths.chunks(group).zip(ids.chunks(group)) {
            raw += raw_selects(&pool, sql, ids, n / ROUNDS).await;
            let before = hits().await;
            through += gets(b, paths, n / ROUNDS).await;
            hit += hits().await - before;
            fresh += gets_with(b, paths, n / ROUNDS, true).await;
        }
        let hit = hit / n as f64;
        println!(
            "{what} gateway {:>8.0} req/s   raw sqlx {:>8.0} req/s   ratio {:.2}   ({:.0} % from the read cache; every read from the database: {:.0} req/s, ratio {:.2})",
            rate(n, through),
            rate(n, raw),
            raw.as_secs_f64() / through.as_secs_f64(),
            hit * 100.0,
            rate(n, fresh),
            raw.as_secs_f64() / fresh.as_secs_f64()
        );
    }
}

/// Reads of the read cache `cache` (`operations`, `resources`) it answered so far.
async fn cache_hits(b: &Bench, cache: &str) -> f64 {
    let series = format!("gateway_cache_requests_total{{cache=\"{cache}\",result=\"hit\"}} ");
    metrics_text(&b.http, &b.url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Time one side of the growth comparison took on each path, over its rounds, at
/// `CONCURRENCY` clients.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    submit: Duration,
    read_op: Duration,
    read_vm: Duration,
    list: Duration,
}

/// Submits `n` creates into a new tenant `tenant`, then makes `2 n` reads of its
/// operations and of its VMs (each read twice, as polls repeat) and `2 n` reads of its
/// first page of VMs (100 a page), all through the gateway; adds the time each took to
/// `times`.
async fn growth_round(b: &Bench, tenant: &str, n: usize, times: &mut Times) {
    b.tenant_named(tenant).await;
    let (submitted, _, _) = b.submit(tenant, "g", n).await;
    times.submit += submitted;
    let rows: Vec<(uuid::Uuid, uuid::Uuid)> =
        sqlx::query_as("SELECT id, resource_id FROM operations WHERE tenant = $1")
            .bind(tenant)
            .fetch_all(&b.running.backends.pool)
            .await
            .unwrap();
    let polls: Vec<String> = rows
        .iter()
        .map(|r| format!("/v1/operations/{}", r.0))
        .collect();
    let vms: Vec<String> = rows
        .iter()
        .map(|r| format!("/v1/tenants/{tenant}/vms/{}", r.1))
        .collect();
    let list = [format!("/v1/tenants/{tenant}/vms?limit=100")];
    // Every read from the database (`no-cache`): the read cache would answer repeated
    // reads the same however large the tables, and growth is about the tables.
    times.read_op += gets_with(b, &polls, GROWTH_READS * n, true).await;
    times.read_vm += gets_with(b, &vms, GROWTH_READS * n, true).await;
    times.list += gets(b, &list, GROWTH_LISTS * n).await;
}

/// Reads of each kind in a growth round, per create of the round: each read a fraction
/// of a second of load, enough that the machine's noise does not decide the ratio (with
/// two reads a create, 1,000 a round, the read ratios were 0.86 and 0.88 in one run,
/// 0.97 and 1.01 in the next).
const GROWTH_READS: usize = 8;

/// List pages in a growth round, per create of the round.
const GROWTH_LISTS: usize = 4;

/// Adds `rows` live VMs (over 100 other tenants) and as many finished operations, as a
/// year of use would leave them, straight in SQL (triggers off: no events, no
/// replication log), then vacuums and checkpoints them. Returns how long it took.
async fn seed(pool: &sqlx::PgPool, rows: i64) -> Duration {
    let started = Instant::now();
    let mut conn = pool.acquire().await.unwrap();
    // A UUID that sorts by `g`, as the gateway's UUIDv7s sort by time.
    let id = "encode(overlay(uuid_send(gen_random_uuid()) placing substring(int8send(1600000000000 + g) from 3) from 1 for 6), 'hex')::uuid";
    let sql = format!(
        "SET session_replication_role = replica;
         INSERT INTO tenants (id) SELECT 'grow-' || t FROM generate_series(1, 100) t ON CONFLICT DO NOTHING;
         INSERT INTO resources (id, tenant, kind, zone, name, spec, phase, observed_generation, created_at, updated_at)
           SELECT {id}, 'grow-' || (g % 100 + 1), 'vm', 'zone-a', 'g' || g,
                  '{{\"flavor\": \"m1.small\", \"image\": \"debian-12\", \"power_state\": \"running\"}}', 'ready', 1,
                  now() - interval '365 days' + g * interval '10 ms', now() - interval '1 day'
             FROM generate_series(1, {rows}) g;
         INSERT INTO operations (id, tenant, resource_id, kind, zone, action, state, attempt, dispatches,
                                 target_generation, request_id, created_at, updated_at, started_at, finished_at, deadline)
           SELECT {id}, r.tenant, r.id, 'vm', 'zone-a', 'create', 'succeeded', 1, 1, 1, 'growth',
                  r.created_at, r.created_at, r.created_at, r.created_at, r.created_at + interval '1 hour'
             FROM (SELECT row_number() OVER () AS g, * FROM resources WHERE tenant LIKE 'grow-%') r;
         SET session_replication_role = origin;"
    );
    // The pool's 30 s statement timeout is off meanwhile: on a slow machine the million
    // rows' inserts and their vacuum take longer. A year-old table has been vacuumed
    // (hint bits and visibility map set) and its pages written out long ago; freshly
    // bulk-loaded ones have not, and the first reads after the load would pay for it
    // (and race autovacuum) in the "after" rates.
    for step in [
        "SET statement_timeout = 0",
        &sql,
        "VACUUM (ANALYZE) resources, operations",
        "CHECKPOINT",
        "RESET statement_timeout",
    ] {
        sqlx::raw_sql(step).execute(&mut *conn).await.unwrap();
    }
    started.elapsed()
}

/// The growth run (`BENCH_GROWTH=1`; `BENCH_GROWTH_ROWS`, default 1,000,000): the
/// gateway's submit, read and list rates on a database with that many more live
/// resources and finished operations, against the same on an empty one.
async fn growth() {
    let rows: i64 = env_or("BENCH_GROWTH_ROWS", 1_000_000);
    // Two gateways alike, each on a database of its own, one of them seeded: the two
    // sides take turns (a machine that slows down meanwhile slows both), where the
    // rates were measured on one database before its seeding and after it.
    let api = || {
        start_with(
            Parts {
                api: true,
                ..Default::default()
            },
            write_batch,
        )
    };
    let (empty, grown) = (api().await, api().await);
    let pool = grown.running.backends.pool.clone();
    let took = seed(&pool, rows).await;
    // Vacuumed and analyzed as the seeded side is (and as autovacuum would).
    sqlx::raw_sql("VACUUM (ANALYZE) resources, operations")
        .execute(&empty.running.backends.pool)
        .await
        .unwrap();
    println!("growth   {rows} live resources and {rows} finished operations added in {took:.0?}");
    let n = ops() / ROUNDS;
    // Both gateways are new: warmed up alike first (connections, prepared statements,
    // caches), not counted.
    for (bench, name) in [(&empty, "empty"), (&grown, "grown")] {
        growth_round(bench, &format!("{name}-warm"), n, &mut Times::default()).await;
    }
    let (mut before, mut after) = (Times::default(), Times::default());
    for round in 0..ROUNDS {
        // Each side goes first every other round.
        let sides = [
            (&empty, &mut before, "empty"),
            (&grown, &mut after, "grown"),
        ];
        let sides = if round % 2 == 0 {
            sides
        } else {
            let [e, g] = sides;
            [g, e]
        };
        for (bench, times, name) in sides {
            growth_round(bench, &format!("{name}-{round}"), n, times).await;
        }
    }
    empty.stop().await;
    let (submits, reads, lists) = (
        n * ROUNDS,
        GROWTH_READS * n * ROUNDS,
        GROWTH_LISTS * n * ROUNDS,
    );
    for (what, count, e, g) in [
        ("submit ", submits, before.submit, after.submit),
        ("read op", reads, before.read_op, after.read_op),
        ("read vm", reads, before.read_vm, after.read_vm),
        ("list   ", lists, before.list, after.list),
    ] {
        println!(
            "growth   {what} {:>8.0}/s empty   {:>8.0}/s grown   ratio {:.2}",
            rate(count, e),
            rate(count, g),
            e.as_secs_f64() / g.as_secs_f64()
        );
    }
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t, pg_total_relation_size(t::regclass) FROM unnest(ARRAY['outbox', 'event_outbox', 'operations', 'resources']) t",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sizes: Vec<String> = sizes
        .iter()
        .map(|(t, s)| format!("{t} {:.1} MiB", *s as f64 / 1048576.0))
        .collect();
    println!("growth   table sizes: {}", sizes.join(", "));
    grown.stop().await;
}

/// Clients of the overload phase, each on its own connection.
const FLOOD_CLIENTS: usize = 1_000;
/// Seconds of the overload phase.
const FLOOD_SECONDS: u64 = 10;

/// Overload (`BENCH_OVERLOAD=1`): a `gateway serve` process of its own (so its memory and
/// its own latency histogram are the gateway's alone), and [`FLOOD_CLIENTS`] clients in
/// this process submitting creates as fast as they can for [`FLOOD_SECONDS`]. The gateway
/// admits what its write limit (`GATEWAY_MAX_IN_FLIGHT_WRITES`, `BENCH_MAX_WRITES`;
/// lowered while writes take longer than `GATEWAY_WRITE_LATENCY_TARGET_MS` when
/// `BENCH_WRITE_LATENCY_TARGET_MS` sets one, off by default) allows and answers the rest
/// `503 overloaded` at once; a refused client waits as its `Retry-After` says (1 s;
/// `BENCH_FLOOD_BACKOFF_MS` for less) and tries again. Prints the admitted and refused
/// rates, the admitted requests' latency as the clients saw it and as the
/// gateway measured it (`gateway_http_request_duration_seconds`, interpolated in its
/// buckets as `histogram_quantile` does), its write limit at the end, and its peak resident
/// set.
async fn overload(b: &Bench) {
    let tenant = b.tenant_named("overload").await;
    let server = Server::start(b);
    server.ready(&b.http).await;
    let url = server.url.clone();
    let route = r#"route="/v1/tenants/{tenant}/{kind}",method="POST""#;
    let before = histogram(&b.http, &url, DURATION, route).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(FLOOD_CLIENTS)
        .build()
        .unwrap();
    // How long a refused client waits: the `Retry-After` (1 s) a well-behaved client
    // honours, or less (`BENCH_FLOOD_BACKOFF_MS`) for a rougher flood.
    let backoff = Duration::from_millis(env_or("BENCH_FLOOD_BACKOFF_MS", 1000));
    let deadline = Instant::now() + Duration::from_secs(FLOOD_SECONDS);
    let results = futures::future::join_all((0..FLOOD_CLIENTS).map(|c| {
        let (http, tenant, url) = (http.clone(), tenant.clone(), url.clone());
        async move {
            let (mut admitted, mut refused, mut other) = (Vec::new(), 0usize, 0usize);
            let mut i = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let res = http
                    .post(format!("{url}/v1/tenants/{tenant}/vms"))
                    .bearer_auth(&b.key)
                    .json(&json!({"name": format!("f{c}-{i}"), "zone": "zone-a",
                                  "spec": {"flavor": "m1.small", "image": "debian-12"}}))
                    .send()
                    .await;
                i += 1;
                match res.map(|r| r.status().as_u16()) {
                    Ok(202) => admitted.push(t0.elapsed()),
                    Ok(503) => {
                        refused += 1;
                        tokio::time::sleep(backoff).await;
                    }
                    _ => other += 1,
                }
            }
            (admitted, refused, other)
        }
    }))
    .await;
    let after = histogram(&b.http, &url, DURATION, route).await;
    let limit = metrics_text(&b.http, &url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("gateway_admission_write_limit "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let peak = server.peak_rss_mib();
    drop(server);
    let mut admitted: Vec<Duration> = Vec::new();
    let (mut refused, mut other) = (0, 0);
    for (a, r, o) in results {
        admitted.extend(a);
        refused += r;
        other += o;
    }
    admitted.sort();
    let secs = FLOOD_SECONDS as f64;
    let served = increase(&before, &after);
    println!(
        "overload {FLOOD_CLIENTS} clients: admitted {:>6.0}/s   refused 503 {:>6.0}/s   other {other}\n\
         overload   admitted latency seen by the clients   p50 {:?}  p99 {:?}\n\
         overload   admitted latency in the gateway        p50 {:.1}ms  p99 {:.1}ms\n\
         overload   write limit at the end {limit:.0} (GATEWAY_MAX_IN_FLIGHT_WRITES, lowered while \
         writes take longer than GATEWAY_WRITE_LATENCY_TARGET_MS)\n\
         overload   gateway peak RSS {peak:.0} MiB",
        admitted.len() as f64 / secs,
        refused as f64 / secs,
        percentile(&admitted, 0.5),
        percentile(&admitted, 0.99),
        quantile(&served, 0.5) * 1e3,
        quantile(&served, 0.99) * 1e3,
    );
}

/// The gateway's request latency histogram.
const DURATION: &str = "gateway_http_request_duration_seconds";
/// The relay's lag from an outbox row's transaction to JetStream's ack.
const RELAY_LAG: &str = "gateway_relay_lag_seconds";
const WRITE_BATCH: &str = "gateway_write_batch_size";

/// The `_sum` and `_count` of histogram `name` (no labels).
async fn sum_and_count(http: &reqwest::Client, url: &str, name: &str) -> (f64, f64) {
    let text = metrics_text(http, url).await;
    (
        sample(&text, &format!("{name}_sum")),
        sample(&text, &format!("{name}_count")),
    )
}

/// The value of the unlabelled series `name` in an exposition (0 when absent: a family
/// before its first observation).
fn sample(text: &str, name: &str) -> f64 {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The value of counter `name` (no labels; 0 before its first increment).
async fn counter(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    sample(&metrics_text(http, url).await, name)
}

/// Outbox rows a relay pass could not record at once (their resource was in use).
const RELAY_BUSY: &str = "gateway_relay_busy_rows_total";

/// The buckets' increase from `before` to `after` (the family may have had no
/// buckets before its first observation).
fn increase(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .enumerate()
        .map(|(i, (le, n))| (*le, n - before.get(i).map_or(0.0, |b| b.1)))
        .collect()
}

/// A `gateway serve` process on the bench's database and NATS names, killed on drop.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Server {
    fn start(b: &Bench) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let names = &b.config.nats;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
        command
            .arg("serve")
            .env("DATABASE_URL", &b.config.database_url)
            .env("NATS_URL", &b.config.nats_url)
            .env("OPS_STREAM", &names.stream)
            .env("OPS_SUBJECT_PREFIX", &names.subject_prefix)
            .env("EVENTS_SUBJECT_PREFIX", &names.events_prefix)
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATABASE_MAX_CONNECTIONS", "40")
            .env(
                "GATEWAY_MAX_IN_FLIGHT_WRITES",
                // The shipped default, not the test configuration's higher bound.
                std::env::var("BENCH_MAX_WRITES").unwrap_or_else(|_| {
                    gateway::config::AdmissionLimits::default()
                        .writes
                        .to_string()
                }),
            )
            .env(
                "GATEWAY_WRITE_LATENCY_TARGET_MS",
                std::env::var("BENCH_WRITE_LATENCY_TARGET_MS").unwrap_or_else(|_| {
                    gateway::config::AdmissionLimits::default()
                        .write_latency_target
                        .map_or(0, |t| t.as_millis())
                        .to_string()
                }),
            )
            .env(
                "GATEWAY_WRITE_BATCH",
                std::env::var("BENCH_WRITE_BATCH")
                    .unwrap_or_else(|_| gateway::config::DEFAULT_WRITE_BATCH.to_string()),
            )
            .env("GATEWAY_RATE_LIMIT_PER_SECOND", "1000000")
            .env("GATEWAY_RATE_LIMIT_BURST", "1000000")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create("/tmp/gateway-bench-serve.log").unwrap());
        let child = command.spawn().expect("the gateway binary runs");
        SERVERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn ready(&self, http: &reqwest::Client) {
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gateway serve did not get ready; see /tmp/gateway-bench-serve.log");
    }

    /// The process's peak resident set (`VmHWM`), in MiB.
    fn peak_rss_mib(&self) -> f64 {
        proc_status_mib(&format!("/proc/{}/status", self.child.id()), "VmHWM:")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        SERVERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|pid| *pid != self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `url`'s `/metrics` exposition.
async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The cumulative buckets `(le, count)` of the histogram `name` for `labels` (as they
/// appear in the exposition; `""` for none) at `url`'s `/metrics`.
async fn histogram(http: &reqwest::Client, url: &str, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let text = metrics_text(http, url).await;
    let bucket = format!("{name}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&bucket))
        .filter(|l| l.contains(labels))
        .filter_map(|l| {
            let (_, rest) = l.split_once("le=\"")?;
            let (le, _) = rest.split_once('"')?;
            let (_, value) = l.rsplit_once(' ')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The total seconds and count of the gateway's answers so far, by method and route
/// template, for the routes an operation's life takes (create, its long-poll, the
/// workers' reports).
async fn request_times(
    http: &reqwest::Client,
    url: &str,
) -> std::collections::BTreeMap<String, (f64, f64)> {
    let text = metrics_text(http, url).await;
    let mut out: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    let name = "gateway_http_request_duration_seconds_";
    for l in text.lines().filter(|l| l.starts_with(name)) {
        let is_sum = l.starts_with(&format!("{name}sum{{"));
        if !is_sum && !l.starts_with(&format!("{name}count{{")) {
            continue;
        }
        let label = |key: &str| {
            let (_, rest) = l.split_once(&format!("{key}=\""))?;
            Some(rest.split_once('"')?.0.to_owned())
        };
        let (Some(route), Some(method), Some((_, value))) =
            (label("route"), label("method"), l.rsplit_once(' '))
        else {
            continue;
        };
        if !(route.contains("reports")
            || route.ends_with("{kind}")
            || route == "/v1/operations/{id}")
        {
            continue;
        }
        let entry = out.entry(format!("{method} {route}")).or_default();
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        if is_sum {
            entry.0 += v;
        } else {
            entry.1 += v;
        }
    }
    out
}

/// The `q` quantile of cumulative buckets, linear within a bucket (as Prometheus'
/// `histogram_quantile`); the highest finite bound if it falls in `+Inf`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            return lower + (le - lower) * (rank - below) / (count - below).max(1.0);
        }
        (lower, below) = (le, count);
    }
    lower
}

/// Seconds of the steady-load phase.
const STEADY_SECONDS: f64 = 10.0;

/// Creates operations at `per_second` (`share` of the burst's rate: `half`, `quarter`;
/// or `500/s`, the rate issue 12 sets its relay-lag target at)
/// for [`STEADY_SECONDS`], each followed by a long-poll until it ends. With `readers`, a
/// reader of the events stream and a watch client meanwhile measure, for every event,
/// the lag from its change's commit to its arrival; without, the load is the burst's
/// (creates and workers only, plus the long-polls), as the issue's "half the maximum
/// rate" reads. Prints the percentiles.
async fn steady(b: &Bench, tenant: &str, per_second: f64, share: &str, readers: bool) {
    let backlog = quiesce(&b.running.backends.pool).await;
    println!("steady   {share}: started after the earlier phases' backlog drained ({backlog:?})");
    let observers = if readers {
        Some((event_lags(b, tenant).await, watch_lags(b, tenant).await))
    } else {
        None
    };
    // The phase's resources are named after it (a DNS label: `500-per-s`, `half-plain`).
    let prefix = share.replace('/', "-per-");
    let prefix = if readers {
        prefix
    } else {
        format!("{prefix}-plain")
    };
    let prefix = prefix.as_str();
    let share = match share {
        "quarter" | "half" => format!("{share} the burst's rate"),
        rate => rate.to_owned(),
    };
    let relay_before = histogram(&b.http, &b.url, RELAY_LAG, "").await;
    let busy_before = counter(&b.http, &b.url, RELAY_BUSY).await;
    let requests_before = request_times(&b.http, &b.url).await;
    let count = (per_second * STEADY_SECONDS) as usize;
    let spent = Spent::since_now(&b.running.backends.pool).await;
    let started = Instant::now();
    let tasks = (0..count).map(|i| async move {
        let at = started + Duration::from_secs_f64(i as f64 / per_second);
        tokio::time::sleep_until(at.into()).await;
        let t0 = Instant::now();
        let res = b.http.post(format!("{}/v1/tenants/{tenant}/vms", b.url)).bearer_auth(&b.key)
            .json(&json!({"name": format!("{prefix}-{i}"), "zone": if i % 2 == 0 { "zone-a" } else { "zone-b" }, "spec": {"flavor": "m1.small", "image": "debian-12"}}))
            .send().await.unwrap();
        if res.status() != 202 {
            // Refused (`503 overloaded` when the machine stalls): counted and shown,
            // not a reason to lose the run.
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            return Err(format!("{status} {}", body["code"].as_str().unwrap_or("")));
        }
        let op: serde_json::Value = res.json().await.unwrap();
        let mut state = op;
        let id = state["id"].as_str().unwrap().to_owned();
        while state["done"] != true {
            let url = format!("{}/v1/operations/{id}?wait=30s&until=done", b.url);
            let res = b.http.get(url).bearer_auth(&b.key).send().await.unwrap();
            let status = res.status();
            state = res.json().await.unwrap();
            assert_eq!(status, 200, "{state}");
        }
        Ok(t0.elapsed())
    });
    let (mut lat, mut refused) = (
        Vec::new(),
        std::collections::BTreeMap::<String, usize>::new(),
    );
    for outcome in futures::future::join_all(tasks).await {
        match outcome {
            Ok(took) => lat.push(took),
            Err(answer) => *refused.entry(answer).or_default() += 1,
        }
    }
    let took = started.elapsed();
    let cpu = spent.per_op(&b.running.backends.pool, count).await;
    lat.sort();
    let relay = increase(
        &relay_before,
        &histogram(&b.http, &b.url, RELAY_LAG, "").await,
    );
    let requests_after = request_times(&b.http, &b.url).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut lags, mut watched) = (Vec::new(), Vec::new());
    if let Some((events, watch)) = observers {
        events.abort();
        watch.abort();
        lags = events.await_lags().await;
        watched = watch.await_lags().await;
    }
    lags.sort();
    watched.sort();
    let readers = if readers { "" } else { ", no event readers" };
    let refused: String = refused
        .iter()
        .map(|(answer, n)| format!("   refused {n} × {answer}"))
        .collect();
    println!(
        "steady   {:>8.0} ops/s ({share}{readers})   submit→succeeded p50 {:?}  p99 {:?}{refused}",
        rate(lat.len(), took),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    let split = steady_split(&b.running.backends.pool, prefix).await;
    println!(
        "steady     submit→running p50 {:.1}ms  p99 {:.1}ms   running→succeeded p50 {:.1}ms  p99 {:.1}ms",
        split[0] * 1e3,
        split[1] * 1e3,
        split[2] * 1e3,
        split[3] * 1e3
    );
    let busy = counter(&b.http, &b.url, RELAY_BUSY).await - busy_before;
    println!(
        "relay lag  outbox row → JetStream ack, as the relay measured it   p50 {:.1}ms  p99 {:.1}ms   \
         {busy:.0} rows recorded by a later pass (resource in use)",
        quantile(&relay, 0.5) * 1e3,
        quantile(&relay, 0.99) * 1e3
    );
    println!("{cpu}");
    let mut line = String::from("requests   mean time to answer:");
    for (route, (sum, count)) in &requests_after {
        let (sum0, count0) = requests_before.get(route).copied().unwrap_or_default();
        if count - count0 >= 1.0 {
            let mean = (sum - sum0) / (count - count0) * 1e3;
            line.push_str(&format!("  {route} {mean:.1}ms ×{:.0}", count - count0));
        }
    }
    println!("{line}");
    for (what, lags) in [("bus reader", lags), ("watch client", watched)] {
        if lags.is_empty() {
            continue;
        }
        println!(
            "events   {:>8} events   commit→{what} lag p50 {:?}  p99 {:?}",
            lags.len(),
            percentile(&lags, 0.5),
            percentile(&lags, 0.99)
        );
    }
}

/// Waits until what the earlier phases left behind is done (outbox and event rows not
/// yet published, audit rows not yet sealed), at most a minute; answers how long that
/// took. A steady phase measures the load it makes, not what an earlier phase left.
async fn quiesce(pool: &sqlx::PgPool) -> Duration {
    let started = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_outbox)",
        )
        .fetch_one(pool)
        .await
        .unwrap()
            + gateway::store::audit::unsealed_count(pool).await.unwrap();
        if left == 0 || started.elapsed() > Duration::from_secs(60) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the steady phase's operations spent their time, as their rows record it: p50
/// and p99 of submit → `running` (relay, JetStream, the worker taking the message and
/// its first report), then of `running` → `succeeded`.
async fn steady_split(pool: &sqlx::PgPool, share: &str) -> [f64; 4] {
    let (a, b, c, d): (f64, f64, f64, f64) = sqlx::query_as(
        "WITH t AS (
             SELECT EXTRACT(EPOCH FROM o.started_at - o.created_at)::float8 AS queued,
                    EXTRACT(EPOCH FROM o.finished_at - o.started_at)::float8 AS ran
             FROM operations o JOIN resources r ON r.id = o.resource_id
             WHERE r.name LIKE $1 || '-%')
         SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY queued),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY queued),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ran),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ran)
         FROM t",
    )
    .bind(share)
    .fetch_one(pool)
    .await
    .unwrap();
    [a, b, c, d]
}

/// A reader of `tenant`'s new events, collecting each one's commit-to-arrival lag until
/// aborted (the lags collected so far are lost then: it returns them through a channel).
async fn event_lags(b: &Bench, tenant: &str) -> EventLags {
    let js = b.running.backends.js.clone();
    let stream = js.get_stream(b.config.nats.events_stream()).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{}.{tenant}.>", b.config.nats.events_prefix),
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        use futures::StreamExt;
        let mut messages = consumer.messages().await.unwrap();
        while let Some(Ok(m)) = messages.next().await {
            let e: gateway_proto::events::CloudEvent = serde_json::from_slice(&m.payload).unwrap();
            let lag = (chrono::Utc::now() - e.time).to_std().unwrap_or_default();
            let _ = tx.send(lag);
        }
    });
    EventLags { task, rx }
}

/// A watch client of `tenant`'s events through the gateway's API (server-sent events),
/// collecting each event's commit-to-arrival lag.
async fn watch_lags(b: &Bench, tenant: &str) -> EventLags {
    let mut res = b
        .http
        .get(format!("{}/v1/tenants/{tenant}/events", b.url))
        .bearer_auth(&b.key)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if block.contains("event: bookmark") {
                    continue;
                }
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                if let Ok(e) = serde_json::from_str::<gateway_proto::events::CloudEvent>(data) {
                    let lag = (chrono::Utc::now() - e.time).to_std().unwrap_or_default();
                    let _ = tx.send(lag);
                }
            }
        }
    });
    EventLags { task, rx }
}

/// The event reader of [`steady`].
struct EventLags {
    task: tokio::task::JoinHandle<()>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Duration>,
}

impl EventLags {
    fn abort(&self) {
        self.task.abort();
    }

    async fn await_lags(mut self) -> Vec<Duration> {
        let _ = (&mut self.task).await;
        let mut out = Vec::new();
        while let Ok(l) = self.rx.try_recv() {
            out.push(l);
        }
        out
    }
}

/// What checking a spec against its registered type costs (the JSON Schema, defaults
/// and `x-` rules, with the compiled type from the registry), beside a raw baseline that
/// only deserializes the same spec into a typed struct with serde, and beside the time
/// one submit takes in the burst above.
async fn validation(b: &Bench, per_submit: Duration) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct VmSpec {
        flavor: String,
        image: String,
        #[serde(default)]
        power_state: Option<String>,
    }
    const N: usize = 200_000;
    let types = gateway::registry::Registry::load(b.running.backends.pool.clone())
        .await
        .unwrap();
    let vm = types.get(&gateway_proto::Kind::named("vm")).unwrap();
    let spec = serde_json::json!({"flavor": "m1.small", "image": "debian-12"});
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(vm.validate_spec(std::hint::black_box(&spec), None).unwrap());
    }
    let checked = started.elapsed();
    let started = Instant::now();
    for _ in 0..N {
        let v: VmSpec = serde_json::from_value(std::hint::black_box(spec.clone())).unwrap();
        std::hint::black_box(v);
    }
    let raw = started.elapsed();
    let each = checked / N as u32;
    println!(
        "validate registry {:>8.0} specs/s raw serde {:>8.0} specs/s  ratio {:.2}   {:?} each = {:.2}% of a submit's share of the burst",
        rate(N, checked),
        rate(N, raw),
        raw.as_secs_f64() / checked.as_secs_f64(),
        each,
        100.0 * each.as_secs_f64() / per_submit.as_secs_f64()
    );
}

/// A message as the relay publishes it: subject, headers (its own, its `Nats-Msg-Id`,
/// the signature's two), body.
type Message = (String, async_nats::HeaderMap, bytes::Bytes);

/// Copies of the first `n` outbox rows' messages for the raw baseline, `copies` times
/// over, each copy with a `Nats-Msg-Id` of its own and the signature headers of one row
/// (copied, not computed: signing is the relay's work being measured), so the baseline
/// publishes the same bytes the relay does. In the rows' order, each row's copies
/// together.
async fn raw_messages(
    pool: &sqlx::PgPool,
    signer: &SigningKey,
    n: usize,
    copies: usize,
) -> Vec<Message> {
    let rows: Vec<(String, String, serde_json::Value, String)> = sqlx::query_as(
        "SELECT subject, msg_id, headers, payload::text FROM outbox ORDER BY id LIMIT $1",
    )
    .bind(n as i64)
    .fetch_all(pool)
    .await
    .unwrap();
    let (subject, msg_id, _, body) = &rows[0];
    let signature = signer.sign(subject, msg_id, body.as_bytes());
    rows.into_iter()
        .flat_map(|(subject, msg_id, extra, body)| {
            let body = bytes::Bytes::from(body);
            let signature = &signature;
            (0..copies).map(move |copy| {
                let id = format!("raw{copy}-{msg_id}");
                let mut h = gateway::relay::unsigned_headers(&extra, &id);
                for (name, value) in signature {
                    h.insert(*name, value.as_str());
                }
                (subject.clone(), h, body.clone())
            })
        })
        .collect()
}

/// Publishes `messages` with `window` acks outstanding at a time.
async fn raw_publish(
    js: &async_nats::jetstream::Context,
    messages: Vec<Message>,
    window: usize,
) -> Duration {
    let started = Instant::now();
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let acks = messages
            .by_ref()
            .take(window)
            .map(|(subject, h, body)| async move {
                js.publish_with_headers(subject, h, body)
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            });
        futures::future::join_all(acks).await;
    }
    started.elapsed()
}

/// The relay draining the outbox (the submits left 2 × `ops()` rows of the gateway's;
/// the raw baseline's rows are deleted first) vs. the raw publish of the same messages,
/// [`RAW_COPIES`] times over, in [`ROUNDS`] rounds that alternate the two on equal
/// slices of the rows.
async fn relay_vs_raw(b: &Bench) {
    let pool = b.running.backends.pool.clone();
    sqlx::query("DELETE FROM outbox WHERE subject = 'raw.vm.zone-a'")
        .execute(&pool)
        .await
        .unwrap();
    let relay = std::sync::Arc::new(gateway::relay::Relay {
        pool: pool.clone(),
        js: b.running.backends.js.clone(),
        batch_size: env_or("BENCH_RELAY_BATCH", b.config.relay_batch_size),
        concurrent_passes: env_or("BENCH_RELAY_PASSES", b.config.relay_concurrent_passes),
        poll_interval: Duration::from_millis(100),
        wake: Default::default(),
        changes: Default::default(),
        metrics: Default::default(),
        signer: b.config.dispatch_signing_key.clone().unwrap(),
        events_prefix: b.config.nats.events_prefix.clone(),
    });
    let rows = 2 * ops();
    let messages = raw_messages(&pool, &relay.signer, rows, RAW_COPIES).await;
    let per_round = rows.div_ceil(ROUNDS);
    let window = relay.batch_size as usize * relay.concurrent_passes;
    let (mut relayed, mut relay_time) = (0, Duration::ZERO);
    let (mut raw, mut raw_time) = (0, Duration::ZERO);
    let (mut relay_cpu, mut raw_cpu) = (Cpu::default(), Cpu::default());
    let mut messages = messages.into_iter();
    while messages.len() > 0 {
        let slice: Vec<Message> = messages.by_ref().take(per_round * RAW_COPIES).collect();
        // As `Relay::run`'s operations loops do under a backlog: each loop, a task of
        // its own, passes again as soon as its own pass is done, so one loop's database
        // work overlaps another's publishing (a round of `Relay::passes` would wait for
        // its slowest pass), and their work in this process (signing, mostly) spreads
        // over the runtime's threads (in one task, it ran on one).
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let before = Cpu::now();
        let started = Instant::now();
        let loops = (0..relay.concurrent_passes).map(|_| {
            let (relay, done) = (relay.clone(), done.clone());
            tokio::spawn(async move {
                while done.load(std::sync::atomic::Ordering::Relaxed) < per_round {
                    let pass = relay.pass().await.unwrap();
                    done.fetch_add(pass.published, std::sync::atomic::Ordering::Relaxed);
                    if pass.claimed == 0 {
                        break;
                    }
                }
            })
        });
        for finished in futures::future::join_all(loops.collect::<Vec<_>>()).await {
            finished.unwrap();
        }
        relay_time += started.elapsed();
        relay_cpu.add_since(&before);
        relayed += done.load(std::sync::atomic::Ordering::Relaxed);
        raw += slice.len();
        let before = Cpu::now();
        // A task on the runtime's threads too, as the relay's loops are.
        let js = relay.js.clone();
        raw_time += tokio::spawn(async move { raw_publish(&js, slice, window).await })
            .await
            .unwrap();
        raw_cpu.add_since(&before);
    }
    let (relay_rate, raw_rate) = (rate(relayed, relay_time), rate(raw, raw_time));
    println!(
        "relay    gateway {relay_rate:>8.0} msg/s   raw publish {raw_rate:>5.0} msg/s   ratio {:.2}",
        relay_rate / raw_rate
    );
    // Per message: where the relay's time goes beside the bare publish's.
    for (cpu, n, side) in [(relay_cpu, relayed, "relay"), (raw_cpu, raw, "raw publish")] {
        let us = |v: f64| v / n as f64 * 1e6;
        println!(
            "cpu        per message: {:.0} µs this process, {:.0} µs PostgreSQL, {:.0} µs NATS; \
             machine {:.0} % busy   ({side})",
            us(cpu.this),
            us(cpu.postgres),
            us(cpu.nats),
            cpu.busy / cpu.total.max(1e-9) * 100.0
        );
    }
}

/// The number in the environment variable `name`, or `default` (unset or not a number).
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        gateway::telemetry::init(false);
    }
    tokio::spawn(on_interrupt());
    // A phase that panics (an `unwrap` on a failed request, say) ends the run too:
    // everything is removed first (`remove_everything`), on a thread and a runtime of
    // their own. Only a panic of the main thread, which runs the phases, ends the run: a
    // task's panic is the gateway's to handle (it answers that request `500`).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let main = std::thread::current().name() == Some("main");
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            // A consequence of the removal: the main thread waits for the exit, a
            // task's panic only ends that task.
            if main {
                loop {
                    std::thread::park();
                }
            }
            return;
        }
        report(info);
        if !main {
            return;
        }
        eprintln!("removing the benchmark's streams and databases");
        let _ = std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(remove_everything());
        })
        .join();
    }));
    let rss_start = rss_mib();
    println!(
        "control-plane gateway benchmark: {} operations, {CONCURRENCY} concurrent clients\n",
        ops()
    );

    let e2e_only = std::env::var("BENCH_E2E_ONLY").is_ok();
    // 1. Submit vs raw inserts, at 8 clients and at CONCURRENCY.
    let b = start_with(
        Parts {
            api: true,
            ..Default::default()
        },
        write_batch,
    )
    .await;
    let tenant = b.tenant().await;
    let pool = b.running.backends.pool.clone();
    let mut through = Duration::ZERO;
    let mut raw_rate = 0.0;
    if e2e_only {
        let tenant = b.tenant().await;
        let raw = raw_inserts(&pool, CONCURRENCY, &tenant, "raw-only-", ops()).await;
        raw_rate = rate(ops(), raw);
        println!("raw submit {raw_rate:.0} ops/s (BENCH_E2E_ONLY: the burst phases skipped)");
    }
    for clients in [8, CONCURRENCY].into_iter().filter(|_| !e2e_only) {
        let (mut raw, mut took, mut lat) = (Duration::ZERO, Duration::ZERO, Vec::new());
        let (mut raw_cpu, mut gateway_cpu) = (Cpu::default(), Cpu::default());
        let answered_before = request_times(&b.http, &b.url).await;
        let batches_before = sum_and_count(&b.http, &b.url, WRITE_BATCH).await;
        for round in 0..ROUNDS {
            let n = ops() / ROUNDS;
            let before = Cpu::now();
            raw += raw_inserts(
                &pool,
                clients,
                &tenant,
                &format!("raw{clients}-{round}-"),
                n,
            )
            .await;
            raw_cpu.add_since(&before);
            let prefix = format!("vm{clients}-{round}-");
            let before = Cpu::now();
            let (t, l, _) = b.submit_from(clients, &tenant, &prefix, n).await;
            gateway_cpu.add_since(&before);
            took += t;
            lat.extend(l);
        }
        lat.sort();
        println!("submit{clients:<3}gateway {:>8.0} ops/s   raw sqlx {:>8.0} ops/s   ratio {:.2}   p50 {:?}  p99 {:?}",
            rate(ops(), took), rate(ops(), raw), raw.as_secs_f64() / took.as_secs_f64(),
            percentile(&lat, 0.5), percentile(&lat, 0.99));
        for (side, cpu) in [("gateway", gateway_cpu), ("raw sqlx", raw_cpu)] {
            println!("{}   ({side})", cpu.per_op(&Cpu::default(), ops()));
        }
        // Where a create's time went: in the gateway (from its request histogram), and
        // how many shared a transaction.
        let route = "POST /v1/tenants/{tenant}/{kind}";
        let answered = request_times(&b.http, &b.url).await;
        let (sum, count) = answered.get(route).copied().unwrap_or_default();
        let (sum0, count0) = answered_before.get(route).copied().unwrap_or_default();
        let (batched, batches) = sum_and_count(&b.http, &b.url, WRITE_BATCH).await;
        println!(
            "gateway    mean time to answer a create {:.2} ms; {:.1} creates a transaction",
            (sum - sum0) / (count - count0).max(1.0) * 1e3,
            (batched - batches_before.0) / (batches - batches_before.1).max(1.0)
        );
        through = took;
        raw_rate = rate(ops(), raw);
    }
    if !e2e_only {
        reads(&b, &tenant).await;
        validation(&b, through / ops() as u32).await;
        relay_vs_raw(&b).await;
    }
    if std::env::var("BENCH_OVERLOAD").is_ok() {
        overload(&b).await;
    }
    b.stop().await;
    // Two gateways of its own (with this one, their pools would pass the server's
    // `max_connections`).
    if std::env::var("BENCH_GROWTH").is_ok() {
        growth().await;
    }

    // 3. End to end with in-process workers and an instant driver.
    let sim = workers::SimConfig {
        min_latency: Duration::ZERO,
        max_latency: Duration::ZERO,
        failure_rate: 0.0,
        transient_failure_rate: 0.0,
    };
    let b = start_with(
        Parts {
            api: true,
            relay: true,
            reconciler: true,
            workers: Some(sim),
            webhooks: false,
        },
        |c| {
            write_batch(c);
            // The simulated driver is instant, so a pool's concurrency, not the gateway,
            // would bound the rate: 16 messages in flight, each waiting for two report
            // round trips, is about 300 operations/s per pool.
            c.worker_concurrency = env_or("BENCH_WORKER_CONCURRENCY", 64);
            c.worker_report_batch = env_or("BENCH_REPORT_BATCH", c.worker_report_batch);
        },
    )
    .await;
    let tenant = b.tenant().await;
    let pool = b.running.backends.pool.clone();
    let spent = Spent::since_now(&pool).await;
    let started = Instant::now();
    let (_, _, ids) = b.submit(&tenant, "e2e", ops()).await;
    // Polled every 20 ms while the workers run: through the partial index of active
    // operations, not a count over the whole table (which, 50 times a second, was load
    // of the benchmark's own on the database it measures).
    loop {
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM operations
                            WHERE state IN ('queued', 'pending', 'dispatched', 'running'))",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if !active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e2e = started.elapsed();
    let cpu = spent.per_op(&pool, ops()).await;
    let mut lat: Vec<Duration> = sqlx::query_scalar::<_, f64>(
        "SELECT EXTRACT(EPOCH FROM finished_at - created_at)::float8 FROM operations WHERE state = 'succeeded'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(Duration::from_secs_f64)
    .collect();
    lat.sort();
    assert_eq!(lat.len(), ids.len(), "every operation succeeded");
    println!(
        "e2e      {:>8.0} ops/s submit→succeeded   ratio {:.2} of the raw submit   p50 {:?}  p99 {:?}",
        rate(ops(), e2e),
        rate(ops(), e2e) / raw_rate,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!("{cpu}");
    // A quarter of the burst's rate first, for the shape of latency against load; then
    // half, the rate issue 12 sets its target at.
    steady(&b, &tenant, rate(ops(), e2e) / 4.0, "quarter", true).await;
    steady(&b, &tenant, rate(ops(), e2e) / 2.0, "half", true).await;
    // The same rate under the burst's own load: the workers and the creates' clients
    // (with their long-polls), without the two event readers the burst did not carry.
    steady(&b, &tenant, rate(ops(), e2e) / 2.0, "half", false).await;
    // The rate the relay-lag target is set at, under the same load.
    steady(&b, &tenant, 500.0, "500/s", false).await;
    // Any further rates asked for (`BENCH_RATES=50,100`), for the shape of the CPU an
    // operation costs against the rate.
    for r in std::env::var("BENCH_RATES").unwrap_or_default().split(',') {
        if let Ok(per_second) = r.trim().parse::<f64>() {
            steady(&b, &tenant, per_second, &format!("{per_second}/s"), false).await;
        }
    }
    if std::env::var("BENCH_DEBUG").is_ok() {
        let text = metrics_text(&b.http, &b.url).await;
        for l in text.lines().filter(|l| {
            !l.starts_with('#')
                && (l.contains("_sum")
                    || l.contains("_count")
                    || l.contains("messages_total")
                    || l.contains("retries_total")
                    || l.contains("redelivered"))
        }) {
            println!("  {l}");
        }
    }
    b.stop().await;
    println!(
        "\nmemory   RSS {:.0} MiB at start, {:.0} MiB at end",
        rss_start,
        rss_mib()
    );
}
