//! Broker security, against private `nats-server`s with authentication on (the users,
//! NKEYs and permissions `gateway nats-config` writes), and the trust of dispatches:
//! `up` runs end to end on its own authenticated broker; each user can do only what its
//! role needs; a forged or altered dispatch is terminated without running the driver.

use crate::common;
use crate::common::eventually;
use crate::common::{example_spec, pg_base, unique};
use crate::common::{free_port, Nats, TempDir};
use async_nats::jetstream::{self, consumer::PullConsumer, stream::Stream};
use futures::StreamExt;
use gateway::app::{self, Parts};
use gateway::broker::RoleLogins;
use gateway::config::{Config, NatsNames};
use gateway::credentials::{self, GATEWAY, RELAY};
use gateway_proto::{signing, Dispatch, Service};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A private broker with authentication on, its users made for a deployment of its own.
struct Broker {
    nats: Nats,
    logins: RoleLogins,
    _dir: TempDir,
}

impl Broker {
    fn start() -> Self {
        Self::start_with("")
    }

    /// A broker whose configuration also holds `extra` (e.g. a `tls` block).
    fn start_with(extra: &str) -> Self {
        let id = unique();
        let names = NatsNames {
            region: None,
            stream: format!("T{id}"),
            subject_prefix: format!("t{id}.ops"),
            events_prefix: format!("t{id}.events"),
        };
        let dir = TempDir::new("gwtest-creds");
        let zones: Vec<String> = common::ZONES.iter().map(|z| z.to_string()).collect();
        credentials::write(
            dir.path(),
            &names,
            &zones,
            &crate::common::builtin_services(),
            &[],
        )
        .unwrap();
        let conf = dir.path().join("server.conf");
        let store = dir.path().join("store");
        let jetstream = format!("jetstream {{ store_dir: \"{}\" }}", store.display());
        std::fs::write(
            &conf,
            format!("{jetstream}\ninclude \"auth.conf\"\n{extra}\n"),
        )
        .unwrap();
        let nats = Nats::start_with_config(Some(conf));
        Self {
            logins: RoleLogins {
                url: nats.url(),
                dir: dir.path().to_owned(),
                names,
                server: None,
            },
            nats,
            _dir: dir,
        }
    }

    fn names(&self) -> &NatsNames {
        &self.logins.names
    }

    /// JetStream as `user`, with a short timeout: a refused request fails fast.
    async fn js(&self, user: &str) -> jetstream::Context {
        let mut js = jetstream::new(self.logins.connect(user).await.unwrap());
        js.set_timeout(Duration::from_secs(2));
        js
    }

    /// A connection as `user` that records the server's errors (permission violations).
    async fn watched(&self, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let login = credentials::login(&self.logins.dir, user).unwrap();
        let inbox = workers::nats::inbox_prefix(&self.names().stream, user);
        let client = login
            .options(user, &inbox)
            .await
            .unwrap()
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(&self.logins.url)
            .await
            .unwrap();
        workers::nats::wait_connected(&client, &self.logins.url)
            .await
            .unwrap();
        (client, errors)
    }

    async fn ops(&self) -> Stream {
        self.js(GATEWAY)
            .await
            .get_stream(&self.names().stream)
            .await
            .unwrap()
    }
}

/// Waits until `errors` holds one that mentions `what`.
async fn violation(errors: &Arc<Mutex<Vec<String>>>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if errors.lock().unwrap().iter().any(|e| e.contains(what)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no permissions violation about {what}: {:?}",
            errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database of the test's own, dropped at the end.
struct Database(String);

impl Database {
    fn new() -> Self {
        Self(format!("gwtest_{}", unique()))
    }

    fn url(&self) -> String {
        format!("{}/{}", pg_base(), self.0)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&format!("{}/postgres", pg_base())).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&pool)
                            .await;
                }
            });
        })
        .join();
    }
}

/// `POST` with `key`; the status and JSON body.
async fn post(url: &str, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Makes a tenant and submits a VM create in `zone-a`; the operation's ID.
async fn create_vm(url: &str, key: &str, tenant: &str, name: &str) -> Uuid {
    let (status, body) = post(
        url,
        key,
        &format!("/v1/tenants/{tenant}/vms"),
        json!({"name": name, "zone": "zone-a", "spec": example_spec("vms")}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn make_tenant(url: &str, key: &str) -> String {
    let tenant = format!("t-{}", unique());
    let (status, body) = post(url, key, "/v1/tenants", json!({ "id": tenant })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    tenant
}

#[tokio::test]
async fn up_runs_operations_end_to_end_on_its_own_authenticated_broker_and_stops_it() {
    let _heavy = crate::common::heavy().await;
    let db = Database::new();
    let data = TempDir::new("gwtest-up");
    let (api_port, nats_port) = (free_port(), free_port());
    let admin_key = format!("admin-{}", Uuid::new_v4().simple());
    let log = std::fs::File::create(data.path().join("up.log")).unwrap();
    let mut up = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("up")
        .env_remove("NATS_URL")
        .env("DATABASE_URL", db.url())
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{api_port}"))
        .env("GATEWAY_ADMIN_KEY", &admin_key)
        .env("GATEWAY_DATA_DIR", data.path())
        .env("GATEWAY_UP_NATS_PORT", nats_port.to_string())
        .env("SIM_MIN_LATENCY_MS", "1")
        .env("SIM_MAX_LATENCY_MS", "10")
        .env("METRICS_REFRESH_MS", "100")
        .env("RECONCILE_INTERVAL_MS", "200")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{api_port}");
    let log = || std::fs::read_to_string(data.path().join("up.log")).unwrap_or_default();
    let healthy = async {
        for _ in 0..600 {
            if let Ok(r) = reqwest::get(format!("{url}/readyz")).await {
                if r.status().is_success() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(healthy.await, "up did not come up:\n{}", log());

    let tenant = make_tenant(&url, &admin_key).await;
    let http = reqwest::Client::new();
    // A success, and a failure (the worker terminates its message: a dead letter for
    // the gateway to clear from the advisory stream).
    for (name, expected) in [("web-1", "succeeded"), ("fail-1", "failed")] {
        let op = create_vm(&url, &admin_key, &tenant, name).await;
        let state = eventually("the operation ends", || {
            let req = http
                .get(format!("{url}/v1/operations/{op}"))
                .bearer_auth(&admin_key);
            async move {
                let body: Value = req.send().await.ok()?.json().await.ok()?;
                body["done"].as_bool()?.then(|| body["state"].clone())
            }
        })
        .await;
        assert_eq!(state, expected, "{}", log());
    }
    let gateway_user = RoleLogins {
        url: format!("nats://127.0.0.1:{nats_port}"),
        dir: data.path().join("nats"),
        names: NatsNames::default(),
        server: None,
    };
    let js = jetstream::new(gateway_user.connect(GATEWAY).await.unwrap());
    eventually("the dead letter is handled", || async {
        let mut consumer: PullConsumer = js
            .get_consumer_from_stream("gateway-dead-letters", "OPS-ADVISORIES")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        let handled = info.delivered.stream_sequence >= 1
            && info.num_pending == 0
            && info.num_ack_pending == 0;
        handled.then_some(())
    })
    .await;
    // Metrics, reconciler and dead letters ran a while: every part had the permissions
    // it needed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!log().contains("Permissions Violation"), "{}", log());

    // The broker is up's own, and it lets no one in without credentials.
    let anonymous = async_nats::ConnectOptions::new()
        .connect(format!("nats://127.0.0.1:{nats_port}"))
        .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let seeds = data.path().join("nats");
    for user in [
        "gateway",
        "relay",
        "events-reader",
        "worker-vm-zone-a",
        "worker-storage-zone-b",
    ] {
        assert!(credentials::seed_path(&seeds, user).is_file(), "{user}");
    }

    // Stopping up stops its broker.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while up.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "up did not stop:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the private nats-server outlived up:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn serve_relay_and_migrate_processes_run_as_their_own_users() {
    let _heavy = crate::common::heavy().await;
    use crate::common::{Gateway, GatewayEnv};
    let broker = Broker::start();
    let db = Database::new();
    let names = broker.names().clone();
    let seed = |user: &str| {
        let path = credentials::seed_path(&broker.logins.dir, user);
        ("NATS_NKEY_SEED_FILE".to_owned(), path.display().to_string())
    };
    let key = signing::SigningKey::from_seed(rand::random());
    let env = |extra: Vec<(String, String)>| GatewayEnv {
        database_url: db.url(),
        nats_url: broker.nats.url(),
        admin_key: format!("admin-{}", Uuid::new_v4().simple()),
        stream: names.stream.clone(),
        subject_prefix: names.subject_prefix.clone(),
        events_prefix: names.events_prefix.clone(),
        extra,
    };
    let signing = ("GATEWAY_DISPATCH_SIGNING_KEY".to_owned(), key.to_text());
    let relay_env = env(vec![seed(RELAY), signing]);
    let gateway_env = GatewayEnv {
        extra: vec![seed(GATEWAY)],
        ..relay_env.clone()
    };
    let migrate_env = relay_env.clone();
    tokio::task::spawn_blocking(move || Gateway::migrate(&migrate_env))
        .await
        .unwrap();
    let api = Gateway::serve(&gateway_env).await;
    let relay = Gateway::relay(&relay_env);
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let driver = workers::SimDriver::new(common::fast_sim());
    let stop = CancellationToken::new();
    let worker = tokio::spawn(workers::run_pool(
        broker.js("worker-vm-zone-a").await,
        workers::PoolConfig {
            service: Service::named("vm"),
            zone: "zone-a".into(),
            stream: names.stream.clone(),
            gateway_url: api.url(),
            gateway_key: app::worker_key(&pool, &Service::named("vm"), "zone-a")
                .await
                .unwrap(),
            concurrency: 4,
            max_deliver: 5,
            dispatch_keys: key.public_key().into(),
            report_batch: workers::PoolConfig::DEFAULT_REPORT_BATCH,
        },
        driver.clone(),
        stop.clone(),
    ));

    let tenant = make_tenant(&api.url(), &relay_env.admin_key).await;
    let op = create_vm(&api.url(), &relay_env.admin_key, &tenant, "web-1").await;
    eventually("the VM is created", || async {
        (state(&pool, op).await == "succeeded").then_some(())
    })
    .await;
    assert_eq!(driver.executions(op), 1);
    for (name, process) in [("serve", &api), ("relay", &relay)] {
        assert!(
            !process.log().contains("Permissions Violation"),
            "{name}:\n{}",
            process.log()
        );
    }
    stop.cancel();
    worker.await.unwrap().unwrap();

    // A relay without the signing key refuses to start.
    let mut unsigned = Gateway::relay(&env(vec![seed(RELAY)]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while unsigned.is_running() {
        assert!(tokio::time::Instant::now() < deadline, "{}", unsigned.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        unsigned.log().contains("GATEWAY_DISPATCH_SIGNING_KEY"),
        "{}",
        unsigned.log()
    );
}

#[tokio::test]
async fn each_user_may_do_only_what_its_role_needs() {
    let _heavy = crate::common::heavy().await;
    let broker = Broker::start();
    let names = broker.names().clone();
    // `gateway migrate` as the relay, configured through the environment as a relay
    // process is.
    let db = Database::new();
    let seed_file = credentials::seed_path(&broker.logins.dir, RELAY);
    let vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", db.url()),
        ("NATS_URL", broker.nats.url()),
        ("NATS_NKEY_SEED_FILE", seed_file.display().to_string()),
        ("OPS_STREAM", names.stream.clone()),
        ("OPS_SUBJECT_PREFIX", names.subject_prefix.clone()),
        ("EVENTS_SUBJECT_PREFIX", names.events_prefix.clone()),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let backends = app::connect_as(&config, RELAY).await.unwrap();
    app::migrate(&config, &backends, false).await.unwrap();

    // The relay publishes one operation for vm/zone-a and one for bm/zone-a.
    let relay = broker.js(RELAY).await;
    for service in ["vm", "bm"] {
        relay
            .publish(
                format!("{}.{service}.zone-a", names.subject_prefix),
                "{}".into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let ops = broker.ops().await;
    let pending = |consumer: &'static str| {
        let ops = ops.clone();
        async move { ops.consumer_info(consumer).await.unwrap().num_pending }
    };
    assert_eq!(
        (pending("vm-zone-a").await, pending("bm-zone-a").await),
        (1, 1)
    );

    // A worker of vm/zone-a pulls from and acknowledges its own consumer.
    let worker = broker.js("worker-vm-zone-a").await;
    let own: PullConsumer = worker
        .get_consumer_from_stream("vm-zone-a", &names.stream)
        .await
        .unwrap();
    let mut batch = own.fetch().max_messages(1).messages().await.unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    msg.ack().await.unwrap();
    worker.client().flush().await.unwrap();
    eventually("the worker's ack lands", || async {
        (ops.clone()
            .consumer_info("vm-zone-a")
            .await
            .ok()?
            .num_ack_pending
            == 0)
            .then_some(())
    })
    .await;

    // It cannot read another pool's consumer, neither through the API nor by pulling.
    assert!(worker
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            "bm-zone-a",
            &names.stream
        )
        .await
        .is_err());
    let (client, errors) = broker.watched("worker-vm-zone-a").await;
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.bm-zone-a", names.stream);
    let pulled = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(next.clone(), r#"{"batch":1,"expires":500000000}"#.into()),
    )
    .await;
    assert!(
        !matches!(pulled, Ok(Ok(_))),
        "pulled from another pool: {pulled:?}"
    );
    violation(&errors, &next).await;
    assert_eq!(
        pending("bm-zone-a").await,
        1,
        "the other pool's message is untouched"
    );

    // It cannot publish operations, nor read another user's replies.
    let subject = format!("{}.vm.zone-a", names.subject_prefix);
    client.publish(subject.clone(), "{}".into()).await.unwrap();
    client.flush().await.unwrap();
    violation(&errors, &subject).await;
    let others = format!("_INBOX.{}.gateway.>", names.stream);
    let _sub = client.subscribe(others.clone()).await.unwrap();
    violation(&errors, &others).await;
    assert_eq!(pending("vm-zone-a").await, 0, "nothing was published");

    // It cannot purge or delete streams.
    let stream_as_worker = worker.get_stream_no_info(&names.stream).await.unwrap();
    assert!(stream_as_worker.purge().await.is_err());
    assert!(worker.delete_stream(&names.stream).await.is_err());
    assert!(
        worker.get_stream(&names.stream).await.is_err(),
        "no stream info either"
    );
    assert_eq!(ops.clone().info().await.unwrap().state.messages, 1);

    // The gateway does not publish operations; the events reader sees nothing of them.
    let (gateway, gateway_errors) = broker.watched(GATEWAY).await;
    gateway.publish(subject.clone(), "{}".into()).await.unwrap();
    gateway.flush().await.unwrap();
    violation(&gateway_errors, &subject).await;
    let events = broker.js(credentials::EVENTS_READER).await;
    assert!(events.get_stream(&names.stream).await.is_err());
    assert_eq!(pending("vm-zone-a").await, 0);

    // The relay publishes events; the events reader (and the gateway) read them through
    // consumers of their own; the reader publishes nothing, workers see no events.
    let event_subject = format!("{}.acme.vm.zone-a", names.events_prefix);
    relay
        .publish(event_subject.clone(), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for reader in [events.clone(), broker.js(GATEWAY).await] {
        let stream = reader.get_stream(names.events_stream()).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: format!("{}.acme.>", names.events_prefix),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
        let m = batch.next().await.unwrap().unwrap();
        assert_eq!(m.subject.as_str(), event_subject);
        m.ack().await.unwrap();
    }
    let (reader, reader_errors) = broker.watched(credentials::EVENTS_READER).await;
    reader
        .publish(event_subject.clone(), "{}".into())
        .await
        .unwrap();
    reader.flush().await.unwrap();
    violation(&reader_errors, &event_subject).await;
    assert!(worker.get_stream(names.events_stream()).await.is_err());

    // The gateway keeps the audit chain's end: it reads and writes it, each write
    // naming the last; no other user may write it, and nobody can delete it.
    use gateway::audit::anchor::{Anchor, Saved, WriteError};
    let anchor = Anchor::new(broker.js(GATEWAY).await, &names);
    let nothing = Saved {
        message: 0,
        end: None,
    };
    assert_eq!(anchor.read().await.unwrap(), nothing);
    let end = (7, vec![7u8; 32]);
    let message = anchor.write(0, Some(&end)).await.unwrap();
    let saved = Saved {
        message,
        end: Some(end),
    };
    assert_eq!(anchor.read().await.unwrap(), saved);
    assert!(matches!(
        anchor.write(0, Some(&(9, vec![9u8; 32]))).await,
        Err(WriteError::Moved)
    ));
    let audit_subject = names.audit_end_subject();
    for user in [RELAY, credentials::EVENTS_READER, "worker-vm-zone-a"] {
        let (client, errors) = broker.watched(user).await;
        client
            .publish(audit_subject.clone(), "{}".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        violation(&errors, &audit_subject).await;
    }
    let audit_stream = broker
        .js(GATEWAY)
        .await
        .get_stream_no_info(names.audit_stream())
        .await
        .unwrap();
    assert!(audit_stream.delete_message(message).await.is_err());
    assert!(audit_stream.purge().await.is_err());
    assert_eq!(anchor.read().await.unwrap(), saved);

    // And nobody gets in without credentials.
    assert!(async_nats::ConnectOptions::new()
        .connect(broker.nats.url())
        .await
        .is_err());
}

#[tokio::test]
async fn a_rotated_user_is_shut_out_on_reload_and_gets_back_in_with_its_new_seed() {
    let _heavy = crate::common::heavy().await;
    let broker = Broker::start();
    let user = "worker-vm-zone-a";
    let zones: Vec<String> = common::ZONES.iter().map(|z| z.to_string()).collect();
    gateway::jetstream::apply(
        &broker.js(RELAY).await,
        broker.names(),
        &zones,
        &crate::common::builtin_services(),
    )
    .await
    .unwrap();
    let old = broker.logins.connect(user).await.unwrap();
    let rotated = credentials::write(
        &broker.logins.dir,
        broker.names(),
        &zones,
        &crate::common::builtin_services(),
        &[user.into()],
    )
    .unwrap();
    assert_eq!(rotated.created, [user]);
    broker.nats.reload();
    eventually("the old key is disconnected", || async {
        (old.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    let new = jetstream::new(broker.logins.connect(user).await.unwrap());
    let bound: Result<PullConsumer, _> = new
        .get_consumer_from_stream("vm-zone-a", &broker.names().stream)
        .await;
    assert!(
        bound.is_ok(),
        "the new seed has the user's permissions: {bound:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        old.connection_state(),
        async_nats::connection::State::Connected,
        "the old seed stays out"
    );
}

/// A gateway (API and relay; no reconciler, no workers) on an authenticated broker, its
/// stream remembering message IDs for one second only.
async fn gateway_on(broker: &Broker, db: &Database) -> (app::Running, Config, String) {
    let mut config = Config::for_tests(db.url(), broker.names().clone());
    config.nats_url = broker.nats.url();
    let pool = gateway::store::connect(&config.database_url, 10)
        .await
        .unwrap();
    let backends = app::connect_private(&config, pool, broker.logins.clone())
        .await
        .unwrap();
    let admin_key = app::migrate(&config, &backends, true)
        .await
        .unwrap()
        .unwrap();
    let mut defs = gateway::jetstream::Definitions::shipped().unwrap();
    defs.ops_stream.duplicate_window_seconds = 1;
    let zones: Vec<String> = common::ZONES.iter().map(|z| z.to_string()).collect();
    gateway::jetstream::apply_definitions(
        &broker.js(RELAY).await,
        broker.names(),
        &zones,
        &crate::common::builtin_services(),
        &defs,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let parts = Parts {
        api: true,
        relay: true,
        ..Default::default()
    };
    let running = app::start(&config, backends, Some(listener), parts)
        .await
        .unwrap();
    (running, config, admin_key)
}

/// The operation's state and stream sequence, once the relay has published it.
async fn dispatched(pool: &sqlx::PgPool, id: Uuid) -> u64 {
    eventually("the operation is dispatched", || async {
        let (state, seq): (String, Option<i64>) =
            sqlx::query_as("SELECT state, stream_seq FROM operations WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .ok()?;
        (state == "dispatched").then_some(seq?).map(|s| s as u64)
    })
    .await
}

async fn state(pool: &sqlx::PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT state FROM operations WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Publishes `body` on `subject` with `headers` as the relay user (a stolen relay login,
/// or a broker someone else controls).
async fn publish_as_relay(
    broker: &Broker,
    subject: &str,
    headers: async_nats::HeaderMap,
    body: Vec<u8>,
) {
    broker
        .js(RELAY)
        .await
        .publish_with_headers(subject.to_owned(), headers, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The value of `worker_messages_total` for vm/zone-a with `outcome`.
fn outcome(registry: &prometheus_client::registry::Registry, outcome: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let series =
        format!("worker_messages_total{{service=\"vm\",zone=\"zone-a\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn forged_and_altered_dispatches_are_terminated_without_running_the_driver() {
    let _heavy = crate::common::heavy().await;
    let broker = Broker::start();
    let db = Database::new();
    let (running, config, admin_key) = gateway_on(&broker, &db).await;
    let url = format!("http://{}", running.addr.unwrap());
    let pool = running.backends.pool.clone();
    let tenant = make_tenant(&url, &admin_key).await;

    // Two genuine operations, published and signed by the relay; no worker runs yet.
    let (a, b) = (
        create_vm(&url, &admin_key, &tenant, "web-a").await,
        create_vm(&url, &admin_key, &tenant, "web-b").await,
    );
    let (seq_a, seq_b) = (dispatched(&pool, a).await, dispatched(&pool, b).await);
    let ops = broker.ops().await;
    let genuine_a = ops.get_raw_message(seq_a).await.unwrap();
    let genuine_b = ops.get_raw_message(seq_b).await.unwrap();
    assert!(genuine_a.headers.get(signing::SIGNATURE_HEADER).is_some());
    // A's own message disappears; in its place come a forgery and an altered copy, for
    // an operation that is really active and dispatched.
    ops.delete_message(seq_a).await.unwrap();
    let mut changed: Dispatch = serde_json::from_slice(&genuine_a.payload).unwrap();
    changed.spec["flavor"] = json!("m1.xlarge");
    changed.input = json!({"vm_id": Uuid::now_v7()});
    let mut forged = async_nats::HeaderMap::new();
    forged.insert("Nats-Msg-Id", format!("{a}.7").as_str());
    publish_as_relay(
        &broker,
        &genuine_a.subject,
        forged,
        serde_json::to_vec(&changed).unwrap(),
    )
    .await;
    let mut altered = genuine_a.headers.clone();
    altered.insert("Nats-Msg-Id", format!("{a}.8").as_str());
    publish_as_relay(
        &broker,
        &genuine_a.subject,
        altered,
        serde_json::to_vec(&changed).unwrap(),
    )
    .await;

    // The vm/zone-a pool, as its own NATS user, trusting the relay's key.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = workers::WorkerMetrics::register(&mut registry);
    let driver = workers::SimDriver::new(common::fast_sim());
    let pool_config = workers::PoolConfig {
        service: Service::named("vm"),
        zone: "zone-a".into(),
        stream: broker.names().stream.clone(),
        gateway_url: url.clone(),
        gateway_key: app::worker_key(&pool, &Service::named("vm"), "zone-a")
            .await
            .unwrap(),
        concurrency: 4,
        max_deliver: 5,
        dispatch_keys: config.dispatch_public_keys(),
        report_batch: workers::PoolConfig::DEFAULT_REPORT_BATCH,
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(workers::run_pool_with_metrics(
        broker.js("worker-vm-zone-a").await,
        pool_config,
        driver.clone(),
        metrics,
        stop.clone(),
    ));

    // B runs; the forgery and the altered copy are terminated unread, counted, and
    // never delivered again; A's driver never ran and A was never reported running.
    eventually("b succeeds", || async {
        (state(&pool, b).await == "succeeded").then_some(())
    })
    .await;
    eventually("both fakes are refused", || async {
        (outcome(&registry, "forged") == 2.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        outcome(&registry, "forged"),
        2.0,
        "refused once each, never retried"
    );
    assert_eq!(driver.executions(a), 0);
    assert_eq!(driver.executions(b), 1);
    assert_eq!(state(&pool, a).await, "dispatched");
    let info = ops.clone().consumer_info("vm-zone-a").await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));

    // A replay of B's genuine message (its duplicate window over) is signed, so it is
    // read, but the gateway refuses to start a finished operation: the driver does not
    // run again.
    publish_as_relay(
        &broker,
        &genuine_b.subject,
        genuine_b.headers.clone(),
        genuine_b.payload.to_vec(),
    )
    .await;
    eventually("the replay is settled", || async {
        (outcome(&registry, "finished_elsewhere") == 1.0).then_some(())
    })
    .await;
    assert_eq!(driver.executions(b), 1);
    assert_eq!(state(&pool, b).await, "succeeded");

    stop.cancel();
    worker.await.unwrap().unwrap();
    running.stop().await;
}

#[tokio::test]
async fn tls_logins_verify_the_broker_against_the_configured_ca() {
    let _heavy = crate::common::heavy().await;
    let certs = TempDir::new("gwtest-tls");
    crate::common::tls::certificates(certs.path());
    let file = |name: &str| certs.path().join(name).display().to_string();
    // The broker requires TLS, and a client certificate from the same CA.
    let broker = Broker::start_with(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}",
        file("server.pem"),
        file("server.key"),
        file("ca.pem"),
    ));
    let seed = credentials::seed_path(&broker.logins.dir, GATEWAY)
        .display()
        .to_string();
    let login = |vars: &[(&str, String)]| {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        workers::nats::NatsLogin::from_lookup(|k| vars.get(k).cloned()).unwrap()
    };
    let inbox = workers::nats::inbox_prefix(&broker.names().stream, GATEWAY);
    let connects = |login: workers::nats::NatsLogin| {
        let (url, inbox) = (broker.nats.url(), inbox.clone());
        async move {
            let client = login.connect(&url, GATEWAY, &inbox).await.unwrap();
            let up = tokio::time::timeout(
                Duration::from_secs(3),
                workers::nats::wait_connected(&client, &url),
            )
            .await;
            matches!(up, Ok(Ok(())))
        }
    };
    let seed = ("NATS_NKEY_SEED_FILE", seed);
    let ca = ("NATS_TLS_CA", file("ca.pem"));
    let client = [
        ("NATS_TLS_CERT", file("client.pem")),
        ("NATS_TLS_KEY", file("client.key")),
    ];
    let trusted = login(&[
        seed.clone(),
        ca.clone(),
        client[0].clone(),
        client[1].clone(),
    ]);
    assert!(trusted.tls.required);
    assert!(
        connects(trusted).await,
        "mutual TLS with the broker's CA connects"
    );
    let no_client_certificate = login(&[seed.clone(), ca]);
    assert!(
        !connects(no_client_certificate).await,
        "a client without a certificate is refused"
    );
    let untrusted = login(&[seed, client[0].clone(), client[1].clone()]);
    assert!(
        !connects(untrusted).await,
        "a broker whose certificate the system's roots do not vouch for is refused"
    );
}
