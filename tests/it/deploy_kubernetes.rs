//! The Kubernetes manifests (every overlay under deploy/kubernetes/overlays) and
//! compose.yaml render and validate offline, and the production overlay has the shape
//! the README promises. `scripts/validate-deploy.sh` does the rendering (kubectl
//! kustomize), the schema validation (Kubernetes 1.31 and the vendored CRD and Compose
//! schemas) and its own checks; it writes what it found as JSON, which this test reads
//! to assert the promises again, independently, here.
//!
//! Needs kubectl (with kustomize v5), python3 with venv and nats-server (which parses
//! the NATS configuration); without them it fails with the script's message saying what
//! to install. The Python packages are installed once into target/validate-deploy-venv.
//!
//! Also here, since it is the deployment's promise: a PostgreSQL failover (module
//! `failover`), with PostgreSQL's server binaries and the NATS server the other
//! integration tests use.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn validate() -> Value {
    let root = crate::common::repo_root();
    let facts_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-kubernetes-facts.json");
    let _ = std::fs::remove_file(&facts_path);
    let out = Command::new("bash")
        .arg(root.join("scripts/validate-deploy.sh"))
        .arg("--facts")
        .arg(&facts_path)
        .current_dir(root)
        .output()
        .expect("bash runs scripts/validate-deploy.sh");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/validate-deploy.sh failed:\n{report}"
    );
    let text = std::fs::read_to_string(&facts_path)
        .unwrap_or_else(|e| panic!("{} not written: {e}\n{report}", facts_path.display()));
    serde_json::from_str(&text).expect("the facts are JSON")
}

fn strs(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

#[test]
fn kubernetes_manifests_and_compose_render_and_validate_with_the_promised_shape() {
    let facts = validate();
    assert_eq!(facts["kubernetes_version"], "1.31");
    let overlays: BTreeSet<String> = facts["overlays"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(
        overlays.contains("production") && overlays.contains("dev"),
        "{overlays:?}"
    );
    let prod = &facts["overlays"]["production"];

    // gateway serve: ≥ 3 replicas, probes, disruption budget, spreading, drain.
    let gw = &prod["gateway"];
    assert!(int(&gw["min_replicas"]) >= 3, "{gw}");
    assert!(int(&gw["max_replicas"]) >= int(&gw["min_replicas"]), "{gw}");
    assert_eq!(gw["readiness_path"], "/readyz");
    assert_eq!(gw["liveness_path"], "/healthz");
    assert!(gw["startup_path"].is_string(), "a startup probe: {gw}");
    assert_eq!(strs(&gw["pdb"]).len(), 1, "{gw}");
    assert!(
        strs(&gw["hard_spread"]).contains("topology.kubernetes.io/zone"),
        "{gw}"
    );
    assert!(
        strs(&gw["spread"]).contains("kubernetes.io/hostname"),
        "{gw}"
    );
    assert!(int(&gw["pre_stop_sleep"]) > 0, "{gw}");
    assert!(
        int(&gw["termination_grace"]) > int(&gw["pre_stop_sleep"]) + int(&gw["drain_timeout"]),
        "the grace period must cover the preStop sleep and the server's drain: {gw}"
    );
    assert_eq!(
        strs(&gw["ingress_paths"]),
        BTreeSet::from(["/v1".to_owned()])
    );

    // relays
    let relay = &prod["relay"];
    assert!(int(&relay["replicas"]) >= 2, "{relay}");
    assert_eq!(strs(&relay["pdb"]).len(), 1, "{relay}");
    // The relay cannot start without its dispatch signing key.
    assert_eq!(
        relay["signing_key_secret"],
        serde_json::json!(["dispatch-signing-key", "key"]),
        "{relay}"
    );

    // one worker pool per service and zone, pinned to its zone, with its own key
    let workers = prod["workers"].as_array().unwrap();
    let mut pools = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for w in workers {
        let (service, zone) = (w["service"].as_str().unwrap(), w["zone"].as_str().unwrap());
        assert_eq!(w["node_zone"], zone, "{w}");
        let key = w["key_secret"].as_str().unwrap();
        assert_eq!(key, format!("worker-key-{service}-{zone}"), "{w}");
        assert_ne!(key, "gateway-admin-key");
        // ... and the public half of the relays' key, which it checks every message with.
        assert_eq!(w["public_keys"], "dispatch-public-keys", "{w}");
        // ... and logs in to NATS as its pool's own user.
        assert_eq!(w["nats_user"], format!("worker-{service}-{zone}"), "{w}");
        assert_eq!(strs(&w["pdb"]).len(), 1, "{w}");
        pools.insert((service.to_owned(), zone.to_owned()));
        keys.insert(key.to_owned());
    }
    let expected: BTreeSet<(String, String)> = ["vm", "bm", "k8s", "storage"]
        .iter()
        .flat_map(|s| ["zone-a", "zone-b"].map(|z| (s.to_string(), z.to_owned())))
        .collect();
    assert_eq!(pools, expected);
    assert_eq!(keys.len(), workers.len(), "every pool has its own key");

    // migrations run as a Job before the Deployments, with the admin key
    let migrate = &prod["migrate"];
    assert_eq!(migrate["args"], serde_json::json!(["migrate"]));
    assert_eq!(migrate["hook"], "Sync");
    assert_eq!(
        migrate["admin_key_secret"],
        serde_json::json!(["gateway-admin-key", "key"])
    );

    // NATS: three JetStream nodes, streams with three replicas
    let nats = &prod["nats"];
    assert_eq!(int(&nats["replicas"]), 3);
    assert_eq!(nats["config_parsed_by_nats_server"], true, "{nats}");
    // ... requiring a login: the users file from the nats-auth Secret, beside nats.conf,
    // and every process with its own user (workers above).
    assert_eq!(nats["includes_users_file"], true, "{nats}");
    assert_eq!(
        nats["users_file"],
        serde_json::json!([["nats-auth", "auth.conf", "auth.conf"]]),
        "{nats}"
    );
    assert_eq!(gw["nats_user"], "gateway", "{gw}");
    assert_eq!(relay["nats_user"], "relay", "{relay}");
    assert_eq!(migrate["nats_user"], "relay", "{migrate}");
    assert_eq!(prod["webhooks"]["nats_user"], "gateway");
    assert_eq!(strs(&nats["routes"]).len(), 3, "{nats}");
    assert_eq!(strs(&nats["pdb"]).len(), 1, "{nats}");
    assert_eq!(migrate["stream_replicas"], "3");

    // PostgreSQL: three instances, synchronous, the gateway on the primary's Service
    let pg = &prod["postgres"];
    assert_eq!(int(&pg["instances"]), 3);
    assert!(int(&pg["synchronous"]["number"]) >= 1, "{pg}");
    assert_eq!(pg["synchronous"]["dataDurability"], "required");
    // ... over TLS verified against the operator's CA (every process that reaches
    // PostgreSQL is checked by the script; the gateway's facts are shown here).
    assert_eq!(
        gw["database"],
        serde_json::json!({"secret": [pg["app_secret"], "uri"], "sslmode": "verify-full",
                           "ca_secret": pg["ca_secret"]}),
        "{gw}"
    );
    assert_eq!(pg["ca_secret"], "postgres-ca");
    assert!(
        int(&pg["connection_budget"]) < int(&pg["max_connections"]),
        "{pg}"
    );

    // Prometheus Operator objects and the dashboard
    let mon = &prod["monitoring"];
    assert!(strs(&mon["service_monitors"]).contains("gateway"), "{mon}");
    let pod_monitors = strs(&mon["pod_monitors"]);
    assert!(
        pod_monitors.contains("relay") && pod_monitors.contains("workers"),
        "{mon}"
    );
    assert!(strs(&mon["prometheus_rules"]).contains("gateway"), "{mon}");
    assert!(
        strs(&mon["dashboards"]).contains("gateway-dashboard"),
        "{mon}"
    );

    // compose.yaml: every worker with its own pool's key
    let compose_workers = facts["compose"]["workers"].as_array().unwrap();
    assert_eq!(compose_workers.len(), 8);
    for w in compose_workers {
        assert_eq!(
            w["key_file"],
            format!(
                "/worker-keys/{}-{}",
                w["service"].as_str().unwrap(),
                w["zone"].as_str().unwrap()
            ),
            "{w}"
        );
    }
}

/// The NATS configuration the Kubernetes pods get — `base/nats/nats.conf` with, beside
/// it, the users file `gateway nats-config` writes (the `nats-auth` Secret) — runs a
/// server that refuses a client without a login and takes each process's user with its
/// own seed (the `nats-seed-<user>` Secrets). Only the paths and ports a pod has to
/// itself are changed; the cluster's routes lead nowhere here, which a server runs with.
#[tokio::test]
async fn the_kubernetes_nats_configuration_requires_a_login() {
    use crate::common::{free_port, Nats, TempDir};
    let dir = TempDir::new("gwtest-k8s-nats");
    let gateway_env = |name: &str| match name {
        "OPS_STREAM" => Some("OPS".to_owned()),
        "OPS_SUBJECT_PREFIX" => Some("ops".to_owned()),
        _ => None,
    };
    let config = gateway::config::Config::from_lookup(gateway_env).unwrap();
    let zones = ["zone-a".to_owned(), "zone-b".to_owned()];
    gateway::credentials::write(
        dir.path(),
        &config.nats,
        &zones,
        &crate::common::builtin_services(),
        &[],
    )
    .unwrap();
    let root = crate::common::repo_root();
    let shipped =
        std::fs::read_to_string(root.join("deploy/kubernetes/base/nats/nats.conf")).unwrap();
    let local = dir.path().display().to_string();
    let conf = shipped
        .replace("$POD_NAME", "nats-0")
        .replace("/data/jetstream", &format!("{local}/jetstream"))
        .replace("/var/run/nats/nats.pid", &format!("{local}/nats.pid"))
        .replace("0.0.0.0:8222", &format!("127.0.0.1:{}", free_port()))
        .replace("0.0.0.0:6222", &format!("127.0.0.1:{}", free_port()));
    assert!(conf.contains("include \"auth.conf\""), "{conf}");
    std::fs::write(dir.path().join("nats.conf"), conf).unwrap();
    let nats = Nats::start_with_config(Some(dir.path().join("nats.conf")));

    let refused = |e: async_nats::ConnectError| {
        assert_eq!(
            e.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation,
            "{e}"
        )
    };
    let anonymous = async_nats::connect(nats.url()).await;
    refused(anonymous.expect_err("a client without a login was let in"));
    for user in [
        "gateway",
        "relay",
        "worker-vm-zone-a",
        "worker-storage-zone-b",
    ] {
        let seed =
            std::fs::read_to_string(gateway::credentials::seed_path(dir.path(), user)).unwrap();
        let client = async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
            .connect(nats.url())
            .await
            .unwrap_or_else(|e| panic!("{user} logs in with its seed: {e}"));
        client.flush().await.unwrap();
    }
    let stranger =
        async_nats::ConnectOptions::with_nkey(nkeys::KeyPair::new_user().seed().unwrap())
            .connect(nats.url())
            .await;
    refused(stranger.expect_err("a key the users file does not name was let in"));
}

// ---------------------------------------------------------------------------------------
// PostgreSQL failover, as far as this machine allows: what CloudNativePG does in the
// cluster — a synchronous standby promoted, the `postgres-rw` Service moved to it — done
// here by hand: a primary with a synchronous streaming standby, and a TCP proxy in
// front of them as the Service. `gateway up` (API, relay, reconciler, simulated workers)
// takes writes through the proxy while the primary crashes, the standby is promoted
// and the proxy switches. README, "Deploying on Kubernetes", says what must happen.

mod failover {
    use std::net::TcpListener as StdListener;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    fn pg_bin(name: &str) -> PathBuf {
        if let Ok(dir) = std::env::var("PG_BIN_DIR") {
            return Path::new(&dir).join(name);
        }
        let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        versions.sort();
        let version = versions
            .last()
            .expect("PostgreSQL server binaries in /usr/lib/postgresql (or set PG_BIN_DIR): run scripts/services.sh");
        PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/{name}"))
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    /// PostgreSQL refuses to run as root: as root, run its programs as `postgres`.
    fn as_postgres(program: &Path, args: &[&str]) -> Command {
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

    fn run(mut c: Command, what: &str) -> String {
        let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{what} failed:\n{text}");
        text
    }

    fn free_port() -> u16 {
        StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn psql(port: u16, sql: &str) -> String {
        let mut c = Command::new("psql");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            sql,
        ]);
        run(c, "psql").trim().to_owned()
    }

    /// The two clusters, the gateway, and what to clean up, whatever happens.
    struct Site {
        dir: PathBuf,
        primary: u16,
        standby: u16,
        gateway: Option<Child>,
    }

    impl Site {
        fn data(&self, name: &str) -> String {
            self.dir.join(name).to_str().unwrap().to_owned()
        }

        fn start(&self, name: &str, port: u16, extra: &str) {
            let log = self.dir.join(format!("{name}.log"));
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 {extra}",
                self.dir.display()
            );
            run(
                as_postgres(
                    &pg_bin("pg_ctl"),
                    &[
                        "-D",
                        &self.data(name),
                        "-l",
                        log.to_str().unwrap(),
                        "-o",
                        &options,
                        "-w",
                        "start",
                    ],
                ),
                &format!("pg_ctl start {name}"),
            );
        }

        fn stop(&self, name: &str) {
            let _ = as_postgres(
                &pg_bin("pg_ctl"),
                &["-D", &self.data(name), "-m", "immediate", "-w", "stop"],
            )
            .output();
        }
    }

    impl Drop for Site {
        fn drop(&mut self) {
            if let Some(mut g) = self.gateway.take() {
                let _ = g.kill();
                let _ = g.wait();
            }
            self.stop("primary");
            self.stop("standby");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The stand-in for CloudNativePG's `postgres-rw` Service: forwards each new
    /// connection to whichever server `target` names.
    async fn proxy(listener: tokio::net::TcpListener, target: Arc<AtomicU16>) {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let port = target.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    }

    #[derive(Default)]
    struct Outcomes {
        /// Operation IDs of `202`s, with when the request was sent and answered.
        accepted: Vec<(String, Instant, Instant)>,
        unavailable: usize,
        unexpected: Vec<String>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_failover_to_a_synchronous_standby_loses_no_accepted_operation() {
        let _heavy = crate::common::heavy().await;
        let dir = std::env::temp_dir().join(format!(
            "gw-failover-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&dir);
                    c
                },
                "chown",
            );
        }
        let mut site = Site {
            dir,
            primary: free_port(),
            standby: free_port(),
            gateway: None,
        };

        // The primary waits for its standby at every commit, as `dataDurability: required`.
        run(
            as_postgres(
                &pg_bin("initdb"),
                &[
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-D",
                    &site.data("primary"),
                ],
            ),
            "initdb",
        );
        site.start(
            "primary",
            site.primary,
            "-c wal_level=replica -c synchronous_standby_names='*' -c synchronous_commit=on",
        );
        run(
            as_postgres(
                &pg_bin("pg_basebackup"),
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &site.primary.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    &site.data("standby"),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
            ),
            "pg_basebackup",
        );
        site.start("standby", site.standby, "");
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql(
            site.primary,
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        ) != "1"
        {
            assert!(
                Instant::now() < deadline,
                "the standby never became synchronous"
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        let target = Arc::new(AtomicU16::new(site.primary));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rw_port = listener.local_addr().unwrap().port();
        tokio::spawn(proxy(listener, target.clone()));

        let api_port = free_port();
        let stream = format!("FAILOVER{api_port}");
        let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let admin_key = "failover-test-admin-key-0123456789";
        site.gateway = Some(
            Command::new(env!("CARGO_BIN_EXE_gateway"))
                .arg("up")
                .env(
                    "DATABASE_URL",
                    format!("postgres://postgres@127.0.0.1:{rw_port}/gateway"),
                )
                .env("NATS_URL", &nats_url)
                .env("OPS_STREAM", &stream)
                .env("OPS_SUBJECT_PREFIX", stream.to_lowercase())
                .env(
                    "EVENTS_SUBJECT_PREFIX",
                    format!("{}-events", stream.to_lowercase()),
                )
                .env("GATEWAY_LISTEN", format!("127.0.0.1:{api_port}"))
                .env("GATEWAY_ADMIN_KEY", admin_key)
                .env("SIM_MIN_LATENCY_MS", "10")
                .env("SIM_MAX_LATENCY_MS", "50")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(site.dir.join("gateway.log")).unwrap())
                .spawn()
                .expect("gateway up starts"),
        );
        let api = format!("http://127.0.0.1:{api_port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = http
                .get(format!("{api}/readyz"))
                .send()
                .await
                .map(|r| r.status().is_success());
            if ready.unwrap_or(false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway up did not become ready: {}",
                std::fs::read_to_string(site.dir.join("gateway.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let auth = format!("Bearer {admin_key}");
        let r = http
            .post(format!("{api}/v1/tenants"))
            .header("Authorization", &auth)
            .json(&serde_json::json!({"id": "acme"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());

        // Writes, four at a time, throughout.
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..4 {
            let (http, api, auth, outcomes, stop) = (
                http.clone(),
                api.clone(),
                auth.clone(),
                outcomes.clone(),
                stop.clone(),
            );
            clients.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let sent = Instant::now();
                    let body = serde_json::json!({"name": format!("vm-{c}-{i}"), "zone": "zone-a",
                        "spec": {"flavor": "m1.small", "image": "debian-12"}});
                    let r = http
                        .post(format!("{api}/v1/tenants/acme/vms"))
                        .header("Authorization", &auth)
                        .json(&body)
                        .send()
                        .await;
                    let outcome = match r {
                        Err(e) => Err(format!("request failed: {e}")),
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let retry_after = r.headers().contains_key("retry-after");
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            match status {
                                202 => Ok(Some(v["id"].as_str().unwrap().to_owned())),
                                503 if v["code"] == "database_unavailable" && retry_after => {
                                    Ok(None)
                                }
                                _ => Err(format!("{status} {v}")),
                            }
                        }
                    };
                    {
                        let mut o = outcomes.lock().unwrap();
                        match outcome {
                            Ok(Some(id)) => o.accepted.push((id, sent, Instant::now())),
                            Ok(None) => o.unavailable += 1,
                            Err(e) => o.unexpected.push(e),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }

        tokio::time::sleep(Duration::from_secs(2)).await;
        // The primary dies; the standby is promoted and the Service follows it
        // (CloudNativePG: failoverDelay 0, then postgres-rw moves). Meanwhile the
        // gateway answers 503 at once (its connections fail, the proxy refuses new
        // ones) and its probe finds the new primary behind the same address.
        let crashed_at = Instant::now();
        site.stop("primary");
        tokio::time::sleep(Duration::from_secs(3)).await;
        run(
            as_postgres(
                &pg_bin("pg_ctl"),
                &["-D", &site.data("standby"), "-w", "promote"],
            ),
            "pg_ctl promote",
        );
        target.store(site.standby, Ordering::SeqCst);
        let switched_at = Instant::now();

        // Writes resume by themselves.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let after = outcomes
                .lock()
                .unwrap()
                .accepted
                .iter()
                .filter(|(_, sent, _)| *sent > switched_at)
                .count();
            if after >= 10 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writes did not resume after the failover: {}",
                std::fs::read_to_string(site.dir.join("gateway.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.await.unwrap();
        }

        let o = std::mem::take(&mut *outcomes.lock().unwrap());
        let before = o
            .accepted
            .iter()
            .filter(|(_, _, answered)| *answered < crashed_at)
            .count();
        let slowest = o
            .accepted
            .iter()
            .map(|(_, sent, answered)| *answered - *sent)
            .max()
            .unwrap_or_default();
        eprintln!(
            "failover: {} writes accepted ({before} before the crash, slowest {slowest:?}), {} refused with 503 while the primary was away, unexpected: {:?}",
            o.accepted.len(),
            o.unavailable,
            o.unexpected
        );
        assert!(before > 0, "no write was accepted before the crash");
        assert!(
            o.unavailable > 0,
            "no write was refused with 503 while the primary was away"
        );
        assert!(o.unexpected.is_empty(), "writes must be accepted or refused with 503 database_unavailable and Retry-After: {:?}", o.unexpected);

        // Every accepted operation is on the promoted standby and finishes.
        for (id, _, _) in &o.accepted {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = http
                    .get(format!("{api}/v1/operations/{id}?wait=10s"))
                    .header("Authorization", &auth)
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                assert!(
                    status.is_success(),
                    "operation {id}, accepted before the failover, is gone: {status} {v}"
                );
                if v["state"] == "succeeded" {
                    break;
                }
                assert!(v["done"] != true, "operation {id} ended {v}");
                assert!(
                    Instant::now() < deadline,
                    "operation {id} did not finish: {v}"
                );
            }
        }
        if let Ok(client) = async_nats::connect(&nats_url).await {
            let js = async_nats::jetstream::new(client);
            let names = gateway::config::NatsNames {
                stream: stream.clone(),
                ..Default::default()
            };
            for s in gateway::jetstream::stream_names(&names).unwrap() {
                let _ = js.delete_stream(&s).await;
            }
        }
    }
}
