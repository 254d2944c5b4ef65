//! The watch API (issue 10, part 2): `GET /v1/tenants/{t}/events` as server-sent events
//! that resume with `Last-Event-ID` on any replica, and as JSON pages.

use crate::common::{
    self, all_pools, example_spec, fast_sim, id_of, nats_url, pg_base, spawn_app, spawn_with,
    Deployment, Gateway, Options, TestApp,
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// A server-sent-events client of one stream.
pub struct Watch {
    body: reqwest::Response,
    buffer: String,
    pub comments: usize,
}

impl Watch {
    /// Opens `url` (a full events URL) with `key`, resuming after `last` if given.
    pub async fn open(
        url: &str,
        key: &str,
        last: Option<&str>,
    ) -> Result<Self, (StatusCode, Value)> {
        let mut req = reqwest::Client::new()
            .get(url)
            .bearer_auth(key)
            .header("Accept", "text/event-stream");
        if let Some(l) = last {
            req = req.header("Last-Event-ID", l);
        }
        let res = req.send().await.unwrap();
        if res.status() != StatusCode::OK {
            let status = res.status();
            return Err((status, res.json().await.unwrap_or(Value::Null)));
        }
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Ok(Self {
            body: res,
            buffer: String::new(),
            comments: 0,
        })
    }

    /// The next event (comments counted, not returned); `None` when the stream ends or
    /// nothing comes for `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut e = Sse::default();
                let mut data = Vec::new();
                let mut comment = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        e.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    } else if line.starts_with(':') {
                        comment = true;
                    }
                }
                if comment && e.event.is_empty() && data.is_empty() {
                    self.comments += 1;
                    continue;
                }
                e.data = data.join("\n");
                return Some(e);
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.chunk())
                .await
                .ok()?;
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk.ok()??));
        }
    }
}

fn events_url(base: &str, tenant: &str, query: &str) -> String {
    format!("{base}/v1/tenants/{tenant}/events{query}")
}

/// Reads events until `done` says so (or 30 s pass), returning them.
async fn read_until(w: &mut Watch, done: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&out) {
        let left = deadline - tokio::time::Instant::now();
        match w.next(left).await {
            Some(e) => out.push(e),
            None => break,
        }
    }
    out
}

fn succeeded(events: &[Sse]) -> usize {
    events
        .iter()
        .filter(|e| e.event == "operation.succeeded")
        .count()
}

#[tokio::test]
async fn a_watch_starts_with_a_bookmark_and_resumes_after_a_disconnect_without_gap_or_duplicate() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let url = events_url(&app.url, &tenant, "");
    let mut w = Watch::open(&url, &app.admin_key, None).await.unwrap();
    let first = w.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "bookmark");
    let start = first.id.clone().unwrap();
    assert_eq!(first.json()["cursor"], json!(start));
    app.create_vms(&tenant, 6).await;
    // Read a few, drop the connection, resume from the last one seen, as a browser's
    // `EventSource` opened on `?after=<bookmark>` does: the same URL, with
    // `Last-Event-ID`, which wins.
    let mut seen = read_until(&mut w, |e| e.len() >= 10).await;
    drop(w);
    let last = seen.last().unwrap().id.clone().unwrap();
    let reopened = events_url(&app.url, &tenant, &format!("?after={start}"));
    let mut w = Watch::open(&reopened, &app.admin_key, Some(&last))
        .await
        .unwrap();
    let rest = read_until(&mut w, |e| succeeded(e) + succeeded(&seen) >= 6).await;
    assert!(
        rest.iter().all(|e| e.event != "bookmark"),
        "a resumed stream starts with events"
    );
    seen.extend(rest);
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_deref().unwrap()).collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no duplicate");
    let cursors: Vec<u64> = ids.iter().map(|i| i.parse().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "in stream order");
    assert_eq!(
        cursors[0],
        start.parse::<u64>().unwrap() + 1,
        "no gap after the bookmark"
    );
    assert!(
        cursors.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: this tenant wrote every event of the stream"
    );
    let e = seen
        .iter()
        .find(|e| e.event == "operation.succeeded")
        .unwrap()
        .json();
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(
        e["cursor"],
        json!(
            seen.iter()
                .find(|e| e.event == "operation.succeeded")
                .unwrap()
                .id
        )
    );
    // The same as a page, from the beginning.
    let page = app
        .get(&format!("/v1/tenants/{tenant}/events?after=0&limit=500"))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let items = page.body["items"].as_array().unwrap();
    assert!(
        items.len() >= seen.len(),
        "events may have followed the last one read"
    );
    for (item, e) in items.iter().zip(&seen) {
        assert_eq!(
            item["cursor"],
            json!(e.id),
            "the page holds what the stream sent"
        );
        assert_eq!(item, &e.json());
    }
}

#[tokio::test]
async fn pages_follow_the_cursor_and_answer_at_once_when_there_is_nothing_new() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(&id_of(&op).to_string()).await;
    app.wait_outbox_empty().await;
    let mut cursor = "0".to_string();
    let mut all = Vec::new();
    loop {
        let a = app
            .get(&format!(
                "/v1/tenants/{tenant}/events?after={cursor}&limit=3"
            ))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        let items = a.body["items"].as_array().unwrap().clone();
        let next = a.body["next_cursor"].as_str().unwrap().to_owned();
        if items.is_empty() {
            assert_eq!(next, cursor, "nothing new: the cursor stays");
            break;
        }
        assert!(items.len() <= 3);
        all.extend(items);
        cursor = next;
    }
    let types: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"operation.succeeded"), "{types:?}");
    assert!(types.contains(&"resource.created"));
    // Filters narrow a page.
    let a = app
        .get(&format!(
            "/v1/tenants/{tenant}/events?type=operation.succeeded,resource.created"
        ))
        .await;
    let got: Vec<&str> = a.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["resource.created", "operation.succeeded"]);
    // A second resource, in another zone, of another kind.
    let other = app
        .create(
            &tenant,
            "volumes",
            "data",
            "zone-b",
            example_spec("volumes"),
        )
        .await;
    app.wait_done(&id_of(&other).to_string()).await;
    app.wait_outbox_empty().await;
    let items = |query: String| {
        let (app, tenant) = (&app, &tenant);
        async move {
            let a = app
                .get(&format!("/v1/tenants/{tenant}/events?after=0&{query}"))
                .await;
            assert_eq!(a.status, StatusCode::OK, "{query}: {:?}", a.body);
            a.body["items"].as_array().unwrap().clone()
        }
    };
    let vm = op["resource_id"].as_str().unwrap().to_owned();
    let volume = other["resource_id"].as_str().unwrap().to_owned();
    let only = |got: &[Value], field: &str, want: &str, what: &str| {
        assert!(!got.is_empty(), "{what}: some events");
        assert!(
            got.iter().all(|e| e[field] == want),
            "{what}: only {want}: {got:?}"
        );
    };
    for (query, resource) in [
        ("zone=zone-a", &vm),
        ("zone=zone-b", &volume),
        ("kind=vm", &vm),
        ("kind=volume", &volume),
        ("kind=volume&zone=zone-b", &volume),
        (&*format!("resource={vm}"), &vm),
        (&*format!("resource={volume}"), &volume),
    ] {
        only(
            &items(query.to_owned()).await,
            "resourceid",
            resource,
            query,
        );
    }
    assert_eq!(items("kind=volume&zone=zone-a".into()).await.len(), 0);
    assert_eq!(items("kind=cluster".into()).await.len(), 0);
    assert_eq!(items(format!("resource={}", Uuid::new_v4())).await.len(), 0);
    let op_id = id_of(&other).to_string();
    let by_op = items(format!("operation={op_id}")).await;
    only(&by_op, "operationid", &op_id, "operation");
    assert!(by_op.iter().any(|e| e["type"] == "operation.succeeded"));
    let by_type = items("type=resource.created".into()).await;
    only(&by_type, "type", "resource.created", "type");
    assert_eq!(by_type.len(), 2, "one per resource");
    // An empty page's cursor moves past other tenants' events, so a quiet tenant's
    // poller does not fall behind the retention.
    let end = app
        .get(&format!("/v1/tenants/{tenant}/events?after=0&limit=500"))
        .await;
    let end = end.body["next_cursor"].as_str().unwrap().to_owned();
    let busy = app.tenant().await;
    let b = app
        .create(&busy, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(&id_of(&b).to_string()).await;
    app.wait_outbox_empty().await;
    let busy_end = app.get(&format!("/v1/tenants/{busy}/events?after=0")).await;
    let busy_end: u64 = busy_end.body["next_cursor"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let quiet = app
        .get(&format!("/v1/tenants/{tenant}/events?after={end}"))
        .await;
    assert_eq!(quiet.body["items"], json!([]));
    let moved: u64 = quiet.body["next_cursor"].as_str().unwrap().parse().unwrap();
    assert!(
        moved >= busy_end,
        "{moved} is past the other tenant's {busy_end}"
    );
}

#[tokio::test]
async fn bad_filters_and_cursors_get_clear_errors() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    for (query, code) in [
        ("?type=vm.exploded", "invalid_query"),
        ("?kind=toaster", "invalid_query"),
        ("?zone=Zone_A", "invalid_query"),
        ("?resource=nope", "invalid_query"),
        ("?after=-1", "invalid_cursor"),
        ("?after=abc", "invalid_cursor"),
        // Digits only, as the contract's pattern says (`u64` parsing takes a `+`).
        ("?after=%2B100", "invalid_cursor"),
        ("?after=%20100", "invalid_cursor"),
        ("?after=", "invalid_cursor"),
        ("?limit=0", "invalid_query"),
        ("?bogus=1", "invalid_query"),
    ] {
        let a = app
            .get(&format!("/v1/tenants/{tenant}/events{query}"))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}: {:?}", a.body);
        assert_eq!(a.code(), code, "{query}");
    }
    // Past the newest event, up to the 19 digits the contract allows (schemathesis
    // found 9683705309596815639, past i64, answered 400).
    for after in [
        "999999",
        "9223372036854775807",
        "9683705309596815639",
        "9999999999999999999",
    ] {
        let a = app
            .get(&format!("/v1/tenants/{tenant}/events?after={after}"))
            .await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor"),
            "a well-formed cursor past the newest event: {after}"
        );
        // The message quotes the cursor as given (it quoted 9223372036854775807 for
        // every larger one).
        let message = a.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(after), "{after}: {message}");
    }
    let a = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/tenants/{tenant}/events?after=0"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    // `Last-Event-ID` wins over `after`, but a malformed `after` is refused all the same.
    let res = reqwest::Client::new()
        .get(events_url(&app.url, &tenant, "?after=abc"))
        .bearer_auth(&app.admin_key)
        .header("Last-Event-ID", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = reqwest::Client::new()
        .get(events_url(&app.url, &tenant, ""))
        .bearer_auth(&app.admin_key)
        .header("Last-Event-ID", "+0")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::BAD_REQUEST,
        "a signed Last-Event-ID"
    );
    // An empty one says nothing: `after` stands.
    let res = reqwest::Client::new()
        .get(events_url(&app.url, &tenant, "?after=0"))
        .bearer_auth(&app.admin_key)
        .header("Last-Event-ID", "")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "an empty Last-Event-ID");
    let a = app.get("/v1/tenants/no-such-tenant/events").await;
    assert_eq!(a.code(), "tenant_not_found");
}

/// A key of `role` made in `tenant` (for `worker`: a vm/zone-a worker key).
async fn key(app: &TestApp, tenant: &str, role: &str) -> String {
    let mut body = json!({"name": format!("k-{}", common::unique()), "role": role});
    if role == "worker" {
        body["service"] = json!("vm");
        body["zone"] = json!("zone-a");
    }
    let a = app.post(&format!("/v1/tenants/{tenant}/keys"), body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    a.body["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn watchers_see_only_their_tenants_events_workers_none_and_each_key_a_bounded_number_of_streams(
) {
    let app = spawn_with(Options {
        tweak: |c| c.events.streams_per_key = 2,
        ..Default::default()
    })
    .await;
    // `acme…` and `acme…2`: one tenant's name is a prefix of the other's.
    let a = format!("acme{}", common::unique());
    let b = format!("{a}2");
    for t in [&a, &b] {
        assert!(app
            .post("/v1/tenants", json!({"id": t}))
            .await
            .status
            .is_success());
    }
    let reader = key(&app, &a, "reader").await;
    let other = key(&app, &b, "reader").await;
    let mut wa = Watch::open(&events_url(&app.url, &a, ""), &reader, None)
        .await
        .unwrap();
    let mut wb = Watch::open(&events_url(&app.url, &b, ""), &other, None)
        .await
        .unwrap();
    // A reader of one tenant cannot watch another (it does not exist for them).
    let err = Watch::open(&events_url(&app.url, &b, ""), &reader, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.0, StatusCode::NOT_FOUND);
    let worker = key(&app, &a, "worker").await;
    let err = Watch::open(&events_url(&app.url, &a, ""), &worker, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.0, StatusCode::FORBIDDEN);
    // The cap: two streams per key on this gateway; a third is refused until one closes.
    let second = Watch::open(&events_url(&app.url, &a, ""), &reader, None)
        .await
        .unwrap();
    let err = Watch::open(&events_url(&app.url, &a, ""), &reader, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err.1["code"], "too_many_streams");
    drop(second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let third = loop {
        match Watch::open(&events_url(&app.url, &a, ""), &reader, None).await {
            Ok(w) => break w,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the slot was not freed: {e:?}"),
        }
    };
    drop(third);
    app.create(&a, "vms", "in-a", "zone-a", example_spec("vms"))
        .await;
    app.create(&b, "vms", "in-b", "zone-a", example_spec("vms"))
        .await;
    for (w, tenant) in [(&mut wa, &a), (&mut wb, &b)] {
        let got = read_until(w, |e| succeeded(e) >= 1).await;
        assert_eq!(succeeded(&got), 1);
        for e in got.iter().filter(|e| e.event != "bookmark") {
            assert_eq!(
                e.json()["tenant"],
                json!(tenant),
                "only its own tenant's events"
            );
        }
    }
    // Closed streams leave the gauge once the server notices their connection closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = reqwest::get(format!("{}/metrics", app.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let open = common::sample(&text, "gateway_watch_streams");
        if open == 2.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} open streams, not wa and wb"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        common::sample(
            &metrics,
            r#"gateway_watch_refused_total{reason="too_many_streams"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_quiet_watch_gets_keep_alives_and_bookmarks_that_move_past_other_tenants_events() {
    let app = spawn_with(Options {
        tweak: |c| {
            c.events.keepalive = Duration::from_millis(200);
            c.events.bookmark_interval = Duration::from_millis(700);
        },
        ..Default::default()
    })
    .await;
    let quiet = app.tenant().await;
    let busy = app.tenant().await;
    let mut w = Watch::open(&events_url(&app.url, &quiet, ""), &app.admin_key, None)
        .await
        .unwrap();
    let start: u64 = w
        .next(Duration::from_secs(5))
        .await
        .unwrap()
        .id
        .unwrap()
        .parse()
        .unwrap();
    let op = app
        .create(&busy, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    app.wait_done(&id_of(&op).to_string()).await;
    app.wait_outbox_empty().await;
    let busy_page = app.get(&format!("/v1/tenants/{busy}/events?after=0")).await;
    let busy_last: u64 = busy_page.body["next_cursor"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(busy_last > start);
    // Bookmarks follow until one is past the busy tenant's events.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = w.next(Duration::from_secs(5)).await.expect("a bookmark");
        assert_eq!(e.event, "bookmark", "the quiet tenant has no events: {e:?}");
        let c: u64 = e.id.unwrap().parse().unwrap();
        if c >= busy_last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bookmarks stuck at {c}"
        );
    }
    assert!(w.comments > 0, "keep-alive comments while quiet");
}

#[tokio::test]
async fn a_resume_point_older_than_the_retention_is_refused_with_events_expired() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    for i in 0..3 {
        let op = app
            .create(
                &tenant,
                "vms",
                &format!("vm-{i}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        app.wait_done(&id_of(&op).to_string()).await;
    }
    app.wait_outbox_empty().await;
    // Retention drops the oldest events (as age or size limits would).
    let js = app.running.as_ref().unwrap().backends.js.clone();
    let mut stream = js
        .get_stream(app.config.nats.events_stream())
        .await
        .unwrap();
    stream.purge().sequence(10).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.first_sequence, 10);
    let a = app
        .get(&format!("/v1/tenants/{tenant}/events?after=2"))
        .await;
    assert_eq!(a.status, StatusCode::GONE);
    assert_eq!(a.code(), "events_expired");
    let mut w = Watch::open(
        &events_url(&app.url, &tenant, ""),
        &app.admin_key,
        Some("2"),
    )
    .await
    .unwrap();
    let e = w.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.event, "error");
    assert_eq!(e.json()["code"], "events_expired");
    assert!(
        w.next(Duration::from_secs(2)).await.is_none(),
        "then the stream ends"
    );
    // From the first kept event on, resuming works.
    let a = app
        .get(&format!("/v1/tenants/{tenant}/events?after=9"))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["items"][0]["cursor"], "10");
}

/// Per-resource order: each operation's transitions in lifecycle order, generations
/// never going back.
fn assert_in_order(events: &[Value]) {
    let rank = |t: &str| {
        [
            "operation.created",
            "operation.pending",
            "operation.dispatched",
            "operation.running",
            "operation.succeeded",
        ]
        .iter()
        .position(|x| *x == t)
    };
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut generation: HashMap<String, i64> = HashMap::new();
    for e in events {
        let t = e["type"].as_str().unwrap();
        if let Some(r) = rank(t) {
            let op = e["operationid"].as_str().unwrap().to_owned();
            let prev = last.insert(op, r);
            assert!(prev.is_none_or(|p| p < r), "{t} after rank {prev:?}: {e}");
        } else {
            let g = e["data"]["generation"].as_i64().unwrap();
            let prev = generation.insert(e["resourceid"].as_str().unwrap().to_owned(), g);
            assert!(prev.is_none_or(|p| p <= g), "generation went back: {e}");
        }
    }
}

/// Reads `w` into `into` until `done`, or `limit` events more, whichever is first.
async fn collect(
    w: &mut Watch,
    into: &mut Vec<Value>,
    limit: usize,
    done: &dyn Fn(&[Value]) -> bool,
) {
    let mut n = 0;
    while n < limit && !done(into) {
        let e = w
            .next(Duration::from_secs(30))
            .await
            .expect("the stream goes on");
        if e.event == "bookmark" {
            continue;
        }
        assert_ne!(e.event, "error", "{e:?}");
        into.push(e.json());
        n += 1;
    }
}

#[tokio::test]
async fn a_watcher_sees_every_event_of_500_operations_once_and_in_order_across_a_disconnect_and_a_gateway_kill(
) {
    let _heavy = common::heavy().await;
    let unlimited = [
        ("GATEWAY_RATE_LIMIT_PER_SECOND", "1000000"),
        ("GATEWAY_RATE_LIMIT_BURST", "1000000"),
    ];
    let d = Deployment::new(&pg_base(), &nats_url(), &unlimited).await;
    let mut a = Gateway::serve(&d.env).await;
    let b = Gateway::serve(&d.env).await;
    let _relay = Gateway::relay(&d.env);
    let urls = [a.url(), b.url()];
    // Clients submit and workers report through B, which lives: the kill of A, the
    // gateway the watcher is on, must not stall the operations the watcher waits for.
    let _workers = d
        .workers(
            &urls[1..],
            workers::SimDriver::new(fast_sim()),
            &all_pools(),
            1,
            5,
        )
        .await;
    let tenant = d.tenant(&urls[1]).await;
    let key = d.env.admin_key.clone();
    let mut w = Watch::open(&events_url(&urls[0], &tenant, ""), &key, None)
        .await
        .unwrap();
    let bookmark = w.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(bookmark.event, "bookmark");
    const OPS: usize = 500;
    let submit = {
        let d = &d;
        let (url, tenant) = (urls[1].clone(), tenant.clone());
        async move {
            futures::stream::iter(0..OPS)
                .for_each_concurrent(16, |i| {
                    let (url, tenant) = (url.clone(), tenant.clone());
                    async move {
                        d.create(
                            &url,
                            &tenant,
                            "vms",
                            &format!("vm-{i}"),
                            if i % 2 == 0 { "zone-a" } else { "zone-b" },
                        )
                        .await;
                    }
                })
                .await;
        }
    };
    let all_done = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["type"] == "operation.succeeded")
            .count()
            >= OPS
    };
    let mut events: Vec<Value> = Vec::new();
    let watch = async {
        // 1. A third of the events on gateway A, then a disconnect; resume on A.
        collect(&mut w, &mut events, 1000, &all_done).await;
        drop(w);
        let last = events.last().unwrap()["cursor"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut w = Watch::open(&events_url(&urls[0], &tenant, ""), &key, Some(&last))
            .await
            .unwrap();
        collect(&mut w, &mut events, 1000, &all_done).await;
        w
    };
    let (_, w) = tokio::join!(submit, watch);
    // 2. Gateway A is killed under the watcher; it resumes on gateway B.
    a.kill();
    let mut w = w;
    while w.next(Duration::from_secs(2)).await.is_some() {}
    let last = events.last().unwrap()["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut w = Watch::open(&events_url(&urls[1], &tenant, ""), &key, Some(&last))
        .await
        .unwrap();
    collect(&mut w, &mut events, usize::MAX, &all_done).await;
    // Every event of every operation, once, in per-resource order.
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "no event twice");
    assert_in_order(&events);
    let ops: HashSet<&str> = events
        .iter()
        .filter(|e| e["type"] == "operation.succeeded")
        .map(|e| e["operationid"].as_str().unwrap())
        .collect();
    assert_eq!(ops.len(), OPS);
    let expected: i64 = d
        .scalar("SELECT count(*) FROM operations WHERE state = 'succeeded'")
        .await;
    assert_eq!(expected, OPS as i64);
    // Each operation's five transitions are all there.
    let per_op = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("operation."))
        .count();
    assert_eq!(
        per_op,
        OPS * 5,
        "created, pending, dispatched, running, succeeded each"
    );
    let created = events
        .iter()
        .filter(|e| e["type"] == "resource.created")
        .count();
    assert_eq!(created, OPS);
}

#[tokio::test]
async fn a_lost_events_stream_is_a_503_at_once() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let js = app.running.as_ref().unwrap().backends.js.clone();
    js.delete_stream(app.config.nats.events_stream())
        .await
        .unwrap();
    let page = tokio::time::timeout(
        Duration::from_secs(10),
        app.get(&format!("/v1/tenants/{tenant}/events?after=0")),
    )
    .await
    .expect("a prompt answer");
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(page.code(), "events_unavailable");
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        Watch::open(&events_url(&app.url, &tenant, ""), &app.admin_key, None),
    )
    .await
    .expect("a prompt answer");
    let (status, body) = refused.err().expect("refused");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "events_unavailable");
}

#[tokio::test]
async fn open_streams_end_when_the_gateway_drains() {
    let mut app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut w = Watch::open(&events_url(&app.url, &tenant, ""), &app.admin_key, None)
        .await
        .unwrap();
    assert_eq!(
        w.next(Duration::from_secs(5)).await.unwrap().event,
        "bookmark"
    );
    let started = std::time::Instant::now();
    let stop = tokio::spawn(app.running.take().unwrap().stop());
    // Idle: nothing but its end comes (bookmarks are 30 s apart by default).
    assert!(w.next(Duration::from_secs(9)).await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stream ends with the drain, not at the client's timeout"
    );
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("the gateway stops with a watch open")
        .unwrap();
}

#[tokio::test]
async fn events_the_filters_drop_do_not_put_off_the_bookmark() {
    let app = std::sync::Arc::new(
        spawn_with(Options {
            tweak: |c| c.events.bookmark_interval = Duration::from_millis(1500),
            ..Default::default()
        })
        .await,
    );
    let tenant = app.tenant().await;
    let mut w = Watch::open(
        &events_url(&app.url, &tenant, "?type=resource.deleted"),
        &app.admin_key,
        None,
    )
    .await
    .unwrap();
    let first = w.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.event, "bookmark");
    // The tenant stays busy with events this client does not want.
    let stop = tokio_util::sync::CancellationToken::new();
    let busy = {
        let (app, tenant, stop) = (app.clone(), tenant.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let op = app
                    .create(
                        &tenant,
                        "vms",
                        &format!("vm-{n}"),
                        "zone-a",
                        example_spec("vms"),
                    )
                    .await;
                app.wait_done(&id_of(&op).to_string()).await;
                n += 1;
            }
            n
        })
    };
    let opened = std::time::Instant::now();
    let e = w.next(Duration::from_secs(6)).await.expect("a bookmark");
    let waited = opened.elapsed();
    stop.cancel();
    let made = busy.await.unwrap();
    assert_eq!(e.event, "bookmark", "{e:?}");
    assert!(made > 1, "the tenant was busy ({made} operations)");
    assert!(
        waited < Duration::from_secs(4),
        "a bookmark after the quiet spell although other events flowed: {waited:?}"
    );
    let c: u64 = e.id.unwrap().parse().unwrap();
    assert!(c >= first.id.unwrap().parse::<u64>().unwrap());
}

/// A key made in `tenant` with `body`'s role (and expiry): its ID and secret.
async fn key_with(app: &TestApp, tenant: &str, body: Value) -> (String, String) {
    let a = app.post(&format!("/v1/tenants/{tenant}/keys"), body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    (
        a.body["id"].as_str().unwrap().to_owned(),
        a.body["key"].as_str().unwrap().to_owned(),
    )
}

/// Reads `w` until it ends (or `within` passes), returning what it sent.
async fn read_to_end(w: &mut Watch, within: Duration) -> Vec<Sse> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(e) = w.next(deadline - tokio::time::Instant::now()).await {
        seen.push(e);
    }
    seen
}

/// A watch stream open when its key is revoked, or expires, sends nothing more: it
/// ends with an `error` event (`unauthenticated`) before the next event it would have
/// sent (an outside probe kept receiving a tenant's events 45 s after revoking the key,
/// and after it expired).
#[tokio::test]
async fn a_watch_ends_when_its_key_is_revoked_or_expires() {
    let app = spawn_app().await;
    let tenant = app.tenant().await;
    let url = events_url(&app.url, &tenant, "");
    let name = || format!("k-{}", common::unique());
    let (revoked_id, revoked) =
        key_with(&app, &tenant, json!({"name": name(), "role": "reader"})).await;
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (_, expiring) = key_with(
        &app,
        &tenant,
        json!({"name": name(), "role": "reader", "expires_at": expires_at}),
    )
    .await;
    let mut watches = Vec::new();
    for key in [&revoked, &expiring] {
        let mut w = Watch::open(&url, key, None).await.unwrap();
        assert_eq!(
            w.next(Duration::from_secs(5)).await.unwrap().event,
            "bookmark"
        );
        watches.push(w);
    }
    let a = app
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/{tenant}/keys/{revoked_id}"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    app.create_vms(&tenant, 2).await;
    for w in &mut watches {
        let seen = read_to_end(w, Duration::from_secs(20)).await;
        let kinds: Vec<&str> = seen.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(kinds, ["error"], "nothing but the end: {seen:?}");
        assert_eq!(seen[0].json()["code"], "unauthenticated");
    }
    // The admin's stream, opened now, gets the events all the same.
    let mut w = Watch::open(
        &events_url(&app.url, &tenant, "?after=0"),
        &app.admin_key,
        None,
    )
    .await
    .unwrap();
    let e = w.next(Duration::from_secs(10)).await.unwrap();
    assert_ne!(e.event, "error", "{e:?}");
}

/// A long-poll whose key is revoked while it waits is answered `401`, not with the
/// operation.
#[tokio::test]
async fn a_long_poll_whose_key_is_revoked_while_it_waits_gets_401() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let (id, key) = key_with(
        &app,
        &tenant,
        json!({"name": format!("k-{}", common::unique()), "role": "reader"}),
    )
    .await;
    // No relay: the create stays `pending`.
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let path = format!("/v1/operations/{}?wait=3s", op["id"].as_str().unwrap());
    let poll = app.request(reqwest::Method::GET, &path, Some(&key), None);
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.request(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/{tenant}/keys/{id}"),
            Some(&app.admin_key),
            None,
        )
        .await
    };
    let (polled, revoked) = tokio::join!(poll, revoke);
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(
        (polled.status, polled.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated"),
        "{:?}",
        polled.body
    );
}
