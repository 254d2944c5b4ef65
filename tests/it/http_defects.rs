//! Defects an outside probe found at the HTTP door (issue 11, sections 2 and 4), each
//! tested as a class against real PostgreSQL and NATS.

use crate::common;
use crate::common::{example_spec, spawn_with, Options, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// Hex of a cursor's plain text, as the API encodes cursors.
fn cursor(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Hostile query values, each with the code it must get (`None`: a normal `200`).
/// Every value is sent to every list route that has the parameter.
fn hostile_values() -> Vec<(&'static str, String, Option<&'static str>)> {
    let id = uuid::Uuid::nil();
    let mut v: Vec<(&'static str, String, Option<&'static str>)> = Vec::new();
    for since in [
        "-262143-01-01T00:00:00Z",
        "%2B262142-12-31T23:59:59Z",
        "-4714-11-23T00:00:00Z",
        "-0001-01-01T00:00:00Z",
        "%2B10000-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999-23:59",
        "2026-13-01T00:00:00Z",
        "yesterday",
        "",
    ] {
        v.push(("since", since.into(), Some("invalid_query")));
    }
    for since in [
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "1970-01-01T00:00:00%2B14:00",
    ] {
        v.push(("since", since.into(), None));
    }
    for limit in [
        "0",
        "-1",
        "501",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "1e3",
        "",
    ] {
        v.push(("limit", limit.into(), Some("invalid_query")));
    }
    v.push(("limit", "500".into(), None));
    for c in [
        cursor(&format!("t:-9223372036854775808:{id}")),
        cursor(&format!("t:9223372036854775807:{id}")),
        // 5000 BC and 300000 AD: chrono has them, PostgreSQL does not.
        cursor(&format!("t:-219976934400000000:{id}")),
        cursor(&format!("t:9466848000000000000:{id}")),
        // One microsecond before 0000-01-01.
        cursor(&format!("t:-62167219200000001:{id}")),
        cursor(&format!("t:0:{id}x")),
        cursor("t:0"),
        cursor("s:9223372036854775808"),
        cursor("s:"),
        cursor("s:1\u{0}"),
        cursor("t:\u{0}:\u{0}"),
        "zz".into(),
        "abc".into(),
        "%00".into(),
        "ff".repeat(3000),
    ] {
        v.push(("cursor", c, Some("invalid_cursor")));
    }
    for zone in [
        "%00",
        "zone-a%00",
        "Zone-A",
        "%FF",
        "a b",
        &"z".repeat(64),
        "",
    ] {
        v.push(("zone", zone.into(), Some("invalid_query")));
    }
    v.push(("zone", "zone-a".into(), None));
    v.push(("zone", "no-such-zone".into(), None));
    for id in [
        "%00",
        "not-a-uuid",
        "00000000-0000-0000-0000-00000000000g",
        "",
    ] {
        v.push(("resource_id", id.into(), Some("invalid_query")));
        v.push(("principal_id", id.into(), Some("invalid_query")));
    }
    for label in [
        "%00=x",
        "env=%00",
        "env",
        "=x",
        ",",
        "",
        "Env=prod",
        "env=has%20space",
        "env=a,env=b",
        &format!("k={}", "v".repeat(64)),
        &(0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(","),
    ] {
        v.push(("label", label.into(), Some("invalid_query")));
    }
    v.push(("label", "env=prod,team=db".into(), None));
    v.push(("label", "env=".into(), None));
    for bogus in ["%00", "bogus", ""] {
        v.push(("phase", bogus.into(), Some("invalid_query")));
        v.push(("state", bogus.into(), Some("invalid_query")));
        v.push(("kind", bogus.into(), Some("invalid_query")));
        v.push(("outcome", bogus.into(), Some("invalid_query")));
    }
    v.push(("outcome", "denied".into(), None));
    for tenant in ["%00", "Acme", "a%2Fb", &"t".repeat(64), ""] {
        v.push(("tenant", tenant.into(), Some("invalid_query")));
    }
    v.push(("tenant", "no-such-tenant".into(), None));
    v.push(("unknown", "x".into(), Some("invalid_query")));
    v
}

/// The list routes and the query parameters each takes.
fn list_routes(tenant: &str) -> Vec<(String, &'static [&'static str])> {
    let mut routes: Vec<(String, &'static [&'static str])> = common::KINDS
        .iter()
        .map(|kind| {
            let params: &'static [&'static str] = &[
                "since", "limit", "cursor", "zone", "unknown", "label", "phase",
            ];
            (format!("/v1/tenants/{tenant}/{kind}"), params)
        })
        .collect();
    routes.push((
        format!("/v1/tenants/{tenant}/operations"),
        &[
            "since",
            "limit",
            "cursor",
            "zone",
            "unknown",
            "resource_id",
            "state",
            "kind",
        ],
    ));
    routes.push((
        "/v1/audit".into(),
        &[
            "since",
            "limit",
            "cursor",
            "unknown",
            "principal_id",
            "outcome",
            "tenant",
        ],
    ));
    routes
}

async fn seed(app: &TestApp, tenant: &str) {
    for kind in common::KINDS {
        app.create(tenant, kind, "seed", "zone-a", example_spec(kind))
            .await;
    }
}

/// Issue 11 §2: no query value, however hostile, makes a list answer `5xx`; values out
/// of range answer `400 invalid_query` or `400 invalid_cursor`, and sane ones `200`.
#[tokio::test]
async fn hostile_query_values_answer_400_on_every_list_route_never_5xx() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    seed(&app, &tenant).await;
    let values = hostile_values();
    let mut failures = Vec::new();
    for (path, params) in list_routes(&tenant) {
        for (param, value, expected) in &values {
            if !params.contains(param) {
                continue;
            }
            let url = format!("{path}?{param}={value}");
            let a = app.get(&url).await;
            let ok = match expected {
                None => a.status == StatusCode::OK,
                Some(code) => a.status == StatusCode::BAD_REQUEST && a.code() == *code,
            };
            if !ok {
                failures.push(format!(
                    "{url}: expected {}, got {} {}",
                    expected.unwrap_or("200"),
                    a.status,
                    a.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The long-poll's `wait` is a query value too.
    let op = app
        .create(&tenant, "vms", "waited", "zone-a", example_spec("vms"))
        .await;
    for wait in [
        "99999999999999999999",
        "18446744073709551615m",
        "-1",
        "%00",
        "",
    ] {
        let a = app
            .get(&format!(
                "/v1/operations/{}?wait={wait}",
                op["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "wait={wait}: {:?}",
            a.body
        );
    }
}

/// Issue 11 §2: a tenant path segment that cannot be a tenant ID (it decodes to
/// something that is not a DNS label) is a tenant that does not exist, on every route,
/// never a `5xx`.
#[tokio::test]
async fn hostile_tenant_path_segments_answer_404_never_5xx() {
    let app = spawn_with(Options::api_only()).await;
    let probe_id = uuid::Uuid::now_v7();
    for segment in ["%00", "a%00b", "%FF", "A", "a%2Fb", &"t".repeat(300), "-x"] {
        for (method, path, body) in [
            (Method::GET, format!("/v1/tenants/{segment}"), None),
            (Method::GET, format!("/v1/tenants/{segment}/vms"), None),
            (
                Method::GET,
                format!("/v1/tenants/{segment}/vms/{probe_id}"),
                None,
            ),
            (
                Method::GET,
                format!("/v1/tenants/{segment}/operations"),
                None,
            ),
            (Method::GET, format!("/v1/tenants/{segment}/keys"), None),
            (
                Method::POST,
                format!("/v1/tenants/{segment}/keys"),
                Some(json!({"role": "reader"})),
            ),
            (
                Method::DELETE,
                format!("/v1/tenants/{segment}/keys/{probe_id}"),
                None,
            ),
            (
                Method::POST,
                format!("/v1/tenants/{segment}/vms"),
                Some(json!({"name": "x", "zone": "zone-a", "spec": example_spec("vms")})),
            ),
            (
                Method::DELETE,
                format!("/v1/tenants/{segment}/vms/{probe_id}"),
                None,
            ),
        ] {
            let a = app
                .request(method.clone(), &path, Some(&app.admin_key), body.as_ref())
                .await;
            assert!(
                a.status == StatusCode::NOT_FOUND,
                "{method} {path}: {} {:?}",
                a.status,
                a.body
            );
        }
    }
}

/// Creates a key of `tenant` with the admin key; returns the key and its ID.
async fn new_key(app: &TestApp, tenant: &str, body: serde_json::Value) -> (String, String) {
    let a = app
        .post(&format!("/v1/tenants/{tenant}/keys"), body.clone())
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{body}: {:?}", a.body);
    let field = |name: &str| a.body[name].as_str().unwrap().to_owned();
    (field("key"), field("id"))
}

/// Issue 11 §2: a percent-encoded tenant segment is served as the decoded tenant, and
/// audited under it too (not under the raw segment), so the tenant's own audit view
/// shows the request.
#[tokio::test]
async fn a_percent_encoded_tenant_is_audited_under_the_tenant_it_was_served_as() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    let (owner, _) = new_key(&app, &tenant, json!({"role": "owner"})).await;
    let owner = owner.as_str();
    let encoded: String = tenant.bytes().map(|b| format!("%{b:02X}")).collect();
    let body = json!({"name": "encoded", "zone": "zone-a", "spec": example_spec("vms")});
    let a = app
        .request(
            Method::POST,
            &format!("/v1/tenants/{encoded}/vms"),
            Some(owner),
            Some(&body),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(
        a.body["tenant"],
        json!(tenant),
        "served as the decoded tenant"
    );
    let rid = a.header("x-request-id").unwrap().to_owned();
    app.wait_audit(&format!("request_id = '{rid}'"), 1).await;
    let own = app
        .request(Method::GET, "/v1/audit", Some(owner), None)
        .await;
    let row = own.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["request_id"] == json!(rid))
        .unwrap_or_else(|| panic!("the owner's audit view misses the request: {}", own.body));
    assert_eq!(row["tenant"], json!(tenant));
    assert_eq!(row["target"], json!(format!("/v1/tenants/{encoded}/vms")));
}

/// Issue 11 §2: key names are unique per tenant, so a `409` on a name says nothing
/// about other tenants; platform keys (admins, workers) stay unique among themselves,
/// and a tenant's key named like a platform key neither shadows nor replaces it.
#[tokio::test]
async fn key_names_are_unique_per_tenant_and_platform_names_among_themselves() {
    let app = spawn_with(Options::api_only()).await;
    let (a, b) = (app.tenant().await, app.tenant().await);
    let (a_owner, _) = new_key(&app, &a, json!({"role": "owner"})).await;
    let (b_owner, _) = new_key(&app, &b, json!({"role": "owner"})).await;
    let create = |key: String, tenant: String, body: serde_json::Value| {
        let app = &app;
        async move {
            app.request(
                Method::POST,
                &format!("/v1/tenants/{tenant}/keys"),
                Some(&key),
                Some(&body),
            )
            .await
        }
    };
    let alice = json!({"role": "member", "name": "alice"});
    let b_alice = create(b_owner.clone(), b.clone(), alice.clone()).await;
    assert_eq!(b_alice.status, StatusCode::CREATED, "{:?}", b_alice.body);
    let a_alice = create(a_owner.clone(), a.clone(), alice.clone()).await;
    assert_eq!(
        a_alice.status,
        StatusCode::CREATED,
        "another tenant's key name must not be refused: {:?}",
        a_alice.body
    );
    let again = create(a_owner.clone(), a.clone(), alice).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "name_taken"),
        "names stay unique within a tenant"
    );
    // Platform names are unique among platform keys.
    let pool = json!({"role": "worker", "service": "vm", "zone": "zone-a", "name": "pool-a"});
    assert_eq!(
        create(app.admin_key.clone(), a.clone(), pool.clone())
            .await
            .status,
        StatusCode::CREATED
    );
    let twice = create(app.admin_key.clone(), b.clone(), pool).await;
    assert_eq!(
        (twice.status, twice.code()),
        (StatusCode::CONFLICT, "name_taken")
    );
    // A tenant key named like the bootstrap admin is the tenant's own business.
    let squatter = create(
        a_owner.clone(),
        a.clone(),
        json!({"role": "reader", "name": gateway::app::BOOTSTRAP_ADMIN}),
    )
    .await;
    assert_eq!(squatter.status, StatusCode::CREATED, "{:?}", squatter.body);
    let squatter_key = squatter.body["key"].as_str().unwrap().to_owned();
    // With the bootstrap admin revoked, `migrate` makes a new one: the tenant's
    // namesake does not count as the platform's.
    sqlx::query("UPDATE principals SET revoked_at = now() WHERE name = $1 AND tenant IS NULL")
        .bind(gateway::app::BOOTSTRAP_ADMIN)
        .execute(&app.pool)
        .await
        .unwrap();
    let backends = &app.running.as_ref().unwrap().backends;
    let admin = gateway::app::migrate(&app.config, backends, false)
        .await
        .unwrap()
        .expect("a new bootstrap admin key");
    assert_eq!(
        app.request(Method::GET, "/v1/audit", Some(&admin), None)
            .await
            .status,
        StatusCode::OK,
        "the new key is the platform's admin"
    );
    // Rotating a platform key (an upsert on its name) leaves the namesake alone.
    let rows: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT tenant, role FROM principals WHERE name = $1 ORDER BY tenant")
            .bind(gateway::app::BOOTSTRAP_ADMIN)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(Some(a.clone()), "reader".into()), (None, "admin".into())]
    );
    let squatter_reads = app
        .request(
            Method::GET,
            &format!("/v1/tenants/{a}/vms"),
            Some(&squatter_key),
            None,
        )
        .await;
    assert_eq!(squatter_reads.status, StatusCode::OK);
    let worker =
        gateway::app::worker_key(&app.pool, &gateway::domain::Service::named("vm"), "zone-b")
            .await
            .unwrap();
    let rotated =
        gateway::app::worker_key(&app.pool, &gateway::domain::Service::named("vm"), "zone-b")
            .await
            .unwrap();
    assert_ne!(worker, rotated);
    let workers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM principals WHERE name = 'worker:vm:zone-b'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(workers, 1, "a rotated platform key is the same principal");
}

/// Sends `method path` with `key` and an `X-Request-Id`; returns the status.
async fn send_with_id(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
    request_id: &str,
) -> StatusCode {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.url))
        .bearer_auth(key)
        .header("x-request-id", request_id);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap().status()
}

/// Issue 11 §2: when a key of tenant A probes tenant B, B's owner sees in its audit
/// view that attempts happened, not who (key ID or name), from where, or under which
/// request ID; the same for platform keys. Its own keys' entries stay complete, an owner
/// cannot find another tenant's key by filtering on its ID, and admins see everything.
#[tokio::test]
async fn owners_see_foreign_attempts_in_their_audit_view_but_not_who_made_them() {
    let app = spawn_with(Options::api_only()).await;
    let (a, b) = (app.tenant().await, app.tenant().await);
    let (prober_key, prober_id) =
        new_key(&app, &a, json!({"role": "owner", "name": "a-prober"})).await;
    let (b_key, b_id) = new_key(&app, &b, json!({"role": "owner", "name": "b-owner"})).await;
    let vm = app
        .create(&b, "vms", "target", "zone-a", example_spec("vms"))
        .await;
    let vm_path = format!(
        "/v1/tenants/{b}/vms/{}",
        vm["resource_id"].as_str().unwrap()
    );
    let create = json!({"name": "x", "zone": "zone-a", "spec": example_spec("vms")});
    for (method, path, body) in [
        (Method::DELETE, vm_path.clone(), None),
        (
            Method::POST,
            format!("/v1/tenants/{b}/vms"),
            Some(create.clone()),
        ),
        (
            Method::POST,
            format!("/v1/tenants/{b}/keys"),
            Some(json!({"role": "reader"})),
        ),
    ] {
        let status = send_with_id(&app, method, &path, &prober_key, body, "probe-from-a").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let own = send_with_id(
        &app,
        Method::POST,
        &format!("/v1/tenants/{b}/vms"),
        &b_key,
        Some(json!({"name": "mine", "zone": "zone-a", "spec": example_spec("vms")})),
        "b-own-write",
    )
    .await;
    assert_eq!(own, StatusCode::ACCEPTED);
    app.wait_audit("request_id IN ('probe-from-a', 'b-own-write')", 4)
        .await;

    let view = app
        .request(Method::GET, "/v1/audit", Some(&b_key), None)
        .await;
    assert_eq!(view.status, StatusCode::OK, "{:?}", view.body);
    let items = view.body["items"].as_array().unwrap();
    let text = view.body.to_string();
    for secret in [
        "a-prober",
        prober_id.as_str(),
        "probe-from-a",
        "bootstrap-admin",
    ] {
        assert!(
            !text.contains(secret),
            "B's owner learns {secret:?}: {text}"
        );
    }
    let foreign: Vec<_> = items
        .iter()
        .filter(|e| e["principal_hidden"] == json!(true))
        .collect();
    // Three probes, and the admin's creates of B's owner key and of the target VM.
    assert_eq!(foreign.len(), 5, "{text}");
    for e in &foreign {
        for field in ["principal_id", "principal_name", "source", "request_id"] {
            assert!(e.get(field).is_none(), "{field} shown: {e}");
        }
        assert_eq!(e["tenant"], json!(b));
    }
    assert_eq!(
        foreign
            .iter()
            .filter(|e| e["status"] == json!(404) && e["outcome"] == json!("failed"))
            .count(),
        3,
        "that the attempts happened is shown: {text}"
    );
    let mine = items
        .iter()
        .find(|e| e["request_id"] == json!("b-own-write"))
        .expect("the owner's own write is listed in full");
    assert_eq!(mine["principal_id"], json!(b_id));
    assert_eq!(mine["principal_name"], json!("b-owner"));
    assert!(mine.get("principal_hidden").is_none());

    // Filtering on another tenant's key finds nothing; on one's own, its entries.
    let probe = app
        .request(
            Method::GET,
            &format!("/v1/audit?principal_id={prober_id}"),
            Some(&b_key),
            None,
        )
        .await;
    assert_eq!(probe.body["items"], json!([]), "{:?}", probe.body);
    let by_own = app
        .request(
            Method::GET,
            &format!("/v1/audit?principal_id={b_id}"),
            Some(&b_key),
            None,
        )
        .await;
    assert_eq!(by_own.body["items"].as_array().unwrap().len(), 1);

    // Admins see who it was.
    let admin_view = app
        .get(&format!("/v1/audit?tenant={b}&principal_id={prober_id}"))
        .await;
    let rows = admin_view.body["items"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{:?}", admin_view.body);
    assert!(rows.iter().all(|e| e["principal_name"] == json!("a-prober")
        && e["request_id"] == json!("probe-from-a")
        && e.get("principal_hidden").is_none()));
}

/// One HTTP/1.1 connection driven by hand, to see exactly when the server closes it.
struct RawConnection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

/// An answer read off a [`RawConnection`].
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    /// The server said `Connection: close`.
    closes: bool,
    /// The body.
    body: Vec<u8>,
}

impl RawConnection {
    async fn open(app: &TestApp) -> Self {
        let addr = app.url.trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream: tokio::io::BufReader::new(stream),
        }
    }

    /// Sends a request; with `pause`, the body follows the headers after a moment, as
    /// over a slow network, so the server can answer before the body arrived.
    async fn send(&mut self, head: &str, body: &[u8], pause: bool) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let head = format!(
            "{head}\r\nHost: gateway\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        if pause {
            stream.flush().await?;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stream.write_all(body).await?;
        stream.flush().await
    }

    /// Reads one answer (status line, headers, a `Content-Length` body).
    async fn answer(&mut self) -> std::io::Result<RawAnswer> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(eof());
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(eof)?;
        let (mut length, mut closes) = (0, false);
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(eof());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').ok_or_else(eof)?;
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().map_err(|_| eof())?,
                "connection" => closes = value.trim().eq_ignore_ascii_case("close"),
                "transfer-encoding" => panic!("chunked answers are not expected here"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(RawAnswer {
            status,
            closes,
            body,
        })
    }
}

/// A body that does not come as its headers said: one declared over the limit is
/// refused at once (`413`), without waiting for it; one that stops short gets `408
/// request_timeout` when the body's time is up (an outside probe got `400
/// malformed_json` after 10 s for both).
#[tokio::test]
async fn a_body_that_does_not_come_is_told_apart_from_a_malformed_one() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_with(Options::api_only()).await;
    let head = |length: usize| {
        format!(
            "POST /v1/tenants HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
            app.admin_key
        )
    };
    let code = |a: &RawAnswer| -> String {
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        v["code"].as_str().unwrap_or_default().to_owned()
    };
    let mut conn = RawConnection::open(&app).await;
    let sent = tokio::time::Instant::now();
    conn.stream
        .get_mut()
        .write_all(head(99_999_999).as_bytes())
        .await
        .unwrap();
    let a = conn.answer().await.unwrap();
    assert_eq!((a.status, code(&a).as_str()), (413, "payload_too_large"));
    assert!(
        sent.elapsed() < gateway::api::BODY_TIMEOUT,
        "answered at once, not after the body's time"
    );

    // One that stops short, and one that trickles in a byte every 2 s (each byte in
    // time for a timeout per chunk, the whole not in time).
    let short = async {
        let mut conn = RawConnection::open(&app).await;
        let stream = conn.stream.get_mut();
        stream.write_all(head(100).as_bytes()).await.unwrap();
        stream.write_all(br#"{"id": "short"}"#).await.unwrap();
        conn.answer().await.unwrap()
    };
    let trickle = async {
        let mut conn = RawConnection::open(&app).await;
        let body = format!(
            r#"{{"id": "trickle", "display_name": "{}"}}"#,
            "x".repeat(60)
        );
        conn.stream
            .get_mut()
            .write_all(head(body.len()).as_bytes())
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let answer = async {
            for byte in body.as_bytes() {
                if conn.stream.get_mut().write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                if started.elapsed() > gateway::api::BODY_TIMEOUT * 2 {
                    break;
                }
            }
        };
        tokio::time::timeout(
            gateway::api::BODY_TIMEOUT + std::time::Duration::from_secs(3),
            answer,
        )
        .await
        .ok();
        conn.answer().await.unwrap()
    };
    let (short, trickle) = tokio::join!(short, trickle);
    for a in [short, trickle] {
        assert_eq!((a.status, code(&a).as_str()), (408, "request_timeout"));
    }
    assert_eq!(
        app.count("tenants WHERE id IN ('short', 'trickle')").await,
        0
    );
}

/// A long-poll may ask for the longest wait, 60 s, and gets the operation as it is
/// then, not the request's own time limit (an outside probe got an empty `408` at 60 s).
#[tokio::test]
async fn a_long_poll_of_the_longest_wait_answers_with_the_operation() {
    let app = spawn_with(Options::api_only()).await;
    let tenant = app.tenant().await;
    // No relay: the create stays `pending` for good.
    let op = app
        .create(&tenant, "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let id = op["id"].as_str().unwrap();
    let asked = tokio::time::Instant::now();
    let a = app
        .get(&format!("/v1/operations/{id}?wait=60s&until=done"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["state"], "pending");
    assert!(asked.elapsed() >= gateway::api::operations::MAX_WAIT);
    assert!(gateway::api::REQUEST_TIMEOUT >= gateway::api::operations::MAX_WAIT * 7 / 6);
}

/// Issue 11 §2: answers sent before the request body was read (`401`, `413`, `415`,
/// `429`) either leave a kept-alive connection usable or say `Connection: close`; the
/// server never drops a connection silently. Many POSTs with bodies go over one
/// connection, half of them with the body arriving a moment after the headers.
#[tokio::test]
async fn early_answers_keep_the_connection_usable_or_say_connection_close() {
    use std::num::NonZeroU32;
    let app = spawn_with(Options {
        tweak: |c| {
            let n = |v| NonZeroU32::new(v).unwrap();
            c.rate_limits.per_second = n(1);
            c.rate_limits.burst = n(3);
            c.rate_limits.anonymous_per_second = n(1);
            c.rate_limits.anonymous_burst = n(3);
        },
        ..Options::api_only()
    })
    .await;
    let json = br#"{"name": "web", "zone": "zone-a", "spec": {}}"#.to_vec();
    let too_large = format!(r#"{{"name": "{}"}}"#, "a".repeat(70 * 1024)).into_bytes();
    let admin = format!("Authorization: Bearer {}", app.admin_key);
    let post = "POST /v1/tenants/acme/vms HTTP/1.1";
    // (headers, body): not JSON (415), too large (413), no key (401); then, with the
    // buckets spent, 429 for all of them.
    let requests = [
        (
            format!("{post}\r\n{admin}\r\nContent-Type: text/plain"),
            json.clone(),
        ),
        (
            format!("{post}\r\n{admin}\r\nContent-Type: application/json"),
            too_large,
        ),
        (format!("{post}\r\nContent-Type: application/json"), json),
    ];
    let mut conn = RawConnection::open(&app).await;
    let (mut statuses, mut reconnects) = (std::collections::BTreeMap::new(), 0);
    for i in 0..240 {
        let (head, body) = &requests[i % requests.len()];
        let sent = conn.send(head, body, i % 2 == 0).await;
        let answer = match sent {
            Ok(()) => conn.answer().await,
            Err(e) => Err(e),
        };
        let answer = answer.unwrap_or_else(|e| {
            panic!("request {i}: the connection broke ({e}) though no answer said Connection: close; so far {statuses:?}")
        });
        *statuses.entry(answer.status).or_insert(0) += 1;
        if answer.closes {
            // Bodies over the limit are not drained; the others should be.
            if body.len() <= 64 * 1024 {
                reconnects += 1;
            }
            conn = RawConnection::open(&app).await;
        }
    }
    for status in [401, 413, 415, 429] {
        assert!(statuses.contains_key(&status), "no {status}: {statuses:?}");
    }
    assert!(
        reconnects < 8,
        "bodies within the limit are drained, not answered with Connection: close: {reconnects} of 160"
    );
    // The connection still serves.
    conn.send("GET /healthz HTTP/1.1", b"", false)
        .await
        .unwrap();
    assert_eq!(conn.answer().await.unwrap().status, 200);
}

/// Issue 11 §2: a worker key made through a tenant's key route is a platform key (it
/// serves every tenant): the answer's `Location` names `/v1/keys/{id}`, where admins
/// list and revoke it; the tenant's routes neither list nor revoke it. Only admins use
/// the platform routes, which revoke any key.
#[tokio::test]
async fn worker_keys_made_through_a_tenant_route_are_listed_and_revoked_on_platform_routes() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let (owner, _) = new_key(&app, &t, json!({"role": "owner"})).await;
    let made = app
        .post(
            &format!("/v1/tenants/{t}/keys"),
            json!({"role": "worker", "service": "vm", "zone": "zone-a", "name": "pool-vm-a"}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let (worker, id) = (
        made.body["key"].as_str().unwrap().to_owned(),
        made.body["id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        made.header("location"),
        Some(format!("/v1/keys/{id}").as_str())
    );
    // Not the tenant's: not in its list, not revocable through its route.
    let listed = app.get(&format!("/v1/tenants/{t}/keys")).await;
    assert!(!listed.body.to_string().contains(&id), "{:?}", listed.body);
    let via_tenant = app.delete(&format!("/v1/tenants/{t}/keys/{id}")).await;
    assert_eq!(via_tenant.status, StatusCode::NOT_FOUND);
    // The platform's: listed (never a secret) for admins only.
    let platform = app.get("/v1/keys").await;
    assert_eq!(platform.status, StatusCode::OK, "{:?}", platform.body);
    let names: Vec<&str> = platform
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"pool-vm-a") && names.contains(&gateway::app::BOOTSTRAP_ADMIN));
    assert!(platform
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("tenant").is_none()));
    let text = platform.body.to_string();
    assert!(!text.contains(&worker) && !text.contains(&app.admin_key) && !text.contains("hash"));
    for (method, path) in [
        (Method::GET, "/v1/keys".to_owned()),
        (Method::DELETE, format!("/v1/keys/{id}")),
    ] {
        let a = app.request(method.clone(), &path, Some(&owner), None).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{method} {path}"
        );
        let a = app
            .request(method.clone(), &path, Some(&worker), None)
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    // Revoked where Location says; it stops working at once.
    let zones = |key: String| {
        let app = &app;
        async move {
            app.request(Method::GET, "/v1/zones", Some(&key), None)
                .await
                .status
        }
    };
    assert_eq!(zones(worker.clone()).await, StatusCode::OK);
    assert_eq!(
        app.delete(&format!("/v1/keys/{id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(zones(worker).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.delete(&format!("/v1/keys/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    let revoked = app.get("/v1/keys").await;
    let entry = revoked
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == json!(id))
        .unwrap();
    assert!(entry["revoked_at"].is_string(), "{entry}");
    // A tenant key's Location is its tenant's route; admins may revoke it on either.
    let member = app
        .post(&format!("/v1/tenants/{t}/keys"), json!({"role": "member"}))
        .await;
    let member_id = member.body["id"].as_str().unwrap();
    assert_eq!(
        member.header("location"),
        Some(format!("/v1/tenants/{t}/keys/{member_id}").as_str())
    );
    assert_eq!(
        app.delete(&format!("/v1/keys/{member_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.delete("/v1/keys/not-a-key").await.status,
        StatusCode::NOT_FOUND
    );
}

/// Issue 11 §4: once the gateway knows PostgreSQL is down, requests that need it answer
/// `503 database_unavailable` with `Retry-After` at once (not after the pool's 5 s
/// acquire timeout), what needs no database keeps answering (`/healthz`, `/metrics`,
/// `401`s; `/readyz` says the database is down), and service resumes by itself when
/// PostgreSQL returns. A real `gateway serve` against a private PostgreSQL.
#[tokio::test]
async fn with_postgres_down_requests_answer_503_at_once_and_service_resumes_by_itself() {
    use crate::common::{Deployment, Gateway, Postgres};
    use std::time::{Duration, Instant};
    let mut pg = Postgres::start();
    let d = Deployment::new(&pg.url(), &common::nats_url(), &[]).await;
    let api = Gateway::serve(&d.env).await;
    let url = api.url();
    let tenant = d.tenant(&url).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let key = d.env.admin_key.clone();
    let list = format!("{url}/v1/tenants/{tenant}/vms");
    let read = || http.get(&list).bearer_auth(&key).send();
    let write = || {
        http.post(&list)
            .bearer_auth(&key)
            .json(&json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")}))
            .send()
    };
    assert_eq!(read().await.unwrap().status(), StatusCode::OK);

    pg.crash();
    // The gateway learns of the outage from a request (at worst after the pool's
    // acquire timeout) and the probe it starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started = Instant::now();
        let a = read().await.unwrap();
        assert_eq!(a.status(), StatusCode::SERVICE_UNAVAILABLE);
        if started.elapsed() < Duration::from_millis(100) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "503s never came at once\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut times = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let a = if i % 2 == 0 {
            read().await
        } else {
            write().await
        }
        .unwrap();
        let took = started.elapsed();
        assert_eq!(a.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            a.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body: serde_json::Value = a.json().await.unwrap();
        assert_eq!(body["code"], "database_unavailable", "{body}");
        assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
        times.push(took);
    }
    times.sort();
    assert!(
        times[times.len() / 2] < Duration::from_millis(100),
        "median {:?}: {times:?}",
        times[times.len() / 2]
    );
    // What needs no database keeps answering, at once.
    for (path, expected) in [
        ("/healthz", StatusCode::OK),
        ("/metrics", StatusCode::OK),
        ("/readyz", StatusCode::SERVICE_UNAVAILABLE),
        ("/v1/zones", StatusCode::UNAUTHORIZED),
    ] {
        let started = Instant::now();
        let a = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(a.status(), expected, "{path}");
        assert!(started.elapsed() < Duration::from_secs(1), "{path}");
        if path == "/readyz" {
            let body: serde_json::Value = a.json().await.unwrap();
            assert_ne!(body["database"], "ok", "{body}");
            assert_eq!(body["nats"], "ok", "{body}");
        }
    }

    pg.resume();
    // No restart: the probe finds PostgreSQL back and requests go through again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while read().await.unwrap().status() != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "service did not resume\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(write().await.unwrap().status(), StatusCode::ACCEPTED);
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}
