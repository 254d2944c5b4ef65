//! Signed webhooks (issue 10, part 3): endpoints managed by owners, deliveries signed as
//! Standard Webhooks says (verified by its Python reference library), retried on a
//! schedule, isolated per endpoint, disabled when failing, logged.

use crate::common::{self, example_spec, id_of, spawn_with, Options, TestApp};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::IntoResponse;
use gateway::domain::sealing::{SealKeys, SEALED_PREFIX};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Fail,
    Hang,
    Redirect,
    Big,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub headers: Value,
    pub body: String,
}

#[derive(Clone)]
struct Shared {
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Vec<Got>>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Arc<Mutex<(usize, usize)>>,
}

/// Counts a request in flight until dropped (also when the sender gives up on it).
struct InFlight(Arc<Mutex<(usize, usize)>>);

impl InFlight {
    fn new(count: &Arc<Mutex<(usize, usize)>>) -> Self {
        let mut c = count.lock().unwrap();
        c.0 += 1;
        c.1 = c.1.max(c.0);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().0 -= 1;
    }
}

/// A webhook receiver on 127.0.0.1 that records what it gets; it can fail, hang, be
/// stopped and started again on the same port.
pub struct Receiver {
    pub port: u16,
    shared: Shared,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn receive(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let _counted = InFlight::new(&s.in_flight);
    let mode = *s.mode.lock().unwrap();
    if mode == Mode::Hang {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let h: serde_json::Map<String, Value> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("webhook-") || k.as_str() == "content-type")
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap())))
        .collect();
    s.got.lock().unwrap().push(Got {
        headers: Value::Object(h),
        body,
    });
    match mode {
        Mode::Ok | Mode::Hang => "thanks".into_response(),
        Mode::Fail => (AxumStatus::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Mode::Redirect => (
            AxumStatus::FOUND,
            [("location", "http://127.0.0.1:1/elsewhere")],
        )
            .into_response(),
        Mode::Big => "x".repeat(100_000).into_response(),
    }
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        let mut r = Self {
            port: common::free_port(),
            shared: Shared {
                mode: Arc::new(Mutex::new(mode)),
                got: Default::default(),
                in_flight: Default::default(),
            },
            task: None,
        };
        r.resume().await;
        r
    }

    /// A receiver whose port nobody listens on yet.
    pub fn down() -> Self {
        Self {
            port: common::free_port(),
            shared: Shared {
                mode: Arc::new(Mutex::new(Mode::Ok)),
                got: Default::default(),
                in_flight: Default::default(),
            },
            task: None,
        }
    }

    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let app = axum::Router::new()
            .fallback(axum::routing::any(receive))
            .with_state(self.shared.clone());
        self.task = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn got(&self) -> Vec<Got> {
        self.shared.got.lock().unwrap().clone()
    }

    /// Requests being answered now, and the most there ever were at once.
    pub fn in_flight(&self) -> (usize, usize) {
        *self.shared.in_flight.lock().unwrap()
    }

    /// Waits (30 s at most) until `done` holds for what arrived.
    pub async fn wait(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} received",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

fn event_types(got: &[Got]) -> Vec<String> {
    got.iter()
        .map(|g| {
            serde_json::from_str::<Value>(&g.body).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Runs the Standard Webhooks reference library over `deliveries` (secret, delivery).
fn verify_with_reference_library(deliveries: &[(String, Got)]) {
    let file = common::TempDir::new("gwtest-webhooks");
    let path = file.path().join("deliveries.json");
    let list: Vec<Value> = deliveries
        .iter()
        .map(|(secret, g)| json!({"secret": secret, "headers": g.headers, "body": g.body}))
        .collect();
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    let out = std::process::Command::new("bash")
        .arg(crate::common::repo_root().join("scripts/webhook-verify.sh"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks refused a delivery: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The delivery log at `log` once no delivery in it is pending.
async fn settled_log(app: &TestApp, log: &str) -> common::Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = app.get(log).await;
        let items = a.body["items"].as_array().unwrap();
        if items.iter().all(|d| d["state"] != "pending") {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still pending: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway with the dispatcher, configured by `tweak` after [`loopback_receivers`].
async fn app_with_dispatcher(tweak: fn(&mut gateway::config::Config)) -> TestApp {
    spawn_with(Options {
        database_port: None,
        parts: gateway::app::Parts {
            webhooks: true,
            ..Options::default().parts
        },
        tweak,
    })
    .await
}

/// Loopback receivers allowed, retries 200 ms apart.
fn loopback_receivers(c: &mut gateway::config::Config) {
    c.webhooks.policy.allow_http = true;
    c.webhooks.policy.allow_private = true;
    c.webhooks.schedule = vec![Duration::from_millis(200); 4];
}

/// A gateway with the dispatcher, short retries, loopback receivers allowed.
async fn app_with_webhooks() -> TestApp {
    app_with_dispatcher(|c| {
        loopback_receivers(c);
        c.webhooks.timeout = Duration::from_millis(1500);
        c.webhooks.disable_after = 6;
        c.webhooks.secret_keys = Some(SealKeys::new([42; 32], None));
    })
    .await
}

async fn register(app: &TestApp, tenant: &str, url: &str, types: Value) -> (String, String) {
    let a = app
        .post(
            &format!("/v1/tenants/{tenant}/webhooks"),
            json!({"url": url, "types": types}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    (
        a.body["id"].as_str().unwrap().to_owned(),
        a.body["secret"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn owners_manage_webhooks_whose_secret_shows_once_and_urls_must_be_public_https() {
    // The default policy: https only, public addresses only.
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let path = format!("/v1/tenants/{tenant}/webhooks");
    for (url, code) in [
        ("http://hooks.example.com/", "invalid_webhook_url"),
        ("ftp://hooks.example.com/", "invalid_webhook_url"),
        ("https://user:pw@hooks.example.com/", "invalid_webhook_url"),
        ("https://127.0.0.1/hook", "webhook_url_forbidden"),
        ("https://localhost/hook", "webhook_url_forbidden"),
        (
            "https://169.254.169.254/latest/meta-data",
            "webhook_url_forbidden",
        ),
        ("https://[::1]/hook", "webhook_url_forbidden"),
        ("https://10.0.0.1/hook", "webhook_url_forbidden"),
        (
            "https://no-such-host.invalid/hook",
            "webhook_url_unresolvable",
        ),
    ] {
        let a = app.post(&path, json!({"url": url})).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, code),
            "{url}"
        );
    }
    let a = app
        .post(
            &path,
            json!({"url": "https://93.184.216.34/hook", "types": ["vm.exploded"]}),
        )
        .await;
    assert_eq!(a.code(), "invalid_event_type");
    let twice = json!(["operation.failed", "operation.failed"]);
    let a = app
        .post(
            &path,
            json!({"url": "https://93.184.216.34/hook", "types": twice}),
        )
        .await;
    assert_eq!(
        (a.code(), a.body["details"]["field"].as_str()),
        ("invalid_event_type", Some("types[1]")),
        "{:?}",
        a.body
    );
    // A public literal address is accepted (nothing is sent to it in this test).
    let a = app
        .post(&path, json!({"url": "https://93.184.216.34/hook", "types": ["operation.succeeded"], "description": "billing"}))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert!(a.body["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(a.body["enabled"], true);
    let one = app.get(&format!("{path}/{id}")).await;
    assert_eq!(one.status, StatusCode::OK);
    assert!(one.body.get("secret").is_none(), "never shown again");
    let listed = app.get(&path).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    assert!(listed.body["items"][0].get("secret").is_none());
    // Changes, rotation, deletion.
    let a = app
        .request(
            reqwest::Method::PATCH,
            &format!("{path}/{id}"),
            Some(&app.admin_key),
            Some(&json!({"description": "ledger", "types": []})),
        )
        .await;
    assert_eq!(
        (a.status, &a.body["description"]),
        (StatusCode::OK, &json!("ledger"))
    );
    let a = app
        .request(
            reqwest::Method::PATCH,
            &format!("{path}/{id}"),
            Some(&app.admin_key),
            Some(&json!({"url": "https://127.0.0.1/x"})),
        )
        .await;
    assert_eq!(
        a.code(),
        "webhook_url_forbidden",
        "a change is checked as a registration"
    );
    let rotated = app
        .post(&format!("{path}/{id}/rotate-secret"), json!({}))
        .await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_ne!(rotated.body["secret"], one.body["secret"]);
    assert!(rotated.body["previous_secret_expires_at"].is_string());
    // Roles: members and readers may not manage webhooks; other tenants see nothing.
    for role in ["member", "reader"] {
        let k = app
            .post(&format!("/v1/tenants/{tenant}/keys"), json!({"role": role}))
            .await
            .body["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let a = app
            .request(reqwest::Method::GET, &path, Some(&k), None)
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{role}");
    }
    let owner = app
        .post(
            &format!("/v1/tenants/{tenant}/keys"),
            json!({"role": "owner"}),
        )
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = app
        .request(reqwest::Method::GET, &path, Some(&owner), None)
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let other = app.tenant().await;
    let a = app.get(&format!("/v1/tenants/{other}/webhooks/{id}")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "another tenant's path");
    let a = app.delete(&format!("{path}/{id}")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = app.get(&format!("{path}/{id}")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = app.get(&format!("{path}/not-a-uuid")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn every_delivery_verifies_with_the_reference_library_and_waits_out_a_receiver_outage() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let mut receiver = Receiver::down();
    let (id, secret) = register(
        &app,
        &tenant,
        &receiver.url(),
        json!(["operation.succeeded", "resource.created"]),
    )
    .await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(&id_of(&op).to_string()).await;
    // The receiver is down: attempts fail and are logged, then it comes back.
    let log = format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = app.get(&log).await;
        let attempts: usize = a.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["attempts"].as_array().unwrap().len())
            .sum();
        if attempts >= 2 {
            let first = &a.body["items"][0]["attempts"][0];
            assert!(
                first["error"].is_string(),
                "a refused connection is logged: {first}"
            );
            assert!(first["latency_ms"].is_number());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempts logged: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.resume().await;
    let got = receiver
        .wait("both events once the receiver is back", |g| {
            let t = event_types(g);
            t.contains(&"operation.succeeded".into()) && t.contains(&"resource.created".into())
        })
        .await;
    for g in &got {
        let e: Value = serde_json::from_str(&g.body).unwrap();
        assert_eq!(
            g.headers["webhook-id"], e["id"],
            "webhook-id is the event's ID"
        );
        assert_eq!(e["tenant"], json!(tenant));
        assert!(e["cursor"].is_string());
    }
    // The log says delivered, with the answer (the receiver records a request before
    // the dispatcher records its outcome: wait for the record).
    let a = settled_log(&app, &log).await;
    for d in a.body["items"].as_array().unwrap() {
        assert_eq!(d["state"], "succeeded", "{d}");
        let last = d["attempts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["status_code"], 200);
        assert_eq!(last["response"], "thanks");
    }
    // A rotation: both secrets sign during the grace period.
    let rotated = app
        .post(
            &format!("/v1/tenants/{tenant}/webhooks/{id}/rotate-secret"),
            json!({}),
        )
        .await;
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();
    let before = receiver.got().len();
    app.create(&tenant, "vms", "web-2", "zone-a", example_spec("vms"))
        .await;
    let got = receiver
        .wait("a delivery after the rotation", |g| g.len() > before)
        .await;
    let last = got.last().unwrap().clone();
    let sigs = last.headers["webhook-signature"].as_str().unwrap();
    assert_eq!(sigs.split(' ').count(), 2, "{sigs}");
    let mut checks: Vec<(String, Got)> = got[..before]
        .iter()
        .map(|g| (secret.clone(), g.clone()))
        .collect();
    checks.push((new_secret, last.clone()));
    checks.push((secret.clone(), last));
    verify_with_reference_library(&checks);
    // A tampered body fails the same check (the check can fail).
    let mut forged = got[0].clone();
    forged.body = forged
        .body
        .replace("succeeded", "failed")
        .replace("created", "deleted");
    let file = common::TempDir::new("gwtest-forged");
    let path = file.path().join("d.json");
    std::fs::write(
        &path,
        serde_json::to_vec(
            &json!([{"secret": secret, "headers": forged.headers, "body": forged.body}]),
        )
        .unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("bash")
        .arg(crate::common::repo_root().join("scripts/webhook-verify.sh"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a forged delivery must not verify");
}

#[tokio::test]
async fn a_failing_endpoint_is_disabled_and_never_slows_a_healthy_one() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let bad = Receiver::start(Mode::Hang).await;
    let good = Receiver::start(Mode::Ok).await;
    let failing = Receiver::start(Mode::Fail).await;
    let (bad_id, _) = register(&app, &tenant, &bad.url(), json!([])).await;
    let (failing_id, _) = register(&app, &tenant, &failing.url(), json!([])).await;
    register(&app, &tenant, &good.url(), json!(["operation.succeeded"])).await;
    let started = std::time::Instant::now();
    app.create_vms(&tenant, 8).await;
    // The healthy endpoint gets its 8 deliveries while the bad one hangs every time.
    good.wait("the healthy endpoint's deliveries", |g| g.len() >= 8)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the healthy endpoint waited behind the hanging one: {:?}",
        started.elapsed()
    );
    // The hanging endpoint fails attempt after attempt until it is disabled.
    let path = format!("/v1/tenants/{tenant}/webhooks/{bad_id}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let disabled = loop {
        let a = app.get(&path).await;
        if a.body["enabled"] == false {
            break a.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not disabled: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(disabled["disabled_reason"], "failing");
    let a = app
        .get(&format!("/v1/tenants/{tenant}/webhooks/{failing_id}"))
        .await;
    assert_eq!(
        a.body["enabled"], false,
        "500s disable an endpoint too: {}",
        a.body
    );
    let log = app
        .get(&format!(
            "/v1/tenants/{tenant}/webhooks/{failing_id}/deliveries"
        ))
        .await;
    let tried = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| !d["attempts"].as_array().unwrap().is_empty())
        .expect("an attempted delivery");
    assert_eq!(tried["attempts"][0]["status_code"], 500);
    assert_eq!(tried["attempts"][0]["response"], "boom");
    assert!(disabled["failure_streak"].as_i64().unwrap() >= 6);
    let log = app.get(&format!("{path}/deliveries")).await;
    let attempt = &log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| !d["attempts"].as_array().unwrap().is_empty())
        .expect("an attempted delivery")["attempts"][0];
    assert!(
        attempt["error"].as_str().unwrap().contains("timed out"),
        "{attempt}"
    );
    let metrics = reqwest::get(format!("{}/metrics", app.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(common::sample(&metrics, "gateway_webhook_endpoints_disabled_total") >= 1.0);
    assert!(
        common::sample(
            &metrics,
            r#"gateway_webhook_attempts_total{outcome="delivered"}"#
        ) >= 8.0
    );
    // Re-enabled, it resumes and clears its streak; its waiting deliveries go out.
    bad.set(Mode::Ok);
    let a = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(&app.admin_key),
            Some(&json!({"enabled": true})),
        )
        .await;
    assert_eq!(
        (a.body["enabled"].clone(), a.body["failure_streak"].clone()),
        (json!(true), json!(0))
    );
    bad.wait("the re-enabled endpoint's deliveries", |g| !g.is_empty())
        .await;
}

#[tokio::test]
async fn redirects_are_not_followed_answers_are_read_bounded_and_a_delivery_can_be_replayed() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let receiver = Receiver::start(Mode::Redirect).await;
    let (id, _) = register(&app, &tenant, &receiver.url(), json!(["resource.created"])).await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    receiver.wait("the first attempt", |g| !g.is_empty()).await;
    let log = format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        let a = app.get(&log).await;
        let d = a.body["items"][0].clone();
        if d["state"] == "failed" {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 5, "the first attempt and four retries");
    assert!(
        attempts.iter().all(|a| a["status_code"] == 302),
        "a redirect is a failure, not followed"
    );
    assert_eq!(
        receiver.got().len(),
        5,
        "nothing went to the redirect's target"
    );
    // A replay of the failed delivery, to an answer too big to keep whole.
    receiver.set(Mode::Big);
    let did = delivery["id"].as_str().unwrap();
    let a = app.post(&format!("{log}/{did}/retry"), json!({})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(a.body["state"], "pending");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = app.get(&format!("{log}/{did}")).await.body;
        if d["state"] == "succeeded" {
            let last = d["attempts"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(
                last["response"].as_str().unwrap().len(),
                1024,
                "the answer is kept bounded"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = receiver.got();
    assert_eq!(
        got.last().unwrap().headers["webhook-id"],
        got[0].headers["webhook-id"],
        "the same event"
    );
    let a = app
        .post(&format!("{log}/{}/retry", uuid::Uuid::new_v4()), json!({}))
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_delivery_leased_by_a_dispatcher_that_died_is_sent_once_the_lease_expires() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let receiver = Receiver::start(Mode::Ok).await;
    // Nothing is sent while "another dispatcher" holds every new delivery's lease.
    sqlx::raw_sql(
        "CREATE FUNCTION held() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.locked_until := now() + interval '2 seconds'; RETURN NEW; END $$;
         CREATE TRIGGER held BEFORE INSERT ON webhook_deliveries FOR EACH ROW EXECUTE FUNCTION held();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    register(&app, &tenant, &receiver.url(), json!(["resource.created"])).await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(receiver.got().is_empty(), "leased elsewhere");
    let got = receiver
        .wait("the delivery after the lease expired", |g| !g.is_empty())
        .await;
    assert_eq!(event_types(&got), ["resource.created"]);
}

#[tokio::test]
async fn a_receiver_whose_certificate_does_not_verify_gets_nothing() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    // An HTTPS receiver with a self-signed certificate (no CA vouches for it).
    let dir = common::TempDir::new("gwtest-tls-receiver");
    let ok = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl makes a certificate");
    let port = common::free_port();
    let mut server = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &port.to_string(),
            "-cert",
            "cert.pem",
            "-key",
            "key.pem",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/hook");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "s_server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (id, _) = register(&app, &tenant, &url, json!(["resource.created"])).await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let log = format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let attempt = loop {
        let a = app.get(&log).await;
        if let Some(first) = a.body["items"][0]["attempts"]
            .as_array()
            .and_then(|a| a.first())
        {
            break first.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        attempt["status_code"].is_null(),
        "no answer was taken: {attempt}"
    );
    let error = attempt["error"].as_str().unwrap().to_lowercase();
    assert!(error.contains("certificate"), "{error}");
}

/// The stored secret and previous secret of endpoint `id`.
async fn stored_secrets(app: &TestApp, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT secret, previous_secret FROM webhooks WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn signing_secrets_are_sealed_in_the_database_and_plain_ones_still_sign() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let receiver = Receiver::start(Mode::Ok).await;
    let (id, secret) = register(&app, &tenant, &receiver.url(), json!(["resource.created"])).await;
    let (stored, previous) = stored_secrets(&app, &id).await;
    assert!(stored.starts_with(SEALED_PREFIX), "{stored}");
    assert!(!stored.contains(&secret["whsec_".len()..]), "{stored}");
    assert_eq!(previous, None);
    let rotated = app
        .post(
            &format!("/v1/tenants/{tenant}/webhooks/{id}/rotate-secret"),
            json!({}),
        )
        .await;
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();
    let (now, previous) = stored_secrets(&app, &id).await;
    assert!(now.starts_with(SEALED_PREFIX) && now != stored, "{now}");
    assert!(!now.contains(&new_secret["whsec_".len()..]), "{now}");
    assert_eq!(previous.as_deref(), Some(stored.as_str()), "kept as stored");
    // A secret stored before a key was configured (in the clear) still signs.
    sqlx::query("UPDATE webhooks SET secret = $2, previous_secret = NULL WHERE id = $1::uuid")
        .bind(&id)
        .bind(&new_secret)
        .execute(&app.pool)
        .await
        .unwrap();
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let got = receiver
        .wait("the delivery signed with the plain secret", |g| {
            !g.is_empty()
        })
        .await;
    let sigs = got[0].headers["webhook-signature"].as_str().unwrap();
    assert_eq!(sigs.split(' ').count(), 1, "{sigs}");
    verify_with_reference_library(&[(new_secret, got[0].clone())]);
}

/// Polls `path` (20 s at most) until `done` holds for its body; returns that body.
async fn poll_until(app: &TestApp, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = app.get(path).await;
        if done(&a.body) {
            return a.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path}: {}", a.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn set_enabled(app: &TestApp, tenant: &str, id: &str, on: bool) {
    let a = app
        .request(
            reqwest::Method::PATCH,
            &format!("/v1/tenants/{tenant}/webhooks/{id}"),
            Some(&app.admin_key),
            Some(&json!({"enabled": on})),
        )
        .await;
    assert_eq!(a.body["enabled"], on, "{}", a.body);
}

#[tokio::test]
async fn events_that_happen_while_an_endpoint_is_disabled_wait_for_it() {
    let app = app_with_webhooks().await;
    let tenant = app.tenant().await;
    let receiver = Receiver::start(Mode::Ok).await;
    let (id, _) = register(&app, &tenant, &receiver.url(), json!(["resource.created"])).await;
    set_enabled(&app, &tenant, &id, false).await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    // The event is fanned out to the paused endpoint, and waits there.
    let log = format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let waiting = poll_until(&app, &log, |b| b["items"].as_array().unwrap().len() == 1).await;
    assert_eq!(waiting["items"][0]["state"], "pending");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.got().is_empty(), "nothing is sent while paused");
    set_enabled(&app, &tenant, &id, true).await;
    let got = receiver
        .wait("the delivery kept while paused", |g| !g.is_empty())
        .await;
    assert_eq!(event_types(&got), ["resource.created"]);
}

/// A gateway whose one dispatcher sends 4 deliveries at once, at most 2 of a tenant's,
/// giving up on an answer after 4 s.
async fn app_with_few_slots() -> TestApp {
    app_with_dispatcher(|c| {
        loopback_receivers(c);
        c.webhooks.timeout = Duration::from_secs(4);
        c.webhooks.concurrency = 4;
        c.webhooks.per_endpoint = 4;
        c.webhooks.per_tenant = 2;
    })
    .await
}

#[tokio::test]
async fn one_tenants_slow_endpoints_never_take_every_slot() {
    let app = app_with_few_slots().await;
    let slow_tenant = app.tenant().await;
    let tenant = app.tenant().await;
    let slow = [
        Receiver::start(Mode::Hang).await,
        Receiver::start(Mode::Hang).await,
    ];
    for r in &slow {
        register(&app, &slow_tenant, &r.url(), json!([])).await;
    }
    app.create_vms(&slow_tenant, 4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while slow.iter().map(|r| r.in_flight().0).sum::<usize>() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow endpoints got nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The slow tenant's deliveries hang, a backlog behind them; another tenant's still
    // go out at once, in a slot the slow tenant may not take.
    let good = Receiver::start(Mode::Ok).await;
    register(&app, &tenant, &good.url(), json!(["resource.created"])).await;
    let started = std::time::Instant::now();
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    good.wait("the other tenant's delivery", |g| !g.is_empty())
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited behind the slow tenant's endpoints: {:?}",
        started.elapsed()
    );
    let busy: usize = slow.iter().map(|r| r.in_flight().1).sum();
    assert!(busy <= 2 + 1, "the slow tenant had {busy} in flight");
}

#[tokio::test]
async fn a_retry_of_a_delivery_being_sent_keeps_the_in_flight_caps() {
    let app = app_with_few_slots().await;
    let tenant = app.tenant().await;
    let receiver = Receiver::start(Mode::Hang).await;
    let (id, _) = register(&app, &tenant, &receiver.url(), json!([])).await;
    app.create_vms(&tenant, 2).await;
    let log = format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while receiver.in_flight().0 < 2 {
        assert!(tokio::time::Instant::now() < deadline, "nothing in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every delivery asked for again while two of them are being sent.
    let items = app.get(&log).await.body["items"]
        .as_array()
        .unwrap()
        .clone();
    assert!(items.len() >= 4, "{items:?}");
    for d in &items {
        let a = app
            .post(
                &format!("{log}/{}/retry", d["id"].as_str().unwrap()),
                json!({}),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.in_flight().1,
        2,
        "a retry sent a delivery beside the attempt under way"
    );
}

/// Deliveries do not pile up for ever: `WEBHOOK_RETENTION_SECONDS` after they ended,
/// or after they were made for a disabled endpoint, they are deleted with their
/// attempts; one an enabled endpoint is still being tried with stays until it ends, and
/// the retention after that.
#[tokio::test]
async fn old_deliveries_are_forgotten_but_not_while_they_are_still_being_tried() {
    let app = app_with_dispatcher(|c| {
        loopback_receivers(c);
        c.webhooks.timeout = Duration::from_millis(1500);
        c.webhooks.retention = Duration::from_secs(2);
    })
    .await;
    let tenant = app.tenant().await;
    let ok = Receiver::start(Mode::Ok).await;
    let hang = Receiver::start(Mode::Hang).await;
    let types = json!(["resource.created"]);
    let (delivered, _) = register(&app, &tenant, &ok.url(), types.clone()).await;
    let (paused, _) = register(&app, &tenant, &ok.url(), types.clone()).await;
    let (trying, _) = register(&app, &tenant, &hang.url(), types).await;
    set_enabled(&app, &tenant, &paused, false).await;
    app.create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let log = |id: &str| format!("/v1/tenants/{tenant}/webhooks/{id}/deliveries");
    let one = |b: &Value| b["items"].as_array().unwrap().len() == 1;
    let sent = poll_until(&app, &log(&delivered), |b| {
        one(b) && b["items"][0]["state"] == "succeeded"
    })
    .await;
    let sent_id: uuid::Uuid = sent["items"][0]["id"].as_str().unwrap().parse().unwrap();
    let attempts = |id: uuid::Uuid| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhook_attempts WHERE delivery_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
    };
    assert_eq!(attempts(sent_id).await.unwrap(), 1);
    poll_until(&app, &log(&paused), one).await;
    poll_until(&app, &log(&trying), one).await;
    // Two seconds on: the delivered one and the one waiting for the disabled endpoint
    // are gone, attempts and all. The one being retried (each attempt hangs until the
    // 1.5 s timeout, five attempts 200 ms apart) is still there.
    let none = |b: &Value| b["items"].as_array().unwrap().is_empty();
    poll_until(&app, &log(&delivered), none).await;
    poll_until(&app, &log(&paused), none).await;
    assert_eq!(attempts(sent_id).await.unwrap(), 0);
    let still = app.get(&log(&trying)).await.body;
    assert!(one(&still), "{still}");
    assert_eq!(still["items"][0]["state"], "pending", "{still}");
    assert!(
        crate::common::metric(&app.url, "gateway_webhook_deliveries_expired_total").await >= 2.0
    );
    // Once its schedule is spent it is kept the retention again, counted from its end
    // (it vanished at once, being older than that since its making), then goes too.
    poll_until(&app, &log(&trying), |b| {
        one(b) && b["items"][0]["state"] == "failed"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = app.get(&log(&trying)).await.body;
    assert!(one(&failed), "gone right after it ended: {failed}");
    poll_until(&app, &log(&trying), none).await;
}

/// A batch of events is fanned out in one statement: each event to every endpoint of
/// its own tenant that wants its type and existed when it happened, once, whatever the
/// other events of the batch (or the same event twice in it).
#[tokio::test]
async fn a_batch_fans_each_event_out_to_its_own_tenants_endpoints_that_want_it() {
    let app = app_with_dispatcher(loopback_receivers).await;
    let (a, b) = (app.tenant().await, app.tenant().await);
    let url = "http://127.0.0.1:9/hook";
    let (all_a, _) = register(&app, &a, url, json!([])).await;
    let (created_a, _) = register(&app, &a, url, json!(["resource.created"])).await;
    let (all_b, _) = register(&app, &b, url, json!([])).await;
    let before = chrono::Utc::now() - chrono::Duration::hours(1);
    let now = chrono::Utc::now() + chrono::Duration::seconds(1);
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    let body = json!({"a": 1});
    let events = [
        (a.as_str(), ids[0], "resource.created", &body, now),
        (a.as_str(), ids[1], "operation.succeeded", &body, now),
        (b.as_str(), ids[2], "resource.created", &body, now),
        // Before any endpoint existed: nobody's.
        (a.as_str(), ids[3], "resource.created", &body, before),
        // The first one again.
        (a.as_str(), ids[0], "resource.created", &body, now),
    ];
    let created = gateway::store::webhooks::fan_out(&app.pool, &events)
        .await
        .unwrap();
    assert_eq!(created, 4);
    let mut got: Vec<(String, uuid::Uuid)> = sqlx::query_as(
        "SELECT webhook_id::text, event_id FROM webhook_deliveries WHERE event_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    got.sort();
    let mut want = vec![
        (all_a.clone(), ids[0]),
        (all_a, ids[1]),
        (created_a, ids[0]),
        (all_b, ids[2]),
    ];
    want.sort();
    assert_eq!(got, want);
    // Fanned out again (a redelivered batch): nothing new.
    let again = gateway::store::webhooks::fan_out(&app.pool, &events)
        .await
        .unwrap();
    assert_eq!(again, 0);
}
