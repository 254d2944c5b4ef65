//! A worker's `/readyz` fails once the gateway refuses its key (issue 11 §6): a revoked
//! or expired worker key takes the pool out of service instead of failing every report.

use crate::common::{nats_url, spawn_with, Options};
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_workers_readyz_fails_once_its_key_is_revoked() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let made = app
        .post(
            &format!("/v1/tenants/{tenant}/keys"),
            json!({"role": "worker", "service": "vm", "zone": "zone-a"}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let key = made.body["key"].as_str().unwrap().to_owned();
    let id = made.body["id"].as_str().unwrap().to_owned();

    let nats = async_nats::connect(nats_url()).await.unwrap();
    let state = workers::http::HttpState::new(
        Arc::new(prometheus_client::registry::Registry::default()),
        nats,
        &app.url,
        &key,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(workers::http::serve(listener, state, stop.clone()));

    let ready = reqwest::get(&url).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let revoked = app.delete(&format!("/v1/keys/{id}")).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{:?}", revoked.body);
    let ready = reqwest::get(&url).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["gateway"].as_str().unwrap().contains("refuses this worker's key"),
        "{body}"
    );
    assert_eq!(body["nats"], "ok");
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
}
