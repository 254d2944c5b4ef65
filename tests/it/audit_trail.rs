//! An audit trail nothing can lose (issue 11 §3): a change's audit row commits with
//! the change, so a crash right after the answer keeps it; rows of requests refused
//! while PostgreSQL is down wait in a bounded spool and are written when it returns;
//! the sealer chains rows once they are final (their transaction older than every one
//! still running), and `verify` covers what was committed before it began.

use crate::common::{heavy, Deployment, Gateway, Postgres};
use crate::common::{nats_url, pg_base, spawn_with, Options};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

/// Status of the audit row of request `request_id`, if there is one.
async fn audited(pool: &sqlx::PgPool, request_id: &str) -> Option<i16> {
    sqlx::query_scalar("SELECT status FROM audit_log WHERE request_id = $1")
        .bind(request_id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Waits (at most 30 s) until `n` rows have request IDs starting with `prefix`.
async fn wait_rows(pool: &sqlx::PgPool, prefix: &str, n: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE request_id LIKE $1 || '%'")
                .bind(prefix)
                .fetch_one(pool)
                .await
                .unwrap_or(0);
        if count >= n || tokio::time::Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_202_is_audited_even_if_the_gateway_dies_right_after_it() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let mut api = Gateway::serve(&d.env).await;
    let tenant = d.tenant(&api.url()).await;
    let request_id = format!("crash-{}", crate::common::unique());
    let res = d
        .http
        .post(format!("{}/v1/tenants/{tenant}/vms", api.url()))
        .bearer_auth(&d.env.admin_key)
        .header("X-Request-Id", &request_id)
        .json(&json!({"name": "web", "zone": "zone-a", "spec": crate::common::example_spec("vms")}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // SIGKILL at once: nothing written after the answer survives, only what committed.
    api.kill();
    assert_eq!(audited(&d.pool, &request_id).await, Some(202));
    // The row is in the chain once a sealer runs (here: verify's).
    match gateway::audit::verify(&d.pool).await.unwrap() {
        gateway::audit::Verdict::Intact(n) => assert!(n >= 2, "{n}"),
        broken => panic!("{broken:?}"),
    }
    let sealed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id
                        WHERE a.request_id = $1)",
    )
    .bind(&request_id)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert!(sealed);
}

#[tokio::test]
async fn requests_refused_while_the_database_is_down_are_audited_when_it_returns() {
    let _heavy = heavy().await;
    let mut pg = Postgres::start();
    let d = Deployment::new(&pg.url(), &nats_url(), &[("GATEWAY_AUDIT_SPOOL", "3")]).await;
    let api = Gateway::serve(&d.env).await;
    let tenant = d.tenant(&api.url()).await;
    pg.crash();
    let sent = 10;
    for i in 0..sent {
        let res = d
            .http
            .post(format!("{}/v1/tenants/{tenant}/vms", api.url()))
            .bearer_auth(&d.env.admin_key)
            .header("X-Request-Id", format!("outage-{i}"))
            .json(&json!({"name": format!("web-{i}"), "zone": "zone-a", "spec": crate::common::example_spec("vms")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // A spool of 3 (and a batch of at most 3 in hand) cannot keep 10 rows: the rest is
    // counted lost, and operators are alerted on that counter.
    let lost = d
        .metric(&api.url(), "gateway_audit_write_errors_total")
        .await;
    assert!((4.0..=7.0).contains(&lost), "lost {lost}");
    pg.resume();
    let kept = sent - lost as i64;
    assert_eq!(wait_rows(&d.pool, "outage-", kept).await, kept);
    let statuses: Vec<i16> =
        sqlx::query_scalar("SELECT status FROM audit_log WHERE request_id LIKE 'outage-%'")
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(
        d.metric(&api.url(), "gateway_audit_spooled").await,
        0.0,
        "the spool drained"
    );
}

#[tokio::test]
async fn verify_seals_the_tail_and_sealing_never_changes_a_row() {
    let app = spawn_with(Options::api_only()).await;
    let mut conn = app.pool.acquire().await.unwrap();
    gateway::audit::append_batch(&mut conn, vec![entry("tail-1"), entry("tail-2")])
        .await
        .unwrap();
    // Unsealed rows cannot be changed either: only sealing them is allowed.
    let edit = sqlx::query("UPDATE audit_log SET status = 200 WHERE request_id = 'tail-1'")
        .execute(&app.pool)
        .await;
    assert!(edit.unwrap_err().to_string().contains("append-only"));
    match gateway::audit::verify(&app.pool).await.unwrap() {
        gateway::audit::Verdict::Intact(n) => assert!(n >= 2, "{n}"),
        broken => panic!("{broken:?}"),
    }
    let unsealed = gateway::store::audit::unsealed_count(&app.pool)
        .await
        .unwrap();
    assert_eq!(unsealed, 0);
    // A link is made once: changing or removing it is refused.
    let reseal = sqlx::query(
        "UPDATE audit_chain SET hash = sha256('x'), chain_seq = chain_seq + 1000
         WHERE audit_id = (SELECT id FROM audit_log WHERE request_id = 'tail-2')",
    )
    .execute(&app.pool)
    .await;
    assert!(reseal.unwrap_err().to_string().contains("append-only"));
    for refused in ["DELETE FROM audit_chain", "TRUNCATE audit_chain"] {
        let e = sqlx::query(refused).execute(&app.pool).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{refused}: {e}");
    }
    // Chain order is sealing order: places are dense from 1.
    let (places, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(chain_seq) FROM audit_chain")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(Some(places), max);
}

/// An audit row for request `request_id`, as the writer makes it.
fn entry(request_id: &str) -> gateway::audit::Entry {
    gateway::audit::Entry {
        at: chrono::Utc::now(),
        principal: None,
        tenant: Some("t".into()),
        action: "POST /v1/tenants".into(),
        target: "/v1/tenants".into(),
        status: 201,
        request_id: request_id.into(),
        source: None,
    }
}

/// Whether the row of `request_id` has its link in the chain.
async fn linked(pool: &sqlx::PgPool, request_id: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id
                        WHERE a.request_id = $1)",
    )
    .bind(request_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_row_committed_late_is_chained_after_it_commits_and_never_skipped() {
    let app = spawn_with(Options::api_only()).await;
    let tag = crate::common::unique();
    let (early, late) = (format!("early-{tag}"), format!("late-{tag}"));
    // The early row's transaction begins first and stays open while the late row
    // commits: its ID and transaction ID are lower, its commit later.
    let mut open = app.pool.begin().await.unwrap();
    gateway::audit::append_batch(&mut open, vec![entry(&early)])
        .await
        .unwrap();
    let mut conn = app.pool.acquire().await.unwrap();
    gateway::audit::append_batch(&mut conn, vec![entry(&late)])
        .await
        .unwrap();
    drop(conn);
    // While an older transaction runs, the late row is not final: sealing it now
    // would put it before a row that may still commit.
    gateway::audit::seal(&app.pool).await.unwrap();
    assert!(!linked(&app.pool, &late).await);
    // Nor does sealing everything committed so far: after waiting a while for the open
    // transaction, it says it could not, and verify checks what it could.
    assert!(
        !gateway::audit::seal_all(&app.pool, Duration::from_millis(200))
            .await
            .unwrap()
    );
    match gateway::audit::verify_within(&app.pool, Duration::from_millis(200))
        .await
        .unwrap()
    {
        gateway::audit::Verdict::Intact(_) => {}
        broken => panic!("{broken:?}"),
    }
    assert!(!linked(&app.pool, &late).await);
    // (The late row: the early one is not committed, so not seen yet.)
    let waiting = gateway::store::audit::unsealed_count(&app.pool)
        .await
        .unwrap();
    assert!(waiting >= 1, "{waiting}");
    open.commit().await.unwrap();
    assert!(gateway::audit::seal_all(&app.pool, Duration::from_secs(10))
        .await
        .unwrap());
    assert!(linked(&app.pool, &early).await && linked(&app.pool, &late).await);
    let places: Vec<i64> = sqlx::query_scalar(
        "SELECT c.chain_seq FROM audit_chain c JOIN audit_log a ON a.id = c.audit_id
         WHERE a.request_id IN ($1, $2) ORDER BY a.id",
    )
    .bind(&early)
    .bind(&late)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(places[0] < places[1], "{places:?}");
    match gateway::audit::verify(&app.pool).await.unwrap() {
        gateway::audit::Verdict::Intact(n) => assert!(n >= 2, "{n}"),
        broken => panic!("{broken:?}"),
    }
}

/// Appends one row for `request_id`, as the audit writer does.
async fn append(pool: &sqlx::PgPool, request_id: &str) {
    let mut conn = pool.acquire().await.unwrap();
    gateway::audit::append_batch(&mut conn, vec![entry(request_id)])
        .await
        .unwrap();
}

/// [`append`], then `verify` (which seals it) finds the chain intact.
async fn append_intact(pool: &sqlx::PgPool, request_id: &str) {
    append(pool, request_id).await;
    assert!(matches!(
        gateway::audit::verify(pool).await.unwrap(),
        gateway::audit::Verdict::Intact(_)
    ));
}

#[tokio::test]
async fn verify_finds_the_last_chained_row_removed() {
    let app = spawn_with(Options::api_only()).await;
    let request = format!("last-{}", crate::common::unique());
    append_intact(&app.pool, &request).await;
    // The newest link's row removed, bypassing the triggers: no row after it links to
    // it, so only its link can tell.
    let last: i64 =
        sqlx::query_scalar("SELECT audit_id FROM audit_chain ORDER BY chain_seq DESC LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    crate::common::tamper_and_verify(&app.pool, "DELETE FROM audit_log WHERE id = $1", last).await;
}

/// A row inserted behind the sealer, under a transaction ID below the chain's end (or
/// none), is never chained: the sealer only goes forward. `verify` names it all the
/// same, as a row the chain went past; before, it answered `Intact` while the trail
/// listed a row nothing sealed.
#[tokio::test]
async fn verify_finds_a_row_inserted_behind_the_sealer() {
    // A forged transaction ID, or none; an ID in the first range `verify` checks, or
    // past a few of them (it checks 50,000 IDs at a time).
    for (xid, ahead) in [("'1'", 1_000), ("NULL", 120_000)] {
        let app = spawn_with(Options::api_only()).await;
        let request = format!("before-{}", crate::common::unique());
        append_intact(&app.pool, &request).await;
        let forged: i64 = sqlx::query_scalar("SELECT max(id) + $1 FROM audit_log")
            .bind(ahead)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        let insert = format!(
            "INSERT INTO audit_log (id, at, action, target, outcome, status, request_id, xid)
             OVERRIDING SYSTEM VALUE
             VALUES ($1, now() - interval '1 day', 'DELETE /v1/tenants/{{tenant}}',
                     '/v1/tenants/acme', 'allowed', 202, 'forged', {xid})"
        );
        crate::common::tamper_and_verify(&app.pool, &insert, forged).await;
    }
}

/// The chain's end removed with its rows leaves a shorter chain that `verify` finds
/// intact; the sealer running in the API process notices that the last link it saw is
/// gone (and not before: ordinary sealing never trips it).
#[tokio::test]
async fn a_sealer_notices_the_end_of_the_chain_removed() {
    let app = spawn_with(Options::api_only()).await;
    let rewritten = "gateway_audit_chain_rewritten_total";
    let tag = crate::common::unique();
    for i in 0..3 {
        let request = format!("end-{tag}-{i}");
        append(&app.pool, &request).await;
        let chained = || async { linked(&app.pool, &request).await.then_some(()) };
        crate::common::eventually("the row is chained", chained).await;
    }
    // A pass or two after the last link: the sealer has seen it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(crate::common::metric(&app.url, rewritten).await, 0.0);
    // The newest two rows and their links removed, the triggers bypassed.
    crate::common::tamper(
        &app.pool,
        "WITH gone AS (DELETE FROM audit_chain WHERE chain_seq > (SELECT max(chain_seq) - 2
                                                             FROM audit_chain)
                       RETURNING audit_id)
         DELETE FROM audit_log WHERE id IN (SELECT audit_id FROM gone)",
        None,
    )
    .await;
    // The shorter chain checks out, and new rows are chained after its end (by
    // verify, or by the sealer if it passes first), so the place of the link the
    // sealer saw last is taken again, by a link with another hash.
    for i in 0..3 {
        append_intact(&app.pool, &format!("after-{tag}-{i}")).await;
    }
    // The sealer notices all the same: that link is gone or different.
    let noticed =
        || async { (crate::common::metric(&app.url, rewritten).await >= 1.0).then_some(()) };
    crate::common::eventually("the sealer notices the rewrite", noticed).await;
}

/// The end of the chain, as the sealer sees it: its last link's place and hash.
async fn chain_end(pool: &sqlx::PgPool) -> Option<(i64, Vec<u8>)> {
    let mut conn = pool.acquire().await.unwrap();
    let head = gateway::store::audit::chain_head(&mut conn).await.unwrap();
    head.map(|h| (h.chain_seq, h.hash))
}

/// The watch step by step: a chain that grows never trips it; a link it saw that is
/// now another link at the same place (the end removed, then the chain regrown past
/// it) does, once.
#[tokio::test]
async fn the_chain_watch_trips_on_a_link_replaced_not_on_growth() {
    let app = spawn_with(Options::api_only()).await;
    let metrics = gateway::metrics::Metrics::default();
    let mut watch = gateway::audit::ChainWatch::default();
    let tag = crate::common::unique();
    for i in 0..3 {
        append_intact(&app.pool, &format!("grow-{tag}-{i}")).await;
        let end = chain_end(&app.pool).await;
        watch.check(&app.pool, &metrics, end).await.unwrap();
    }
    assert_eq!(metrics.audit_chain_rewritten.get(), 0);
    // The last link and its row removed, and a new row chained in its place.
    let (seen, hash) = chain_end(&app.pool).await.unwrap();
    crate::common::tamper(
        &app.pool,
        "WITH gone AS (DELETE FROM audit_chain WHERE chain_seq = $1 RETURNING audit_id)
         DELETE FROM audit_log WHERE id IN (SELECT audit_id FROM gone)",
        Some(seen),
    )
    .await;
    append_intact(&app.pool, &format!("instead-{tag}")).await;
    let end = chain_end(&app.pool).await;
    assert_eq!(end.as_ref().map(|e| e.0), Some(seen));
    assert_ne!(end.as_ref().map(|e| &e.1), Some(&hash));
    watch.check(&app.pool, &metrics, end.clone()).await.unwrap();
    assert_eq!(metrics.audit_chain_rewritten.get(), 1);
    // Counted once: it goes on from the chain as it is now.
    watch.check(&app.pool, &metrics, end.clone()).await.unwrap();
    assert_eq!(metrics.audit_chain_rewritten.get(), 1);
    // An idle chain (the end read is the link seen last) costs no query: not even a
    // pool that reaches no database fails it.
    let nowhere = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    watch.check(&nowhere, &metrics, end).await.unwrap();
    assert_eq!(metrics.audit_chain_rewritten.get(), 1);
}

/// `seal_all` (and so `verify`) waits for a transaction that wrote before it began,
/// and seals its rows, even when that transaction ends right after a pass that found
/// nothing final. Two faults let it stop short, each leaving `verify` an intact chain
/// without those rows: it took a snapshot's `xmax` for "every transaction begun so far
/// is below this", which a running transaction's own ID can equal, so it did not wait
/// at all; and it asked whether those transactions had ended *after* an empty pass, so
/// one ending in between was never sealed.
#[tokio::test]
async fn sealing_everything_takes_the_rows_of_a_transaction_ending_right_after_an_empty_pass() {
    let app = spawn_with(Options::api_only()).await;
    let request = format!("ending-{}", crate::common::unique());
    let mut open = app.pool.begin().await.unwrap();
    gateway::audit::append_batch(&mut open, vec![entry(&request)])
        .await
        .unwrap();
    // The open transaction is the newest to have written (no transaction has ended
    // since it began): sealing everything waits for it, and says when it could not.
    assert!(
        !gateway::audit::seal_all(&app.pool, Duration::from_millis(200))
            .await
            .unwrap()
    );
    assert!(!linked(&app.pool, &request).await);
    let (got_there, go_on) = app.pause(gateway::pause::Point::AfterAnEmptySealingPass);
    let pool = app.pool.clone();
    let sealing =
        tokio::spawn(async move { gateway::audit::seal_all(&pool, Duration::from_secs(10)).await });
    // Its pass found nothing final: the row's transaction is open.
    got_there.await.unwrap();
    open.commit().await.unwrap();
    go_on.send(()).unwrap();
    assert!(sealing.await.unwrap().unwrap());
    assert!(linked(&app.pool, &request).await);
}

/// The chain's end saved on the deployment's broker (`OPS-AUDIT`), as a sealer left it.
async fn saved_end(d: &Deployment) -> Option<(i64, Vec<u8>)> {
    let anchor = gateway::audit::anchor::Anchor::new(d.jetstream().await, &d.names);
    anchor.read().await.ok()?.end
}

/// Appends a row and waits until a sealer has chained it and saved the chain's end on
/// the broker; answers that end.
async fn append_saved(d: &Deployment, request_id: &str) -> (i64, Vec<u8>) {
    append(&d.pool, request_id).await;
    crate::common::eventually("the row is chained and the end saved", || async {
        if !linked(&d.pool, request_id).await {
            return None;
        }
        let end = chain_end(&d.pool).await?;
        (saved_end(d).await.as_ref() == Some(&end)).then_some(end)
    })
    .await
}

/// `gateway admin verify-audit` on `d`'s database, and on its broker `with_broker`.
fn verify_audit(d: &Deployment, with_broker: bool) -> std::process::Output {
    let mut command = d.env.command(&["admin", "verify-audit"]);
    if !with_broker {
        command.env_remove("NATS_URL");
    }
    command.output().unwrap()
}

/// The end removed while no gateway runs, which no sealer's memory can see: the end
/// saved on the broker shows it to the next gateway that starts, once; a gateway that
/// starts on an untouched chain says nothing.
#[tokio::test]
async fn a_gateway_that_starts_notices_the_end_removed_while_none_ran() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let rewritten = "gateway_audit_chain_rewritten_total";
    let tag = crate::common::unique();
    let mut api = Gateway::serve(&d.env).await;
    for i in 0..3 {
        append_saved(&d, &format!("first-{tag}-{i}")).await;
    }
    api.kill();

    // Restarted on the chain as it was: the saved end is there; the new end is saved
    // past it, and nothing is said.
    let mut api = Gateway::serve(&d.env).await;
    let end = append_saved(&d, &format!("second-{tag}")).await;
    assert_eq!(d.metric(&api.url(), rewritten).await, 0.0, "{}", api.log());
    api.kill();
    let verified = verify_audit(&d, true);
    assert!(verified.status.success(), "{verified:?}");
    let out = String::from_utf8_lossy(&verified.stdout);
    assert!(
        out.contains(&format!(
            "saved on the broker (link {}) is in the chain",
            end.0
        )),
        "{out}"
    );

    // While no gateway runs, the newest two rows and their links are removed and a
    // row is chained in their place (as `verify` would): a chain that checks out.
    crate::common::tamper(
        &d.pool,
        "WITH gone AS (DELETE FROM audit_chain WHERE chain_seq > $1 - 2 RETURNING audit_id)
         DELETE FROM audit_log WHERE id IN (SELECT audit_id FROM gone)",
        Some(end.0),
    )
    .await;
    append_intact(&d.pool, &format!("instead-{tag}")).await;
    assert!(chain_end(&d.pool).await.unwrap().0 < end.0);
    assert_eq!(saved_end(&d).await, Some(end.clone()));
    // `verify-audit` finds the chain intact, but not the end saved on the broker: it
    // fails, naming that link. Without the broker's address it says what it left out.
    let verified = verify_audit(&d, true);
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(!verified.status.success(), "{verified:?}");
    assert!(
        err.contains(&format!("saved on the broker (link {}) is gone", end.0)),
        "{err}"
    );
    let verified = verify_audit(&d, false);
    assert!(verified.status.success(), "{verified:?}");
    assert!(String::from_utf8_lossy(&verified.stdout).contains("not compared"));
    // A broker it cannot reach: it cannot say, so it does not pass.
    let verified = d
        .env
        .command(&["admin", "verify-audit"])
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!verified.status.success(), "{verified:?}");
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(
        err.contains("comparing with the chain's end saved on the broker"),
        "{err}"
    );

    // The next gateway notices, says which link, and saves the chain as it is now.
    let api = Gateway::serve(&d.env).await;
    let noticed = || async { (d.metric(&api.url(), rewritten).await >= 1.0).then_some(()) };
    crate::common::eventually("the new gateway notices the rewrite", noticed).await;
    let now = chain_end(&d.pool).await;
    crate::common::eventually("the chain as it is now is saved", || async {
        (saved_end(&d).await == now).then_some(())
    })
    .await;
    assert!(
        api.log()
            .contains("the chain's end saved on the broker is gone"),
        "{}",
        api.log()
    );
    // Once: later passes, and the rows chained after, do not count it again.
    append_saved(&d, &format!("after-{tag}")).await;
    assert_eq!(d.metric(&api.url(), rewritten).await, 1.0);
    assert_eq!(
        d.metric(&api.url(), "gateway_audit_anchor_errors_total")
            .await,
        0.0
    );
}

/// Two replicas seal the same chain and both save its end: the saved end only moves
/// forward, always names a link that is in the chain, and reaches the chain's end.
#[tokio::test]
async fn replicas_save_the_chains_end_forward_only() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let [(a, _), (b, _)] = d.two_replicas().await;
    let tag = crate::common::unique();
    let mut seen = 0;
    for i in 0..40 {
        append(&d.pool, &format!("both-{tag}-{i}")).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if let Some((seq, hash)) = saved_end(&d).await {
            assert!(seq >= seen, "the saved end went back from {seen} to {seq}");
            let link: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT hash FROM audit_chain WHERE chain_seq = $1")
                    .bind(seq)
                    .fetch_optional(&d.pool)
                    .await
                    .unwrap();
            assert_eq!(link, Some(hash), "the saved end is not a link of the chain");
            seen = seq;
        }
    }
    append_saved(&d, &format!("last-{tag}")).await;
    for api in [&a, &b] {
        for series in [
            "gateway_audit_chain_rewritten_total",
            "gateway_audit_anchor_errors_total",
        ] {
            assert_eq!(d.metric(&api.url(), series).await, 0.0, "{series}");
        }
    }
}

/// Without its stream (a deployment whose `gateway migrate` has not run since the
/// stream came), the end cannot be saved: sealing goes on, the failures are counted,
/// and the end is saved once the stream is there.
#[tokio::test]
async fn sealing_goes_on_while_the_end_cannot_be_saved() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let js = d.jetstream().await;
    js.delete_stream(d.names.audit_stream()).await.unwrap();
    let api = Gateway::serve(&d.env).await;
    let tag = crate::common::unique();
    chained_but_not_saved(&d, &api, &[format!("unsaved-{tag}")]).await;
    assert!(
        api.log().contains("could not read or save the chain's end"),
        "{}",
        api.log()
    );

    // `gateway migrate` again: the stream is back, and the end is saved at the next try.
    let env = d.env.clone();
    tokio::task::spawn_blocking(move || Gateway::migrate(&env))
        .await
        .unwrap();
    saved_again(&d, &api).await;
}

/// Appends rows for `requests` and waits until the API's sealer chained them while it
/// could not save the chain's end (the failure counted).
async fn chained_but_not_saved(d: &Deployment, api: &Gateway, requests: &[String]) {
    for request in requests {
        append(&d.pool, request).await;
        let chained = || async { linked(&d.pool, request).await.then_some(()) };
        crate::common::eventually("the row is chained all the same", chained).await;
    }
    let errors = "gateway_audit_anchor_errors_total";
    let counted = || async { (d.metric(&api.url(), errors).await >= 1.0).then_some(()) };
    crate::common::eventually("the failure is counted", counted).await;
}

/// Waits until the chain's end is saved again (at the sealer's next try), and checks
/// that nothing was taken for a rewrite.
async fn saved_again(d: &Deployment, api: &Gateway) {
    let end = chain_end(&d.pool).await;
    // (`eventually` waits 30 s: three times the pause after a failure.)
    assert!(gateway::audit::anchor::RETRY * 3 <= Duration::from_secs(30));
    crate::common::eventually("the end is saved again", || async {
        (saved_end(d).await == end).then_some(())
    })
    .await;
    assert_eq!(
        d.metric(&api.url(), "gateway_audit_chain_rewritten_total")
            .await,
        0.0
    );
}

/// While the broker is away, sealing goes on (a step that cannot reach it gives up
/// after 2 s, and the next try waits 10 s), the failures are counted, and the end is
/// saved once the broker is back.
#[tokio::test]
async fn sealing_goes_on_while_the_broker_is_away() {
    let _heavy = heavy().await;
    let mut nats = crate::common::Nats::start();
    let d = Deployment::new(&pg_base(), &nats.url(), &[]).await;
    let api = Gateway::serve(&d.env).await;
    let tag = crate::common::unique();
    append_saved(&d, &format!("before-{tag}")).await;
    nats.kill();
    let away: Vec<String> = (0..3).map(|i| format!("away-{tag}-{i}")).collect();
    chained_but_not_saved(&d, &api, &away).await;
    nats.resume();
    saved_again(&d, &api).await;
}
