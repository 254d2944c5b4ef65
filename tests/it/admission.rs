//! Admission control (issue 12): each class of request has a bound on what it has in
//! flight, and beyond it the answer is `503 overloaded` at once; a flood of one class
//! leaves the others alone. Connections are bounded too.

use crate::common::{self, example_spec, id_of, spawn_with, Options};
use futures::StreamExt;
use reqwest::StatusCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_class_at_its_limit_is_refused_at_once_while_the_others_go_on() {
    let app = spawn_with(Options {
        tweak: |c| {
            c.admission.polls = 1;
            c.max_connections = 64;
        },
        ..Options::api_only()
    })
    .await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = id_of(&op);
    // A long-poll holds the only poll slot (nothing runs the operation: it waits).
    let url = format!("{}/v1/operations/{id}?wait=30s", app.url);
    let key = app.admin_key.clone();
    // (It may meet the slot taken by one of the checks below: then it tries again.)
    let held = tokio::spawn(async move {
        loop {
            let res = reqwest::Client::new()
                .get(&url)
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            if res.status() != StatusCode::SERVICE_UNAVAILABLE {
                return res.status();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let a = app.get(&format!("/v1/operations/{id}")).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            break a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the long-poll never held its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.code(), "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // Reads and writes have slots of their own.
    assert_eq!(
        app.get(&format!("/v1/tenants/{tenant}/vms")).await.status,
        StatusCode::OK
    );
    let more = app
        .post(
            &format!("/v1/tenants/{tenant}/vms"),
            serde_json::json!({"name": "web-2", "zone": "zone-a", "spec": example_spec("vms")}),
        )
        .await;
    assert_eq!(more.status, StatusCode::ACCEPTED);
    assert_eq!(
        app.get("/healthz").await.status,
        StatusCode::OK,
        "probes are never refused"
    );
    // The slot comes back when the long-poll goes.
    held.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.get(&format!("/v1/operations/{id}")).await.status != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = reqwest::get(format!("{}/metrics", app.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(common::sample(&metrics, r#"gateway_overloaded_total{class="poll"}"#) >= 1.0);
}

/// Writes that take longer than `GATEWAY_WRITE_LATENCY_TARGET_MS` lower the write
/// limit, a fifth at a time, down to the floor (4) and no further; writes within it are
/// still admitted. (The target here, a microsecond, no write meets; the rules themselves
/// and the refusals beyond a lowered limit are the unit tests' in `api::admission`.)
#[tokio::test]
async fn writes_slower_than_the_latency_target_lower_the_write_limit_to_its_floor() {
    let app = spawn_with(Options {
        tweak: |c| {
            c.admission.writes = 8;
            c.admission.write_latency_target = Some(Duration::from_micros(1));
        },
        ..Options::api_only()
    })
    .await;
    let limit = || common::metric(&app.url, "gateway_admission_write_limit");
    assert_eq!(limit().await, 8.0);
    let tenant = app.tenant().await;
    // Four at a time: never more than the floor, so none is refused.
    let created = futures::stream::iter(0..160)
        .map(|i| {
            let (app, tenant) = (&app, &tenant);
            async move {
                app.create(
                    tenant,
                    "vms",
                    &format!("vm-{i}"),
                    "zone-a",
                    example_spec("vms"),
                )
                .await
            }
        })
        .buffer_unordered(4)
        .count()
        .await;
    assert_eq!(created, 160, "every write within the floor was admitted");
    // 161 writes, five windows of 32: 8 → 6 → 4, then it stays.
    assert_eq!(limit().await, 4.0);
    assert_eq!(
        common::sample(
            &reqwest::get(format!("{}/metrics", app.url))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            r#"gateway_overloaded_total{class="write"}"#
        ),
        0.0
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_answered_overloaded_and_closed() {
    let app = spawn_with(Options {
        tweak: |c| c.max_connections = 2,
        ..Options::api_only()
    })
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let _a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Both are accepted (and held, idle); the third is refused without being read.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok();
        let mut text = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut text)).await;
        if text.starts_with("HTTP/1.1 503") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(answer.contains("retry-after: 1"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["code"], "overloaded");
    // A freed slot admits again.
    drop(_a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = reqwest::Client::new()
            .get(format!("{}/healthz", app.url))
            .send()
            .await;
        if res.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Open connections cost the gateway little memory. Each one used to get its own copy
/// of the whole router (`Router::layer` to add the peer's address), about 250 KB per
/// connection: 1,000 idle clients held 260 MB. A real `gateway serve`, measured from
/// outside.
#[tokio::test]
async fn open_connections_cost_the_gateway_little_memory() {
    use crate::common::{Deployment, Gateway};
    let _heavy = common::heavy().await;
    let d = Deployment::new(&common::pg_base(), &common::nats_url(), &[]).await;
    let api = Gateway::serve(&d.env).await;
    let port = api.port.unwrap();
    let connect = || async move {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        c
    };
    // Warm up what every connection shares (runtime, buffers, the router itself).
    let warm: Vec<_> = futures::future::join_all((0..20).map(|_| connect())).await;
    let before = api.rss_kib();
    let held: Vec<_> = futures::future::join_all((0..500).map(|_| connect())).await;
    let grown = api.rss_kib().saturating_sub(before);
    assert!(
        grown < 40 * 1024,
        "500 open connections grew the gateway by {grown} KiB"
    );
    drop((warm, held));
}
