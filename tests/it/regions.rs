//! Two real regions (issue 13 §1): two databases, two NATS servers in JetStream domains
//! `r1` and `r2` linked as NATS leaf nodes through a [`Link`] the test can cut, and a
//! `gateway up` in each (API, relay, reconciler, simulated workers for its own zones).
//! Region 1 owns `zone-a` and `zone-b`, region 2 owns `zone-c`.

use crate::common::link::Link;
use crate::common::{
    free_port, heavy_alone, id_of, nats_url, pg_base, unique, Answer, Client, Gateway, GatewayEnv,
    Nats, Postgres, Sandbox, TempDir,
};
use gateway::config::{NatsNames, RegionSettings};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ADMIN: &str = "regions-admin-key-0123456789";

/// One region: its database, NATS server and `gateway up`.
struct Region {
    name: &'static str,
    client: Client,
    pool: sqlx::PgPool,
    // Dropped in this order: the gateway, then NATS, then the database.
    names: NatsNames,
    env: GatewayEnv,
    port: u16,
    up: Gateway,
    _nats: Nats,
    _dir: TempDir,
    _sandbox: Sandbox,
    /// A private PostgreSQL (the region's database server), when the test stops it.
    pg: Option<Postgres>,
}

impl Region {
    /// The subjects of this region's events stream matching `filter`.
    async fn event_subjects(&self, filter: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let js = async_nats::jetstream::new(async_nats::connect(self._nats.url()).await.unwrap());
        let stream = js.get_stream(self.names.events_stream()).await.unwrap();
        let subjects = stream.info_with_subjects(filter).await.unwrap();
        let found: Vec<(String, usize)> = subjects.try_collect().await.unwrap();
        found.into_iter().map(|(s, _)| s).collect()
    }

    /// Starts region `name` owning `zones`, its NATS server configured by `leaf`.
    async fn start(
        name: &'static str,
        zones: &str,
        peer: &str,
        names: &NatsNames,
        leaf: RegionSettings,
        pg: Option<Postgres>,
    ) -> Self {
        let dir = TempDir::new(&format!("gwtest-{name}"));
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "jetstream {{ store_dir: \"{}\", domain: \"{name}\" }}\n{}",
                dir.path().join("js").display(),
                gateway::broker::leafnodes_conf(names, &leaf)
            ),
        )
        .unwrap();
        let nats = Nats::start_with_config(Some(conf));
        let pg_server = pg.as_ref().map_or_else(pg_base, Postgres::url);
        let sandbox = Sandbox::new(&pg_server, &nats.url());
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let extra = [
            ("GATEWAY_REGION", name),
            ("GATEWAY_REGION_ZONES", zones),
            ("GATEWAY_REGION_PEERS", peer),
            ("GATEWAY_PUBLIC_URL", &url),
            ("GATEWAY_REPLICATION_HEARTBEAT_MS", "200"),
            ("METRICS_REFRESH_MS", "200"),
            ("SIM_MIN_LATENCY_MS", "5"),
            ("SIM_MAX_LATENCY_MS", "20"),
            ("GATEWAY_DATA_DIR", dir.path().to_str().unwrap()),
        ];
        let env = GatewayEnv {
            database_url: sandbox.database_url(),
            nats_url: nats.url(),
            admin_key: ADMIN.into(),
            stream: names.stream.clone(),
            subject_prefix: names.subject_prefix.clone(),
            events_prefix: names.events_prefix.clone(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let up = Gateway::up(&env, port).await;
        Self {
            name,
            client: Client {
                url,
                admin_key: ADMIN.into(),
                http: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap(),
            },
            pool: sqlx::PgPool::connect_lazy(&sandbox.database_url()).unwrap(),
            names: names.clone(),
            env,
            port,
            up,
            _nats: nats,
            _dir: dir,
            _sandbox: sandbox,
            pg,
        }
    }

    /// `SIGKILL`s its `gateway up` (a crash: relay, applier and API die wherever they are)
    /// and starts it again on the same port.
    async fn crash_and_restart(&mut self) {
        self.up.kill();
        self.up = Gateway::up(&self.env, self.port).await;
    }

    /// Whether this region has applied anything from its peer yet (a heartbeat at least).
    async fn hears_peer(&self) -> bool {
        sqlx::query_scalar("SELECT coalesce(max(applied_hlc), 0) > 1 FROM replication_peers")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
    }

    /// What its NATS says of the sourcing of the peer's stream, for failure messages.
    async fn link_state(&self) -> String {
        let js = async_nats::jetstream::new(async_nats::connect(self._nats.url()).await.unwrap());
        match js.get_stream("REPLICATION-IN").await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => format!("{:?} messages {}", info.sources, info.state.messages),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    /// Revokes a key of `tenant` here, which must succeed.
    async fn revoke(&self, tenant: &str, key_id: &str) {
        let path = format!("/v1/tenants/{tenant}/keys/{key_id}");
        let a = self.call(Method::DELETE, &path, ADMIN, None).await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{:?}", a.body);
    }

    /// Creates a tenant with a unique ID here; returns the ID.
    async fn new_tenant(&self) -> String {
        let tenant = format!("t-{}", unique());
        let body = json!({"id": tenant});
        let a = self
            .call(Method::POST, "/v1/tenants", ADMIN, Some(body))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        tenant
    }

    async fn tenants_like(&self, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id LIKE $1 || '%'")
            .bind(prefix)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn call(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
        self.client
            .request(method, path, Some(key), body.as_ref())
            .await
    }
}

/// Settings of a region's NATS link: region 1 accepts leaf connections on `port`,
/// region 2 connects to `remote` (the link): region 1 advertises the link, so region 2
/// reconnects through it too, and cutting the link cuts them off.
fn leaf(name: &str, port: Option<u16>, remote: Option<u16>) -> RegionSettings {
    RegionSettings {
        name: name.into(),
        zones: vec![],
        peers: vec![],
        heartbeat: Duration::from_secs(1),
        leaf_port: port,
        leaf_remotes: remote
            .map(|p| format!("nats-leaf://leaf:linkpw@127.0.0.1:{p}"))
            .into_iter()
            .collect(),
        leaf_password: Some(gateway::config::Secret::new("linkpw".to_owned())),
        leaf_advertise: None,
    }
}

/// Both regions, linked. The same stream and subject names in both, as two copies of
/// one deployment would have: the link must keep them apart.
async fn two_regions() -> (Region, Region, Link) {
    two_regions_with(None).await
}

/// [`two_regions`], region 2's database on `pg` if given.
async fn two_regions_with(pg: Option<Postgres>) -> (Region, Region, Link) {
    let names = Sandbox::new(&pg_base(), &nats_url()).names.clone();
    let leaf_port = free_port();
    let link = Link::start(leaf_port).await;
    let (r1, r2) = tokio::join!(
        Region::start(
            "r1",
            "zone-a,zone-b",
            "r2",
            &names,
            RegionSettings {
                leaf_advertise: Some(format!("127.0.0.1:{}", link.port)),
                ..leaf("r1", Some(leaf_port), None)
            },
            None,
        ),
        Region::start(
            "r2",
            "zone-c",
            "r1",
            &names,
            leaf("r2", None, Some(link.port)),
            pg,
        ),
    );
    // The link between the regions' NATS servers and the sourcing of each other's streams
    // come up in a moment (the leaf connection retries, JetStream retries its sources):
    // every test starts from replication that works.
    let started = Instant::now();
    while !(r1.hears_peer().await && r2.hears_peer().await) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "replication did not start within 60 s: r1 {}; r2 {}",
            r1.link_state().await,
            r2.link_state().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (r1, r2, link)
}

/// Polls `check` every 100 ms until it holds; fails after `limit`. Returns the time taken.
async fn within<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Follows one `307` by hand (the client under test does not), keeping method and body.
async fn follow(
    r: &Region,
    answer: Answer,
    method: Method,
    key: &str,
    body: Option<Value>,
) -> Answer {
    assert_eq!(
        answer.status,
        StatusCode::TEMPORARY_REDIRECT,
        "{:?}",
        answer.body
    );
    assert_eq!(answer.code(), "other_region");
    let location = answer.header("location").unwrap().to_owned();
    let res = r
        .client
        .http
        .request(method, &location)
        .bearer_auth(key)
        .json(&body.unwrap_or(Value::Null))
        .send()
        .await
        .unwrap();
    Answer::read(res).await
}

/// Waits until operation `location` (absolute) ends; returns its state.
async fn finished(r: &Region, location: &str, key: &str) -> String {
    let started = Instant::now();
    loop {
        let res = r
            .client
            .http
            .get(location)
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let a = Answer::read(res).await;
        let state = a.body["state"].as_str().unwrap_or("").to_owned();
        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            return state;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{location}: {:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates tenants `{prefix}-{from}` up to `{prefix}-{to}` (excluded) in `r`.
async fn make_tenants(r: &Region, prefix: &str, from: usize, to: usize) {
    for i in from..to {
        let body = json!({"id": format!("{prefix}-{i}")});
        let a = r
            .client
            .request(Method::POST, "/v1/tenants", Some(ADMIN), Some(&body))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    }
}

async fn metric(r: &Region, series: &str) -> f64 {
    crate::common::metric(&r.client.url, series).await
}

async fn new_owner_key(r: &Region, tenant: &str) -> (String, String) {
    let a = r
        .call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/keys"),
            ADMIN,
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    (
        a.body["key"].as_str().unwrap().to_owned(),
        a.body["id"].as_str().unwrap().to_owned(),
    )
}

async fn works(r: &Region, tenant: &str, key: &str) -> bool {
    r.call(Method::GET, &format!("/v1/tenants/{tenant}"), key, None)
        .await
        .status
        == StatusCode::OK
}

#[tokio::test]
async fn two_regions_share_tenants_and_keys_and_send_clients_where_things_live() {
    let _heavy = heavy_alone().await;
    let (r1, r2, _link) = two_regions().await;

    // Each knows the other's zones, and says which region owns each.
    for r in [&r1, &r2] {
        within("zones are replicated", Duration::from_secs(10), || async {
            let zones = r.call(Method::GET, "/v1/zones", ADMIN, None).await.body;
            let region_of = |z: &str| {
                zones
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == z)
                    .map(|e| e["region"].clone())
            };
            region_of("zone-a") == Some(json!("r1")) && region_of("zone-c") == Some(json!("r2"))
        })
        .await;
    }

    // A tenant and a key made in region 1 work in region 2 within 5 s.
    let tenant = r1.new_tenant().await;
    let (key, key_id) = new_owner_key(&r1, &tenant).await;
    let took = within(
        "a region-1 key works in region 2",
        Duration::from_secs(5),
        || works(&r2, &tenant, &key),
    )
    .await;
    eprintln!("key replicated to region 2 in {took:?}");

    // A create of a zone-c VM sent to region 1 is redirected to region 2 (307, method and
    // body kept, Location absolute) and ends as a ready VM there.
    let path = format!("/v1/tenants/{tenant}/vms");
    let body = json!({"name": "far", "zone": "zone-c", "spec": {"flavor": "m1.small", "image": "debian-12"}});
    let first = r1.call(Method::POST, &path, &key, Some(body.clone())).await;
    assert_eq!(
        first.header("location"),
        Some(format!("{}{path}", r2.client.url).as_str())
    );
    let accepted = follow(&r1, first, Method::POST, &key, Some(body)).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{:?}", accepted.body);
    let op_location = accepted.header("location").unwrap().to_owned();
    assert!(op_location.starts_with(&r2.client.url), "{op_location}");
    assert_eq!(finished(&r2, &op_location, &key).await, "succeeded");
    let vm_id = accepted.body["resource_id"].as_str().unwrap().to_owned();
    let vm = r2
        .call(Method::GET, &format!("{path}/{vm_id}"), &key, None)
        .await;
    assert_eq!(vm.body["phase"], "ready", "{:?}", vm.body);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&r1.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "region 1 holds no copy of region 2's resources");
    // Both regions use the same stream and subject names: the link kept region 2's
    // events out of region 1's events stream.
    let zone_c = format!("{}.*.*.zone-c", r1.names.events_prefix);
    assert!(!r2.event_subjects(&zone_c).await.is_empty());
    assert!(
        r1.event_subjects(&zone_c).await.is_empty(),
        "region 2's events crossed the link"
    );

    // Region 1 sends reads of region 2's VM and operation there too.
    for p in [
        format!("{path}/{vm_id}"),
        format!("/v1/operations/{}", id_of(&accepted.body)),
    ] {
        let a = r1.call(Method::GET, &p, &key, None).await;
        assert_eq!(
            a.status,
            StatusCode::TEMPORARY_REDIRECT,
            "{p}: {:?}",
            a.body
        );
        assert_eq!(
            a.header("location"),
            Some(format!("{}{p}", r2.client.url).as_str())
        );
    }
    // And lists of its zone: its resources, and its operations.
    let a = r1
        .call(Method::GET, &format!("{path}?zone=zone-c"), &key, None)
        .await;
    assert_eq!(a.status, StatusCode::TEMPORARY_REDIRECT);
    let ops = format!("/v1/tenants/{tenant}/operations?zone=zone-c");
    let a = r1.call(Method::GET, &ops, &key, None).await;
    assert_eq!(a.status, StatusCode::TEMPORARY_REDIRECT, "{:?}", a.body);
    assert_eq!(
        a.header("location"),
        Some(format!("{}{ops}", r2.client.url).as_str())
    );

    // A report on region 2's operation sent to region 1: alone it is redirected; in a
    // batch, its result says what the single answer would have (307 other_region, with
    // the address to report to), and a report about an ID nobody made is still 404.
    let op_id = id_of(&accepted.body);
    let report = json!({"attempt": 1, "state": "running"});
    let alone = r1
        .call(
            Method::POST,
            &format!("/v1/operations/{op_id}/reports"),
            ADMIN,
            Some(report.clone()),
        )
        .await;
    assert_eq!(
        alone.status,
        StatusCode::TEMPORARY_REDIRECT,
        "{:?}",
        alone.body
    );
    let nobodys = uuid::Uuid::new_v4();
    let batch = json!({"reports": [
        {"operation_id": op_id, "report": report},
        {"operation_id": nobodys, "report": report},
    ]});
    let answer = r1
        .call(Method::POST, "/v1/reports", ADMIN, Some(batch))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let results = answer.body["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 307, "{:?}", results[0]);
    assert_eq!(results[0]["code"], "other_region");
    let message = results[0]["message"].as_str().unwrap();
    let there = format!("{}/v1/operations/{op_id}/reports", r2.client.url);
    assert!(
        message.contains(&there) && message.contains("r2"),
        "{message}"
    );
    assert_eq!(results[1]["status"], 404, "{:?}", results[1]);

    // A revocation in region 2 stops the key in region 1 within 5 s.
    r2.revoke(&tenant, &key_id).await;
    let took = within(
        "the revocation reaches region 1",
        Duration::from_secs(5),
        || async {
            r1.call(Method::GET, &format!("/v1/tenants/{tenant}"), &key, None)
                .await
                .status
                == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    eprintln!("revocation replicated to region 1 in {took:?}");

    // Replication lag is on /metrics, per peer.
    for (r, peer) in [(&r1, "r2"), (&r2, "r1")] {
        let lag = metric(
            r,
            &format!("gateway_replication_lag_seconds{{peer=\"{peer}\"}}"),
        )
        .await;
        assert!(lag < 5.0, "{}: lag {lag}", r.name);
    }
}

#[tokio::test]
async fn while_cut_off_each_region_works_alone_and_after_the_link_returns_they_converge() {
    let _heavy = heavy_alone().await;
    let (r1, r2, link) = two_regions().await;
    let tenant = r1.new_tenant().await;
    let (key, key_id) = new_owner_key(&r1, &tenant).await;
    within("the key reaches region 2", Duration::from_secs(5), || {
        works(&r2, &tenant, &key)
    })
    .await;

    link.cut();
    // Region 2 revokes the key; region 1, not knowing, still accepts it, and changes the
    // same key later (a newer write, by the clock) without the revocation.
    r2.revoke(&tenant, &key_id).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    sqlx::query(
        "UPDATE principals SET expires_at = now() + interval '30 days' WHERE id = $1::uuid",
    )
    .bind(&key_id)
    .execute(&r1.pool)
    .await
    .unwrap();
    // Conflicting quotas: region 1 first, region 2 later.
    let quota =
        |limit: i64| json!({"limits": [{"dimension": "count", "kind": "vm", "limit": limit}]});
    let quotas = format!("/v1/tenants/{tenant}/quotas");
    assert_eq!(
        r1.call(Method::PUT, &quotas, ADMIN, Some(quota(7)))
            .await
            .status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        r2.call(Method::PUT, &quotas, ADMIN, Some(quota(9)))
            .await
            .status,
        StatusCode::OK
    );
    // Both keep accepting and finishing work in their own zones.
    for (r, zone) in [(&r1, "zone-a"), (&r2, "zone-c")] {
        let body = json!({"name": format!("cut-{zone}"), "zone": zone, "spec": {"flavor": "m1.small", "image": "debian-12"}});
        let a = r
            .call(
                Method::POST,
                &format!("/v1/tenants/{tenant}/vms"),
                ADMIN,
                Some(body),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}: {:?}", r.name, a.body);
        let location = a.header("location").unwrap().to_owned();
        assert_eq!(
            finished(r, &location, ADMIN).await,
            "succeeded",
            "{}",
            r.name
        );
    }
    assert!(
        works(&r1, &tenant, &key).await,
        "region 1 has not heard of the revocation"
    );
    // The cut shows: region 1's view of region 2 grows old.
    within("region 1's lag grows", Duration::from_secs(10), || async {
        metric(&r1, "gateway_replication_lag_seconds{peer=\"r2\"}").await > 2.0
    })
    .await;

    link.restore();
    // They converge with no manual step: the later quota everywhere, and the revocation
    // wins over region 1's newer change of the key (which is kept otherwise).
    for r in [&r1, &r2] {
        within("the quotas converge", Duration::from_secs(15), || async {
            let q = r.call(Method::GET, &quotas, ADMIN, None).await.body;
            q["limits"][0]["limit"] == 9
        })
        .await;
        within("the revocation wins", Duration::from_secs(15), || async {
            !works(r, &tenant, &key).await
        })
        .await;
    }
    let sql = "SELECT revoked_at IS NOT NULL, expires_at IS NOT NULL, hlc, origin FROM principals WHERE id = $1::uuid";
    let key_row = |r: &Region| {
        let (pool, key_id) = (r.pool.clone(), key_id.clone());
        async move {
            sqlx::query_as::<_, (bool, bool, i64, String)>(sql)
                .bind(key_id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    within(
        "both regions hold the same key row",
        Duration::from_secs(15),
        || async { key_row(&r1).await == key_row(&r2).await },
    )
    .await;
    let a = key_row(&r1).await;
    assert_eq!(
        (a.0, a.1, a.3.as_str()),
        (true, true, "r1"),
        "revoked, with region 1's later change"
    );
    within(
        "the lag comes back down",
        Duration::from_secs(10),
        || async { metric(&r1, "gateway_replication_lag_seconds{peer=\"r2\"}").await < 2.0 },
    )
    .await;

    // A deletion (no limits: no quota row) reaches the other region, and its tombstone
    // goes once the peer has said it applied it, everywhere but in the region that
    // deleted it (which keeps its own for good).
    let none = json!({"limits": []});
    assert_eq!(
        r1.call(Method::PUT, &quotas, ADMIN, Some(none))
            .await
            .status,
        StatusCode::OK
    );
    for r in [&r1, &r2] {
        within(
            "the deletion and others' tombstones are gone",
            Duration::from_secs(10),
            || async {
                let (rows, own): (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM quotas)
                        + (SELECT count(*) FROM replication_tombstones WHERE origin <> $1),
                        (SELECT count(*) FROM replication_tombstones WHERE origin = $1)",
                )
                .bind(r.name)
                .fetch_one(&r.pool)
                .await
                .unwrap();
                rows == 0 && metric(r, "gateway_replication_tombstones").await == own as f64
            },
        )
        .await;
    }
    let own: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM replication_tombstones WHERE tbl = 'quotas' AND origin = 'r1'",
    )
    .fetch_one(&r1.pool)
    .await
    .unwrap();
    assert_eq!(own, 1, "region 1 keeps the tombstone of its own deletion");
}

/// A region that crashes while its changes are being published, or while it applies the
/// other's, loses nothing: its log is in its database until JetStream has it, and what
/// it had not applied is still in its stream consumer.
#[tokio::test]
async fn a_region_that_crashes_mid_replication_loses_nothing() {
    let _heavy = heavy_alone().await;
    let (mut r1, mut r2, _link) = two_regions().await;
    let prefix = format!("c-{}", &unique()[..6]);
    // Region 1 crashes right after making 40 tenants, its relay publishing them.
    make_tenants(&r1, &prefix, 0, 40).await;
    r1.crash_and_restart().await;
    // Region 2 crashes while the next 40 arrive, its relay applying them.
    make_tenants(&r1, &prefix, 40, 80).await;
    r2.crash_and_restart().await;
    for r in [&r1, &r2] {
        let started = Instant::now();
        while r.tenants_like(&prefix).await != 80 {
            if started.elapsed() > Duration::from_secs(20) {
                let state: (i64, i64, i64) = sqlx::query_as(
                    "SELECT (SELECT applied_seq FROM replication_clock),
                            (SELECT count(*) FROM replication_log),
                            (SELECT count(*) FROM replication_parked)",
                )
                .fetch_one(&r.pool)
                .await
                .unwrap();
                let have: Vec<String> =
                    sqlx::query_scalar("SELECT id FROM tenants WHERE id LIKE $1 || '-%'")
                        .bind(&prefix)
                        .fetch_all(&r.pool)
                        .await
                        .unwrap();
                let missing: Vec<String> = (0..80)
                    .map(|i| format!("{prefix}-{i}"))
                    .filter(|t| !have.contains(t))
                    .collect();
                panic!(
                    "{}: {} of 80 tenants after 20 s (missing {missing:?}); applied_seq, log, \
                     parked: {state:?}; inbound stream: {}\n{}",
                    r.name,
                    have.len(),
                    r.link_state().await,
                    r.up.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM replication_log WHERE tbl <> '_heartbeat'")
            .fetch_one(&r1.pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "region 1 published its whole log");
}

/// A region whose NATS store is lost (a disk replaced) while it is down sends its peer
/// every change it makes afterwards, and its older rows again. Its outbound stream,
/// made anew, numbered its messages from 1, and the peer's sourcing, which asks for the
/// sequence after the last one it had, skipped them until the new stream caught up.
#[tokio::test]
async fn a_region_that_loses_its_nats_store_still_sends_every_change() {
    let _heavy = heavy_alone().await;
    let (mut r1, r2, _link) = two_regions().await;
    let prefix = format!("s-{}", &unique()[..6]);
    // Enough changes that the old stream's sequences stay ahead of the new one's for
    // longer than the test waits (heartbeats add five a second).
    make_tenants(&r1, &prefix, 0, 150).await;
    within(
        "region 2 has region 1's 150 tenants",
        Duration::from_secs(30),
        || async { r2.tenants_like(&prefix).await == 150 },
    )
    .await;
    // The store is lost: the gateway and its NATS server stop, the store is deleted, and
    // both start again (the server with an empty store, `up` making the streams anew).
    r1.up.kill();
    r1._nats.kill();
    std::fs::remove_dir_all(r1._dir.path().join("js")).unwrap();
    r1._nats.resume();
    r1.up = Gateway::up(&r1.env, r1.port).await;
    make_tenants(&r1, &prefix, 150, 155).await;
    let started = Instant::now();
    while r2.tenants_like(&prefix).await != 155 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "region 2 has {} of 155 tenants 15 s after region 1 lost its store; \
             inbound: {}\n{}",
            r2.tenants_like(&prefix).await,
            r2.link_state().await,
            r1.up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new stream holds region 1's older rows too, for a region added later.
    use futures::TryStreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(r1._nats.url()).await.unwrap());
    within(
        "region 1's stream holds its 155 tenants",
        Duration::from_secs(15),
        || {
            let js = js.clone();
            async move {
                let stream = js.get_stream("REPLICATION-r1").await.unwrap();
                let subjects: Vec<(String, usize)> = stream
                    .info_with_subjects("replication.r1.tenants.>")
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                subjects.len() >= 155
            }
        },
    )
    .await;
}

/// A region that loses its NATS store while it is down gets every change its peer made
/// meanwhile. Its `REPLICATION-IN`, made anew, fills from the peer's stream at once; the
/// applier went on from the position it had in the old stream whenever the new one was
/// already past it, and the changes before that position were skipped for good.
#[tokio::test]
async fn a_region_that_loses_its_nats_store_while_down_gets_every_change_made_meanwhile() {
    let _heavy = heavy_alone().await;
    let (r1, mut r2, _link) = two_regions().await;
    let prefix = format!("w-{}", &unique()[..6]);
    make_tenants(&r1, &prefix, 0, 10).await;
    within(
        "region 2 has the first 10 tenants",
        Duration::from_secs(30),
        || async { r2.tenants_like(&prefix).await == 10 },
    )
    .await;
    r2.up.kill();
    r2._nats.kill();
    std::fs::remove_dir_all(r2._dir.path().join("js")).unwrap();
    // More changes than region 2 had applied messages, so the new stream is past that
    // position as soon as it has sourced them.
    make_tenants(&r1, &prefix, 10, 200).await;
    r2._nats.resume();
    r2.up = Gateway::up(&r2.env, r2.port).await;
    let started = Instant::now();
    while r2.tenants_like(&prefix).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "region 2 has {} of 200 tenants 30 s after it came back with a new store; \
             inbound: {}\n{}",
            r2.tenants_like(&prefix).await,
            r2.link_state().await,
            r2.up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same loss under `up`'s own authenticated broker, whose users have the
/// permissions every deployment gets from `gateway nats-config`: the relay may purge
/// its own replication stream to move its first sequence (it could not, the check
/// failed for good, and the region never published again; an outside probe found it).
#[tokio::test]
async fn a_region_mends_its_stream_after_losing_its_store_under_the_brokers_permissions() {
    let _heavy = heavy_alone().await;
    let sandbox = Sandbox::new(&pg_base(), &nats_url());
    let dir = TempDir::new("gwtest-region-store");
    let port = free_port();
    let up = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.arg("up")
            .env("DATABASE_URL", sandbox.database_url())
            .env_remove("NATS_URL")
            .env("GATEWAY_DATA_DIR", dir.path())
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("GATEWAY_ADMIN_KEY", ADMIN)
            .env("GATEWAY_REGION", "r1")
            .env("GATEWAY_REGION_ZONES", "zone-a")
            .env("GATEWAY_PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("GATEWAY_REPLICATION_HEARTBEAT_MS", "200")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    let pool = sqlx::PgPool::connect_lazy(&sandbox.database_url()).unwrap();
    let published = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT published_seq FROM replication_clock")
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
        }
    };
    let mut first = up();
    within("the region publishes", Duration::from_secs(60), || async {
        published().await > 0
    })
    .await;
    // The store is lost: `up` and its broker die, the store goes.
    first.kill().unwrap();
    first.wait().unwrap();
    let pid_file = dir.path().join("nats/nats-server.pid");
    let broker = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", broker.trim()])
        .status();
    within("the broker is gone", Duration::from_secs(10), || async {
        !std::path::Path::new(&format!("/proc/{}", broker.trim())).exists()
    })
    .await;
    let before = published().await;
    std::fs::remove_dir_all(dir.path().join("nats/store")).unwrap();
    let mut second = up();
    let moved = tokio::time::timeout(Duration::from_secs(60), async {
        while published().await < before + (1 << 20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    if let Ok(broker) = std::fs::read_to_string(&pid_file) {
        let _ = std::process::Command::new("kill")
            .args(["-9", broker.trim()])
            .status();
    }
    assert!(
        moved.is_ok(),
        "the new stream's sequences never passed the old one's ({before}): {}",
        published().await
    );
}

/// A region whose database goes away (a crash, or a failover's gap) while the other's
/// changes keep coming applies every one of them once it is back, and its own changes
/// made before the crash still reach the other region.
#[tokio::test]
async fn a_region_whose_database_goes_away_catches_up_when_it_is_back() {
    let _heavy = heavy_alone().await;
    let (r1, mut r2, _link) = two_regions_with(Some(Postgres::start())).await;
    let prefix = format!("d-{}", &unique()[..6]);
    make_tenants(&r2, &prefix, 0, 1).await;
    r2.pg.as_mut().unwrap().crash();
    make_tenants(&r1, &prefix, 1, 11).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    r2.pg.as_mut().unwrap().resume();
    for r in [&r1, &r2] {
        within(
            "every tenant reaches both regions",
            Duration::from_secs(30),
            || async { r.tenants_like(&prefix).await == 11 },
        )
        .await;
    }
}

/// The script's process: stopped (SIGTERM, which it passes on) when the test ends,
/// even by a panic.
struct Script(std::process::Child);

impl Script {
    fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.terminate();
            let _ = self.0.wait();
        }
    }
}

/// `scripts/regions.sh`, as the README runs it: two regions, each with its own
/// authenticated NATS server (the relay's replication permissions, the leaf node link's
/// password), a key made in region 1 works in region 2, a zone-c create sent to region 1
/// ends ready in region 2 through the redirect, and SIGTERM stops everything.
#[tokio::test]
async fn the_script_runs_two_linked_regions_and_stops_them() {
    let _heavy = heavy_alone().await;
    let dir = TempDir::new("gwtest-regions-script");
    let (p1, p2, leaf) = (free_port(), free_port(), free_port());
    let databases = [
        format!("gwtest_{}", unique()),
        format!("gwtest_{}", unique()),
    ];
    let mut script = Script(
        std::process::Command::new("bash")
            .arg(crate::common::repo_root().join("scripts/regions.sh"))
            .env("GATEWAY_BIN", env!("CARGO_BIN_EXE_gateway"))
            .env("REGION_1_LISTEN", format!("127.0.0.1:{p1}"))
            .env("REGION_2_LISTEN", format!("127.0.0.1:{p2}"))
            .env("REGION_LEAF_PORT", leaf.to_string())
            .env("REGIONS_DATA_DIR", dir.path())
            .env("REGION_1_DATABASE", &databases[0])
            .env("REGION_2_DATABASE", &databases[1])
            .env("PG_BASE", pg_base())
            .env("GATEWAY_ADMIN_KEY", ADMIN)
            .env("SIM_MIN_LATENCY_MS", "5")
            .env("SIM_MAX_LATENCY_MS", "20")
            .env_remove("NATS_URL")
            .stdout(std::fs::File::create(dir.path().join("out.log")).unwrap())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let (u1, u2) = (
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    );
    for url in [&u1, &u2] {
        within("the region answers", Duration::from_secs(60), || async {
            http.get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }
    let tenant = format!("t-{}", unique());
    let made = http
        .post(format!("{u1}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": tenant}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    let key: Value = http
        .post(format!("{u1}/v1/tenants/{tenant}/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"role": "owner"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    within(
        "the key works in region 2",
        Duration::from_secs(10),
        || async {
            http.get(format!("{u2}/v1/tenants/{tenant}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status()
                == StatusCode::OK
        },
    )
    .await;
    within(
        "zone-c is known in region 1",
        Duration::from_secs(10),
        || async {
            let zones: Value = http
                .get(format!("{u1}/v1/zones"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            zones
                .as_array()
                .unwrap()
                .iter()
                .any(|z| z["name"] == "zone-c" && z["region"] == "r2")
        },
    )
    .await;
    // The typed client follows the 307 with the same method, body and key (reqwest
    // alone would drop the key when the redirect leaves the origin), and its wait follows
    // the operation's ID to region 2 as well.
    let gw = gateway_client::Client::new(&u1, &key);
    let zones = gw.zones().await.unwrap();
    let zone_c = zones.iter().find(|z| z.name == "zone-c").unwrap();
    assert_eq!(zone_c.region.as_deref(), Some("r2"));
    assert_eq!(zone_c.url.as_deref(), Some(u2.as_str()));
    let resource = gateway_client::NewResource {
        name: "far".into(),
        zone: "zone-c".into(),
        spec: json!({"flavor": "m1.small", "image": "debian-12"}),
        labels: Default::default(),
    };
    let op = gw.create_resource(&tenant, "vms", &resource).await.unwrap();
    let done = gw.wait(op.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.state, gateway_client::OperationState::Succeeded);
    for (db, expected) in [(&databases[0], 0), (&databases[1], 1)] {
        let pool = sqlx::PgPool::connect(&format!("{}/{db}", pg_base()))
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, expected, "the VM lives in region 2 only");
    }

    script.terminate();
    let started = Instant::now();
    while script.0.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the script did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for port in [p1, p2, leaf] {
        within(
            "everything it started has stopped",
            Duration::from_secs(10),
            || async move { std::net::TcpStream::connect(("127.0.0.1", port)).is_err() },
        )
        .await;
    }
    let pool = sqlx::PgPool::connect(&format!("{}/postgres", pg_base()))
        .await
        .unwrap();
    for db in databases {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// The merge rules on their own (no NATS): the same changes applied in different orders,
/// as different regions may receive them, leave the same rows.
#[tokio::test]
async fn the_same_changes_in_any_order_leave_the_same_rows() {
    use gateway::domain::region::Change;
    use gateway::store::replication;
    let change = |table: &str, key: Value, row: Option<Value>, hlc: i64, origin: &str| Change {
        table: table.into(),
        key,
        row,
        hlc,
        origin: origin.into(),
    };
    let (t, p) = ("acme", "00000000-0000-7000-8000-000000000001");
    let key = |revoked: Option<&str>, expires: Option<&str>, hlc: i64, origin: &str| {
        let row = json!({"id": p, "name": "ci", "key_hash": "\\x01", "role": "owner", "tenant": t,
                         "created_at": "2026-11-01T00:00:00Z", "expires_at": expires, "revoked_at": revoked});
        change("principals", json!({"id": p}), Some(row), hlc, origin)
    };
    let quota = |limit: Option<i64>, hlc: i64, origin: &str| {
        let row = limit.map(|l| {
            json!({"tenant": t, "limits": [{"dimension": "count", "limit": l}],
                                       "updated_at": "2026-11-01T00:00:00Z"})
        });
        change("quotas", json!({"tenant": t}), row, hlc, origin)
    };
    let tenant = |name: &str, hlc: i64, origin: &str| {
        let row = json!({"id": t, "display_name": name, "created_at": "2026-11-01T00:00:00Z"});
        change("tenants", json!({"id": t}), Some(row), hlc, origin)
    };
    let changes = vec![
        tenant("A", 10, "r1"),
        key(None, None, 11, "r1"),
        // r1 revokes; r2, concurrently and later by the clock, changes the same key.
        key(Some("2026-11-02T00:00:00Z"), None, 15, "r1"),
        key(None, Some("2027-01-01T00:00:00Z"), 20, "r2"),
        quota(Some(5), 12, "r1"),
        // r2 deletes the quota; an older change from r1 arrives after.
        quota(None, 30, "r2"),
        quota(Some(7), 25, "r1"),
        // Two regions set the display name at the same clock value: the name decides.
        tenant("from r2", 40, "r2"),
        tenant("from r1", 40, "r1"),
    ];
    let mut orders = vec![changes.clone()];
    orders.push(changes.iter().rev().cloned().collect());
    let mut interleaved = changes.clone();
    interleaved.rotate_left(4);
    interleaved.swap(0, 3);
    orders.push(interleaved);

    let mut results = Vec::new();
    let mut sandboxes = Vec::new();
    for order in orders {
        let sandbox = Sandbox::new(&pg_base(), &nats_url());
        let pool = gateway::store::connect(&sandbox.database_url(), 2)
            .await
            .unwrap();
        gateway::store::migrate(&pool).await.unwrap();
        sqlx::query("UPDATE replication_clock SET region = 'r3'")
            .execute(&pool)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        for c in &order {
            let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
            replication::apply(&mut tx, c).await.unwrap();
            replication::retry_parked(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
        }
        #[allow(clippy::type_complexity)]
        let row: (
            Option<String>,
            String,
            Option<String>,
            Option<String>,
            i64,
            String,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT (SELECT revoked_at::text FROM principals WHERE tenant = 'acme'),
                    (SELECT display_name FROM tenants WHERE id = 'acme'),
                    (SELECT expires_at::text FROM principals WHERE tenant = 'acme'),
                    (SELECT limits::text FROM quotas WHERE tenant = 'acme'),
                    (SELECT hlc FROM principals WHERE tenant = 'acme'),
                    (SELECT origin FROM principals WHERE tenant = 'acme'),
                    (SELECT count(*) FROM replication_parked),
                    (SELECT count(*) FROM replication_log)",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        results.push(row);
        sandboxes.push(sandbox);
    }
    let first = &results[0];
    assert!(first.0.is_some(), "the revocation sticks: {first:?}");
    assert!(
        first.2.is_some(),
        "the newer change of the key is kept too: {first:?}"
    );
    assert_eq!(
        first.1, "from r2",
        "equal clocks: the greater region name wins"
    );
    assert_eq!(first.3, None, "the deletion wins over the older change");
    assert_eq!((first.4, first.5.as_str()), (20, "r2"));
    assert_eq!(
        (first.6, first.7),
        (0, 0),
        "nothing parked, nothing logged again"
    );
    for other in &results[1..] {
        assert_eq!(other, first, "another order, the same rows");
    }
}

/// A change whose transaction took a lower `seq` but committed after the publisher's
/// claim stays in the log for the next pass. The publisher used to delete everything up
/// to the last `seq` it had claimed, and with it such a change, unpublished.
#[tokio::test]
async fn a_change_committed_after_a_claim_is_not_deleted_unpublished() {
    use gateway::store::replication;
    let app = crate::common::spawn_with(crate::common::Options::api_only()).await;
    let insert = "INSERT INTO replication_log (tbl, key, row, hlc, origin)
                  VALUES ('tenants', $1, '{}', 1, 'r1') RETURNING seq";
    let mut slow = app.pool.begin().await.unwrap();
    let low: i64 = sqlx::query_scalar(insert)
        .bind(json!({"id": "slow"}))
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let high: i64 = sqlx::query_scalar(insert)
        .bind(json!({"id": "quick"}))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(low < high);
    let mut publisher = app.pool.begin().await.unwrap();
    let claimed = replication::claim(&mut publisher, 256)
        .await
        .unwrap()
        .expect("the publisher's lock");
    let seqs: Vec<i64> = claimed.iter().map(|r| r.seq).collect();
    assert!(seqs.contains(&high) && !seqs.contains(&low), "{seqs:?}");
    // The slow transaction commits while the claimed rows are being published.
    slow.commit().await.unwrap();
    replication::delete(&mut publisher, &seqs).await.unwrap();
    publisher.commit().await.unwrap();
    let left: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM replication_log WHERE key->>'id' IN ('slow', 'quick') ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, [low], "the late change waits for the next pass");
}

#[tokio::test]
async fn an_applier_that_fails_lets_go_of_its_lock() {
    // An applier whose broker has no inbound stream (a JetStream domain nobody serves)
    // fails each session just after taking its lock; the lock must go with the session.
    let app = crate::common::spawn_with(crate::common::Options::api_only()).await;
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::with_prefix(client, "$JS.no-such-domain.API");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let applier = gateway::replication::apply::Applier {
        pool: app.pool.clone(),
        js,
        metrics: gateway::metrics::Metrics::default(),
    };
    let running = tokio::spawn(applier.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&app.config.database_url)
        .await
        .unwrap();
    let take = "SELECT pg_try_advisory_lock(hashtext('gateway.replication.apply'))";
    let mut taken = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !taken && Instant::now() < deadline {
        taken = sqlx::query_scalar::<_, bool>(take)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken, "a failed session kept the applier's lock");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn a_peer_added_to_a_running_region_is_sourced_through_its_domain() {
    // The update path of `REPLICATION-IN` (a peer added to a region whose stream exists)
    // must name each peer's domain as the create path does.
    let nats = Nats::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut region = leaf("r1", None, None);
    region.peers = vec!["r2".into()];
    gateway::replication::ensure_streams(&js, &region, None)
        .await
        .unwrap();
    region.peers.push("r3".into());
    gateway::replication::ensure_streams(&js, &region, None)
        .await
        .unwrap();
    let mut stream = js
        .get_stream(gateway::replication::INBOUND_STREAM)
        .await
        .unwrap();
    let sources = stream.info().await.unwrap().config.sources.clone().unwrap();
    let prefixes: Vec<(String, Option<String>)> = sources
        .iter()
        .map(|s| {
            let prefix = s.external.as_ref().map(|e| e.api_prefix.clone());
            (s.name.clone(), prefix)
        })
        .collect();
    assert_eq!(
        prefixes,
        [
            ("REPLICATION-r2".to_owned(), Some("$JS.r2.API".to_owned())),
            ("REPLICATION-r3".to_owned(), Some("$JS.r3.API".to_owned())),
        ]
    );
}

#[tokio::test]
async fn a_regions_database_takes_no_process_without_its_region_and_no_zone_of_another() {
    let app = crate::common::spawn_with(crate::common::Options::api_only()).await;
    let mut conn = app.pool.acquire().await.unwrap();
    // A zone the other region claimed, as replicated here.
    sqlx::query("INSERT INTO zones (name, description, region) VALUES ('zone-r2', '', 'r2')")
        .execute(&mut *conn)
        .await
        .unwrap();
    let claim = |zones: Vec<String>| {
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            gateway::store::replication::configure(&mut conn, "r1", "http://r1", &zones, &[]).await
        }
    };
    let e = claim(vec!["zone-a".into(), "zone-r2".into()])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("belongs to region \"r2\""), "{e}");
    claim(vec!["zone-a".into()]).await.unwrap();
    let mut config = app.config.clone();
    config.region = None;
    let e = gateway::app::same_region(&config, &app.pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("GATEWAY_REGION=r1"), "{e}");
    config.region = Some(leaf("r1", None, None));
    gateway::app::same_region(&config, &app.pool).await.unwrap();
    config.region = Some(leaf("r9", None, None));
    assert!(gateway::app::same_region(&config, &app.pool).await.is_err());
}

#[tokio::test]
async fn only_what_is_stored_is_logged_for_the_other_regions() {
    let app = crate::common::spawn_with(crate::common::Options::api_only()).await;
    let configure = || {
        let pool = app.pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let zones = ["zone-a".to_owned()];
            gateway::store::replication::configure(&mut conn, "r1", "http://r1", &zones, &[])
                .await
                .unwrap();
        }
    };
    configure().await;
    let logged = || async {
        sqlx::query_as::<_, (String, Option<Value>)>(
            "SELECT tbl, row FROM replication_log WHERE tbl = 'zones' AND key = '{\"name\": \"zone-a\"}'
             ORDER BY seq",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap()
    };
    let before = logged().await;
    // Configuring again proposes the same zone; the stored row stays as it was, so
    // nothing new may go to the other regions (an `INSERT … ON CONFLICT` proposing a row
    // with an empty description was logged, and replaced the zone's description there).
    configure().await;
    assert_eq!(logged().await, before);
    let stored: Value = sqlx::query_scalar(
        "SELECT replication_project(to_jsonb(z), '{name,description,region,created_at}') FROM zones z WHERE name = 'zone-a'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let last = before.last().and_then(|(_, row)| row.clone());
    assert_eq!(
        last.as_ref(),
        Some(&stored),
        "the log's newest is the stored row"
    );
}

/// A gateway whose database is region `r1`'s, with peer `r2`, and a tenant of it: for
/// applying region 2's changes by hand.
async fn region_r1_with_peer_r2() -> (crate::common::TestApp, String) {
    let app = crate::common::spawn_with(crate::common::Options::api_only()).await;
    let tenant = app.tenant().await;
    let mut conn = app.pool.acquire().await.unwrap();
    gateway::store::replication::configure(&mut conn, "r1", "http://r1", &[], &["r2".to_owned()])
        .await
        .unwrap();
    (app, tenant)
}

#[tokio::test]
async fn a_row_this_region_deleted_never_comes_back_from_a_peers_older_copy() {
    use gateway::domain::region::{Change, HEARTBEAT};
    use gateway::store::replication::{apply, Applied};
    let (app, tenant) = region_r1_with_peer_r2().await;
    let mut conn = app.pool.acquire().await.unwrap();
    sqlx::query("INSERT INTO quotas (tenant, limits) VALUES ($1, '[]')")
        .bind(&tenant)
        .execute(&mut *conn)
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT hlc FROM quotas WHERE tenant = $1")
        .bind(&tenant)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM quotas WHERE tenant = $1")
        .bind(&tenant)
        .execute(&mut *conn)
        .await
        .unwrap();
    // The peer says it has applied everything of this region's: tombstones may go.
    let beat = Change {
        table: HEARTBEAT.into(),
        key: json!({}),
        row: Some(json!({"applied": {"r1": i64::MAX / 2}})),
        hlc: 1,
        origin: "r2".into(),
    };
    apply(&mut conn, &beat).await.unwrap();
    // This region reads the peer's stream from its start again (its copy of the peer's
    // stream was lost): the peer's last version of the row, older than the delete.
    let old = Change {
        table: "quotas".into(),
        key: json!({"tenant": tenant}),
        row: Some(json!({"tenant": tenant, "limits": [], "updated_at": "2026-01-01T00:00:00Z"})),
        hlc: stored - 1,
        origin: "r2".into(),
    };
    assert_eq!(apply(&mut conn, &old).await.unwrap(), Applied::Stale);
    let back: i64 = sqlx::query_scalar("SELECT count(*) FROM quotas WHERE tenant = $1")
        .bind(&tenant)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(back, 0, "the deleted row came back");
}

/// Three keys of one name from three regions, made within the same minute (so their
/// UUIDv7 IDs share their first 8 hex digits, the time): each gets a name of its own,
/// renamed once. With the first 8 digits as the suffix, two were renamed to the same
/// name and this region's key renamed twice (`ci~…~…`).
#[tokio::test]
async fn three_keys_of_one_name_made_in_the_same_minute_get_three_names() {
    use gateway::domain::region::Change;
    use gateway::store::replication::{apply, Applied};
    let (app, tenant) = region_r1_with_peer_r2().await;
    let mut conn = app.pool.acquire().await.unwrap();
    let a = app
        .post(
            &format!("/v1/tenants/{tenant}/keys"),
            json!({"name": "ci", "role": "reader"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let mine: uuid::Uuid = a.body["id"].as_str().unwrap().parse().unwrap();
    let mine_at: i64 = sqlx::query_scalar("SELECT hlc FROM principals WHERE id = $1")
        .bind(mine)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // Another region's key with an ID starting as this one's (made the same minute).
    let sibling = || {
        let mut bytes = *uuid::Uuid::new_v4().as_bytes();
        bytes[..4].copy_from_slice(&mine.as_bytes()[..4]);
        uuid::Uuid::from_bytes(bytes)
    };
    let theirs = |hlc: i64, id: uuid::Uuid, origin: &str| Change {
        table: "principals".into(),
        key: json!({"id": id}),
        row: Some(json!({
            "id": id, "name": "ci", "role": "reader", "tenant": tenant,
            "key_hash": format!("\\x{}", id.simple().to_string().repeat(2)),
            "service": null, "zone": null, "created_at": "2026-11-29T00:00:00Z",
            "expires_at": null, "revoked_at": null,
        })),
        hlc,
        origin: origin.into(),
    };
    // Region 2's is the oldest, region 3's next, this region's the newest.
    let (oldest, middle) = (sibling(), sibling());
    for change in [
        theirs(mine_at - 2, oldest, "r2"),
        theirs(mine_at - 1, middle, "r3"),
    ] {
        assert_eq!(apply(&mut conn, &change).await.unwrap(), Applied::Applied);
    }
    let mut names: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, name FROM principals WHERE tenant = $1")
            .bind(&tenant)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    names.sort();
    let mut want = vec![
        (oldest, "ci".to_owned()),
        (middle, format!("ci~{}", middle.simple())),
        (mine, format!("ci~{}", mine.simple())),
    ];
    want.sort();
    assert_eq!(names, want);
}

#[tokio::test]
async fn two_keys_made_with_one_name_while_cut_off_both_stay_the_first_keeps_it() {
    use gateway::domain::region::Change;
    use gateway::store::replication::{apply, Applied};
    let (app, tenant) = region_r1_with_peer_r2().await;
    let mut conn = app.pool.acquire().await.unwrap();
    let make = |name: &str| {
        let (app, tenant, name) = (&app, tenant.clone(), name.to_owned());
        async move {
            let a = app
                .post(
                    &format!("/v1/tenants/{tenant}/keys"),
                    json!({"name": name, "role": "reader"}),
                )
                .await;
            assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
            a.body["id"].as_str().unwrap().to_owned()
        }
    };
    let (early, late) = (make("early").await, make("late").await);
    let stamp = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT hlc FROM principals WHERE id = $1::uuid")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Region 2's keys of the same names, one made after "early", one before "late".
    let theirs = |name: &str, hlc: i64, id: uuid::Uuid| Change {
        table: "principals".into(),
        key: json!({"id": id}),
        row: Some(json!({
            "id": id, "name": name, "role": "reader", "tenant": tenant,
            "key_hash": format!("\\x{}", id.simple().to_string().repeat(2)),
            "service": null, "zone": null, "created_at": "2026-11-29T00:00:00Z",
            "expires_at": null, "revoked_at": null,
        })),
        hlc,
        origin: "r2".into(),
    };
    let (after, before) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let early_at = stamp(early.clone()).await;
    let late_at = stamp(late.clone()).await;
    let a = apply(&mut conn, &theirs("early", early_at + 1, after)).await;
    assert_eq!(a.unwrap(), Applied::Applied);
    let a = apply(&mut conn, &theirs("late", late_at - 1, before)).await;
    assert_eq!(a.unwrap(), Applied::Applied);
    let names: Vec<(String, String)> =
        sqlx::query_as("SELECT id::text, name FROM principals WHERE tenant = $1 ORDER BY name")
            .bind(&tenant)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let short = |id: &str| id.replace('-', "");
    let want = |id: &str, name: &str| (id.to_owned(), name.to_owned());
    let mut expected = vec![
        want(&early, "early"),
        want(
            &after.to_string(),
            &format!("early~{}", short(&after.to_string())),
        ),
        want(&before.to_string(), "late"),
        want(&late, &format!("late~{}", short(&late))),
    ];
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(names, expected);
    // This region's key renamed is a change of its own, for the other regions.
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM replication_log WHERE tbl = 'principals' AND row->>'name' = $1",
    )
    .bind(format!("late~{}", short(&late)))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(logged, 1);
}
