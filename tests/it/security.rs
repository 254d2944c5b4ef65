//! Security at the front door: every route × every role, tenant isolation, keys,
//! audit trail, rate limits and input hardening — over HTTP, against real PostgreSQL.

use crate::common;
use crate::common::{example_spec, spawn_with, unique, Options, TestApp};
use gateway::app::{worker_key, Parts};
use gateway::auth::{Decision, Permission, Principal, Role};
use gateway::domain::Service;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::num::NonZeroU32;

async fn new_key(app: &TestApp, tenant: &str, body: Value) -> String {
    let a = app
        .post(&format!("/v1/tenants/{tenant}/keys"), body.clone())
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{body}: {:?}", a.body);
    a.body["key"].as_str().unwrap().to_owned()
}

/// A caller of the matrix: a key (or none) and the principal the policy sees.
struct Who {
    label: &'static str,
    key: Option<String>,
    principal: Option<Principal>,
}

fn principal(role: Role, tenant: Option<&str>, scope: Option<(Service, &str)>) -> Principal {
    Principal {
        id: uuid::Uuid::nil(),
        name: String::new(),
        role,
        tenant: tenant.map(str::to_owned),
        scope: scope.map(|(s, z)| (s, z.to_owned())),
    }
}

#[tokio::test]
async fn every_route_answers_every_role_as_the_policy_table_says() {
    let app = spawn_with(Options::api_only()).await;
    let a = app.tenant().await;
    let b = app.tenant().await;
    let who = vec![
        Who {
            label: "admin",
            key: Some(app.admin_key.clone()),
            principal: Some(principal(Role::Admin, None, None)),
        },
        Who {
            label: "owner",
            key: Some(new_key(&app, &a, json!({"role": "owner"})).await),
            principal: Some(principal(Role::Owner, Some(&a), None)),
        },
        Who {
            label: "member",
            key: Some(new_key(&app, &a, json!({"role": "member"})).await),
            principal: Some(principal(Role::Member, Some(&a), None)),
        },
        Who {
            label: "reader",
            key: Some(new_key(&app, &a, json!({"role": "reader"})).await),
            principal: Some(principal(Role::Reader, Some(&a), None)),
        },
        Who {
            label: "worker",
            key: Some(
                worker_key(&app.pool, &Service::named("vm"), "zone-b")
                    .await
                    .unwrap(),
            ),
            principal: Some(principal(
                Role::Worker,
                None,
                Some((Service::named("vm"), "zone-b")),
            )),
        },
        Who {
            label: "other-owner",
            key: Some(new_key(&app, &b, json!({"role": "owner"})).await),
            principal: Some(principal(Role::Owner, Some(&b), None)),
        },
        Who {
            label: "anonymous",
            key: None,
            principal: None,
        },
        Who {
            label: "bad-key",
            key: Some("gw_not_a_key".into()),
            principal: None,
        },
    ];
    // Fixtures in tenant A, zone-a (so the zone-b VM worker has no business with them).
    let vm = app
        .create(&a, "vms", "fixture", "zone-a", example_spec("vms"))
        .await;
    let vm_id = vm["resource_id"].as_str().unwrap().to_owned();
    let op_id = vm["id"].as_str().unwrap().to_owned();

    // (method, path, body, permission, tenant the permission is about)
    type Route = (Method, String, Option<Value>, Permission, Option<String>);
    let routes = |n: usize, cancel_op: &str| -> Vec<Route> {
        let t = Some(a.clone());
        vec![
            (
                Method::GET,
                format!("/v1/tenants/{a}"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/tenants/{a}/vms"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/tenants/{a}/vms/{vm_id}"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/tenants/{a}/operations"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/operations/{op_id}"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::POST,
                format!("/v1/tenants/{a}/volumes"),
                Some(
                    json!({"name": format!("v{n}"), "zone": "zone-a", "spec": example_spec("volumes")}),
                ),
                Permission::Write,
                t.clone(),
            ),
            (
                Method::PATCH,
                format!("/v1/tenants/{a}/vms/{vm_id}"),
                Some(json!({"spec": {"flavor": "m1.medium"}})),
                Permission::Write,
                t.clone(),
            ),
            (
                Method::POST,
                format!("/v1/tenants/{a}/vms/{vm_id}/actions/reboot"),
                Some(json!({})),
                Permission::Write,
                t.clone(),
            ),
            (
                Method::POST,
                format!("/v1/operations/{cancel_op}/cancel"),
                None,
                Permission::Write,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/tenants/{a}/quotas"),
                None,
                Permission::Read,
                t.clone(),
            ),
            (
                Method::PUT,
                format!("/v1/tenants/{a}/quotas"),
                Some(json!({"limits": []})),
                Permission::Platform,
                t.clone(),
            ),
            (
                Method::GET,
                format!("/v1/tenants/{a}/keys"),
                None,
                Permission::Manage,
                t.clone(),
            ),
            (
                Method::POST,
                format!("/v1/tenants/{a}/keys"),
                Some(json!({"role": "reader"})),
                Permission::Manage,
                t.clone(),
            ),
            (
                Method::POST,
                "/v1/tenants".into(),
                Some(json!({"id": format!("x-{}", unique())})),
                Permission::Platform,
                None,
            ),
        ]
    };
    let mut table = String::new();
    for (n, w) in who.iter().enumerate() {
        // Each caller cancels an operation of its own, so one cancel cannot hide another.
        let victim = app
            .create(
                &a,
                "vms",
                &format!("cancel-{n}"),
                "zone-a",
                example_spec("vms"),
            )
            .await;
        for (method, path, body, permission, tenant) in routes(n, victim["id"].as_str().unwrap()) {
            let answer = app
                .request(method.clone(), &path, w.key.as_deref(), body.as_ref())
                .await;
            let expected = match &w.principal {
                None => "401",
                Some(p) => match p.decide(permission, tenant.as_deref()) {
                    Decision::Allow => "allowed",
                    Decision::Hide => "404",
                    Decision::Deny => "403",
                },
            };
            let got = match answer.status.as_u16() {
                401 => "401",
                403 => "403",
                404 => "404",
                // Allowed, whatever the operation's own outcome (a second cancel is 409).
                _ => "allowed",
            };
            table.push_str(&format!(
                "{:<12} {method:<6} {path:<60} {expected:<8} {got}\n",
                w.label
            ));
            assert_eq!(
                got, expected,
                "{} {method} {path}: {:?}\n{table}",
                w.label, answer.body
            );
            if expected == "403" || expected == "401" || expected == "404" {
                assert!(!answer.code().is_empty(), "a stable code on every refusal");
            }
        }
    }
    // The catalog is readable by every authenticated key, and by nobody else.
    for w in &who {
        let status = app
            .request(Method::GET, "/v1/zones", w.key.as_deref(), None)
            .await
            .status;
        let expected = if w.principal.is_some() {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(status, expected, "{}", w.label);
    }
}

#[tokio::test]
async fn other_tenants_see_nothing_and_learn_nothing() {
    let app = spawn_with(Options::api_only()).await;
    let a = app.tenant().await;
    let b = app.tenant().await;
    let b_owner = new_key(&app, &b, json!({"role": "owner"})).await;
    let vm = app
        .create(&a, "vms", "secret", "zone-a", example_spec("vms"))
        .await;
    let vm_path = format!(
        "/v1/tenants/{a}/vms/{}",
        vm["resource_id"].as_str().unwrap()
    );
    let as_b = |method: Method, path: String, body: Option<Value>| {
        let (app, key) = (&app, b_owner.clone());
        async move { app.request(method, &path, Some(&key), body.as_ref()).await }
    };
    for (method, path, body) in [
        (Method::GET, vm_path.clone(), None),
        (Method::DELETE, vm_path.clone(), None),
        (
            Method::PATCH,
            vm_path.clone(),
            Some(json!({"spec": {"flavor": "m1.large"}})),
        ),
        (Method::GET, format!("/v1/tenants/{a}/vms"), None),
        (Method::GET, format!("/v1/tenants/{a}/operations"), None),
        (
            Method::GET,
            format!("/v1/operations/{}", vm["id"].as_str().unwrap()),
            None,
        ),
        (
            Method::POST,
            format!("/v1/operations/{}/cancel", vm["id"].as_str().unwrap()),
            None,
        ),
        (
            Method::POST,
            format!("/v1/tenants/{a}/vms"),
            Some(json!({"name": "x", "zone": "zone-a", "spec": example_spec("vms")})),
        ),
        (Method::GET, format!("/v1/tenants/{a}/keys"), None),
        (Method::GET, format!("/v1/audit?tenant={a}"), None),
    ] {
        let answer = as_b(method.clone(), path.clone(), body).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {:?}",
            answer.body
        );
    }
    // A's resource is indistinguishable from one that never existed.
    let missing = as_b(
        Method::GET,
        format!("/v1/tenants/{a}/vms/{}", uuid::Uuid::now_v7()),
        None,
    )
    .await;
    let hidden = as_b(Method::GET, vm_path, None).await;
    assert_eq!(
        (missing.status, missing.code()),
        (hidden.status, hidden.code())
    );
    // B's own lists hold nothing of A's.
    let own = as_b(Method::GET, format!("/v1/tenants/{b}/vms"), None).await;
    assert_eq!(own.body["items"], json!([]));
    let tenants = as_b(Method::GET, "/v1/tenants".into(), None).await;
    assert_eq!(tenants.body.as_array().unwrap().len(), 1);
    assert_eq!(
        app.count("operations").await,
        1,
        "nothing of B's attempts was written"
    );
}

#[tokio::test]
async fn keys_are_shown_once_scoped_revocable_and_expire() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let owner = new_key(&app, &t, json!({"role": "owner", "name": "alice"})).await;
    // An owner makes keys for its tenant, but not worker keys.
    let member = {
        let a = app
            .request(
                Method::POST,
                &format!("/v1/tenants/{t}/keys"),
                Some(&owner),
                Some(&json!({"role": "member"})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED);
        a.body["key"].as_str().unwrap().to_owned()
    };
    let w = app
        .request(
            Method::POST,
            &format!("/v1/tenants/{t}/keys"),
            Some(&owner),
            Some(&json!({"role": "worker", "service": "vm", "zone": "zone-a"})),
        )
        .await;
    assert_eq!(w.status, StatusCode::FORBIDDEN);
    let w = app
        .post(
            &format!("/v1/tenants/{t}/keys"),
            json!({"role": "worker", "service": "vm", "zone": "zone-a"}),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{:?}", w.body);
    assert_eq!(w.body["service"], "vm");
    for bad in [
        json!({"role": "admin"}),
        json!({"role": "worker", "service": "vm"}),
        json!({"role": "member", "zone": "zone-a"}),
        json!({"role": "member", "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"role": "member", "name": "Not A Label"}),
    ] {
        let a = app
            .post(&format!("/v1/tenants/{t}/keys"), bad.clone())
            .await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {:?}",
            a.body
        );
    }
    let dup = app
        .post(
            &format!("/v1/tenants/{t}/keys"),
            json!({"role": "reader", "name": "alice"}),
        )
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "name_taken")
    );
    // Listing never shows a secret or a hash.
    let list = app
        .request(
            Method::GET,
            &format!("/v1/tenants/{t}/keys"),
            Some(&owner),
            None,
        )
        .await;
    let text = list.body.to_string();
    assert!(!text.contains(&member) && !text.contains("hash"), "{text}");
    let member_id = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "member")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The member works until revoked, then gets 401 at once.
    let body = json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")});
    let ok = app
        .request(
            Method::POST,
            &format!("/v1/tenants/{t}/vms"),
            Some(&member),
            Some(&body),
        )
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED);
    let revoked = app
        .request(
            Method::DELETE,
            &format!("/v1/tenants/{t}/keys/{member_id}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let after = app
        .request(
            Method::GET,
            &format!("/v1/tenants/{t}/vms"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let again = app
        .request(
            Method::DELETE,
            &format!("/v1/tenants/{t}/keys/{member_id}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    // An expired key stops working.
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let reader = new_key(
        &app,
        &t,
        json!({"role": "reader", "name": "temp", "expires_at": soon}),
    )
    .await;
    assert_eq!(
        app.request(
            Method::GET,
            &format!("/v1/tenants/{t}/vms"),
            Some(&reader),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    sqlx::query(
        "UPDATE principals SET expires_at = now() - interval '1 second' WHERE name = 'temp'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // A change made straight on the database reaches the gateway's key cache by
    // notification: within a second at most (the cache's lifetime).
    let changed = std::time::Instant::now();
    crate::common::eventually("the expired key is refused", || async {
        let status = app
            .request(
                Method::GET,
                &format!("/v1/tenants/{t}/vms"),
                Some(&reader),
                None,
            )
            .await
            .status;
        (status == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    assert!(changed.elapsed() < std::time::Duration::from_millis(1500));
    // Only the hash is stored.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT key_hash FROM principals")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(stored
        .iter()
        .all(|h| h.len() == 32 && !String::from_utf8_lossy(h).contains("gw_")));
}

#[tokio::test]
async fn every_mutating_or_denied_request_is_audited_exactly_once_in_an_unbreakable_chain() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let reader = new_key(&app, &t, json!({"role": "reader"})).await;
    let body = json!({"name": "web", "zone": "zone-a", "spec": example_spec("vms")});
    let send = |method: Method,
                path: String,
                key: Option<String>,
                body: Option<Value>,
                rid: &'static str| {
        let app = &app;
        async move {
            let mut req = app
                .http
                .request(method, format!("{}{path}", app.url))
                .header("x-request-id", rid);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            req.send().await.unwrap().status()
        }
    };
    let admin = Some(app.admin_key.clone());
    let cases = [
        (
            send(
                Method::POST,
                format!("/v1/tenants/{t}/vms"),
                admin.clone(),
                Some(body.clone()),
                "audit-allowed",
            )
            .await,
            "audit-allowed",
            "allowed",
        ),
        (
            send(
                Method::POST,
                format!("/v1/tenants/{t}/vms"),
                Some(reader.clone()),
                Some(body.clone()),
                "audit-forbidden",
            )
            .await,
            "audit-forbidden",
            "denied",
        ),
        (
            send(
                Method::POST,
                format!("/v1/tenants/{t}/vms"),
                None,
                Some(body.clone()),
                "audit-anonymous",
            )
            .await,
            "audit-anonymous",
            "denied",
        ),
        (
            send(
                Method::POST,
                format!("/v1/tenants/{t}/vms"),
                admin.clone(),
                Some(json!({"name": "web"})),
                "audit-invalid",
            )
            .await,
            "audit-invalid",
            "failed",
        ),
        (
            send(
                Method::GET,
                format!("/v1/tenants/{t}/keys"),
                Some(reader.clone()),
                None,
                "audit-read-denied",
            )
            .await,
            "audit-read-denied",
            "denied",
        ),
    ];
    assert_eq!(
        cases.iter().map(|c| c.0.as_u16()).collect::<Vec<_>>(),
        vec![202, 403, 401, 422, 403]
    );
    send(
        Method::GET,
        format!("/v1/tenants/{t}/vms"),
        admin.clone(),
        None,
        "audit-plain-read",
    )
    .await;
    app.wait_audit("request_id LIKE 'audit-%'", cases.len() as i64)
        .await;
    for (_, rid, outcome) in &cases {
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT outcome, action, tenant FROM audit_log WHERE request_id = $1")
                .bind(rid)
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(rows.len(), 1, "{rid}: exactly one row");
        assert_eq!(rows[0].0, *outcome, "{rid}");
        assert_eq!(rows[0].2.as_deref(), Some(t.as_str()), "{rid}");
    }
    let plain: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE request_id = 'audit-plain-read'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(plain, 0, "allowed reads are not audited");

    // The API shows it to admins, and to owners for their own tenant only.
    let page = app
        .get(&format!("/v1/audit?tenant={t}&outcome=denied"))
        .await;
    assert!(
        page.body["items"].as_array().unwrap().len() >= 3,
        "{:?}",
        page.body
    );
    let owner = new_key(&app, &t, json!({"role": "owner"})).await;
    let own = app
        .request(Method::GET, "/v1/audit", Some(&owner), None)
        .await;
    assert!(own.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["tenant"] == json!(t)));
    assert_eq!(
        app.request(Method::GET, "/v1/audit", Some(&reader), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    // Append-only: the database refuses changes.
    let update = sqlx::query("UPDATE audit_log SET outcome = 'allowed'")
        .execute(&app.pool)
        .await;
    assert!(update.unwrap_err().to_string().contains("append-only"));
    assert!(sqlx::query("DELETE FROM audit_log")
        .execute(&app.pool)
        .await
        .is_err());
    assert!(sqlx::query("TRUNCATE audit_log")
        .execute(&app.pool)
        .await
        .is_err());
    // Untouched, the whole chain checks out (the writer may still be appending).
    match gateway::audit::verify(&app.pool).await.unwrap() {
        gateway::audit::Verdict::Intact(n) => assert!(n >= cases.len() as u64, "{n}"),
        broken => panic!("an untouched chain is intact: {broken:?}"),
    }
    // Someone with superuser rights bypasses the trigger: the chain still tells.
    let victim: i64 =
        sqlx::query_scalar("SELECT id FROM audit_log WHERE request_id = 'audit-forbidden'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    crate::common::tamper_and_verify(
        &app.pool,
        "UPDATE audit_log SET outcome = 'allowed', status = 202 WHERE id = $1",
        victim,
    )
    .await;
    // So does the CLI, with a non-zero exit naming the row.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["admin", "verify-audit"])
        .env("DATABASE_URL", &app.config.database_url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("entry {victim}")),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_burst_over_the_limit_gets_429_and_polls_have_their_own_bucket() {
    let app = spawn_with(Options {
        database_port: None,
        parts: Parts {
            api: true,
            ..Default::default()
        },
        tweak: |c| {
            c.rate_limits.per_second = NonZeroU32::new(1).unwrap();
            c.rate_limits.burst = NonZeroU32::new(5).unwrap();
            c.rate_limits.anonymous_per_second = NonZeroU32::new(1).unwrap();
            c.rate_limits.anonymous_burst = NonZeroU32::new(2).unwrap();
        },
    })
    .await;
    // Seed data straight in the database: the API's own buckets are tiny here.
    sqlx::query("INSERT INTO tenants (id) VALUES ('acme')")
        .execute(&app.pool)
        .await
        .unwrap();
    let op = app
        .create("acme", "vms", "web", "zone-a", example_spec("vms"))
        .await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..10 {
        let a = app.get("/v1/tenants/acme/vms").await;
        statuses.push(a.status.as_u16());
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(a);
        }
    }
    let limited = limited.expect("a burst over the limit is refused");
    assert_eq!(limited.code(), "rate_limited");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 4,
        "{statuses:?}"
    );
    // Reads are spent; polling still works, and so do writes.
    let poll = app
        .get(&format!("/v1/operations/{}", op["id"].as_str().unwrap()))
        .await;
    assert_eq!(poll.status, StatusCode::OK);
    let write = app
        .post(
            "/v1/tenants/acme/vms",
            json!({"name": "web2", "zone": "zone-a", "spec": example_spec("vms")}),
        )
        .await;
    assert_eq!(write.status, StatusCode::ACCEPTED);
    // Without a key, the stricter per-address bucket applies.
    let mut anon = Vec::new();
    for _ in 0..4 {
        anon.push(
            app.request(Method::GET, "/v1/zones", None, None)
                .await
                .status
                .as_u16(),
        );
    }
    assert!(anon.contains(&429), "{anon:?}");
    // Health checks are never throttled.
    for _ in 0..5 {
        assert_eq!(
            app.request(Method::GET, "/healthz", None, None)
                .await
                .status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn oversized_and_deeply_nested_bodies_are_refused_before_anything_is_written() {
    let app = spawn_with(Options::api_only()).await;
    let t = app.tenant().await;
    let url = format!("{}/v1/tenants/{t}/vms", app.url);
    let post = |body: String| {
        let req = app
            .http
            .post(&url)
            .bearer_auth(&app.admin_key)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let res = req.send().await.unwrap();
            (
                res.status(),
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let deep = format!(
        "{{\"name\": \"web\", \"zone\": \"zone-a\", \"spec\": {}1{}}}",
        "[".repeat(40),
        "]".repeat(40)
    );
    let (s, b) = post(deep).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body_too_complex"))
    );
    let very_deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let (s, b) = post(very_deep).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body_too_complex")),
        "past serde's recursion limit: the same refusal as past ours"
    );
    let wide = format!("{{\"name\": \"web\", \"zone\": \"zone-a\", \"spec\": {{\"flavor\": \"m1.small\", \"image\": \"debian-12\", \"x\": [{}0]}}}}", "0,".repeat(5000));
    let (s, b) = post(wide).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body_too_complex"))
    );
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(200_000));
    let (s, b) = post(huge).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    for table in ["resources", "operations", "outbox"] {
        assert_eq!(app.count(table).await, 0, "{table}");
    }
}

#[test]
fn the_readme_shows_the_policy_table_the_code_enforces() {
    let readme = std::fs::read_to_string(crate::common::repo_root().join("README.md")).unwrap();
    assert!(
        readme.contains(&gateway::auth::policy_table()),
        "update README's Roles table:\n{}",
        gateway::auth::policy_table()
    );
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_with(Options {
        database_port: None,
        parts: Parts {
            api: true,
            ..Default::default()
        },
        tweak: |c| c.header_timeout = std::time::Duration::from_millis(300),
    })
    .await;
    let addr = app.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The headers never finish: the server answers 408 or closes, well before 10 s.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the slow connection was left open");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // Meanwhile a normal client is served.
    assert_eq!(
        app.request(Method::GET, "/healthz", None, None)
            .await
            .status,
        StatusCode::OK
    );
}

/// Keys never reach the logs, even at the most verbose level: the request log records
/// method, path and status, never headers, and SQL logging shows statements, not the
/// bound key hashes.
#[tokio::test]
async fn keys_never_appear_in_the_logs_even_at_trace_level() {
    use crate::common::{Deployment, Gateway};
    let _heavy = common::heavy().await;
    let d = Deployment::new(
        &common::pg_base(),
        &common::nats_url(),
        &[("RUST_LOG", "trace"), ("LOG_FORMAT", "json")],
    )
    .await;
    let api = Gateway::serve(&d.env).await;
    let tenant = d.tenant(&api.url()).await;
    // A key made through the API, then used, and a wrong key tried.
    let (status, body) = d
        .post(
            &api.url(),
            &format!("/v1/tenants/{tenant}/keys"),
            json!({"role": "member"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let member = body["key"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    for key in [
        member.as_str(),
        "gw_wrong_but_secret_value",
        d.env.admin_key.as_str(),
    ] {
        http.get(format!("{}/v1/tenants/{tenant}/vms", api.url()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
    }
    let log = api.log();
    assert!(
        log.contains(&format!("/v1/tenants/{tenant}/vms")),
        "the requests were logged:\n{log}"
    );
    for secret in [
        member.as_str(),
        "gw_wrong_but_secret_value",
        d.env.admin_key.as_str(),
    ] {
        assert!(!log.contains(secret), "a key leaked into the log");
    }
    assert!(
        !log.to_lowercase().contains("bearer "),
        "an Authorization header leaked into the log"
    );
}

/// A key revoked on one gateway stops working on every other within a second (the key
/// cache's promise), while a key in use is served from the cache.
#[tokio::test]
async fn a_key_revoked_on_one_replica_stops_working_on_another_within_a_second() {
    let d = common::Deployment::new(&common::pg_base(), &common::nats_url(), &[]).await;
    let [(a, ca), (b, cb)] = d.two_replicas().await;
    let t = d.tenant(&a.url()).await;
    let made = ca
        .post(&format!("/v1/tenants/{t}/keys"), json!({"role": "reader"}))
        .await;
    let (key, id) = (
        made.body["key"].as_str().unwrap().to_owned(),
        made.body["id"].as_str().unwrap().to_owned(),
    );
    let read = |c: &common::Client| {
        let (c, key, path) = (c.clone(), key.clone(), format!("/v1/tenants/{t}/vms"));
        async move { c.request(Method::GET, &path, Some(&key), None).await.status }
    };
    for _ in 0..20 {
        assert_eq!(read(&cb).await, StatusCode::OK);
    }
    let hits = d
        .metric(
            &b.url(),
            r#"gateway_cache_requests_total{cache="keys",result="hit"}"#,
        )
        .await;
    assert!(hits >= 19.0, "repeated uses come from the cache: {hits}");
    let revoked = ca
        .request(
            Method::DELETE,
            &format!("/v1/tenants/{t}/keys/{id}"),
            Some(&ca.admin_key),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(
        read(&ca).await,
        StatusCode::UNAUTHORIZED,
        "at once where it was revoked"
    );
    let started = std::time::Instant::now();
    common::eventually("the other replica refuses the key", || async {
        (read(&cb).await == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}
