//! The Kubernetes manifests (every overlay under deploy/kubernetes/overlays) and
//! compose.yaml render and validate offline, and the production overlay has the shape
//! the README promises. `scripts/validate-deploy.sh` does the rendering (kubectl
//! kustomize), the schema validation (Kubernetes 1.31 and the vendored CRD and Compose
//! schemas) and its own checks; it writes what it found as JSON, which this test reads
//! to assert the promises again, independently, here.
//!
//! Needs kubectl (with kustomize v5) and python3 with venv; without them it fails with
//! the script's message saying what to install. The Python packages are installed once
//! into target/validate-deploy-venv.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn validate() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
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
    assert!(strs(&gw["hard_spread"]).contains("topology.kubernetes.io/zone"), "{gw}");
    assert!(strs(&gw["spread"]).contains("kubernetes.io/hostname"), "{gw}");
    assert!(int(&gw["pre_stop_sleep"]) > 0, "{gw}");
    assert!(
        int(&gw["termination_grace"]) > int(&gw["pre_stop_sleep"]) + int(&gw["drain_timeout"]),
        "the grace period must cover the preStop sleep and the server's drain: {gw}"
    );
    assert_eq!(strs(&gw["ingress_paths"]), BTreeSet::from(["/v1".to_owned()]));

    // relays
    let relay = &prod["relay"];
    assert!(int(&relay["replicas"]) >= 2, "{relay}");
    assert_eq!(strs(&relay["pdb"]).len(), 1, "{relay}");

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
    assert_eq!(migrate["admin_key_secret"], serde_json::json!(["gateway-admin-key", "key"]));

    // NATS: three JetStream nodes, streams with three replicas
    let nats = &prod["nats"];
    assert_eq!(int(&nats["replicas"]), 3);
    assert_eq!(strs(&nats["routes"]).len(), 3, "{nats}");
    assert_eq!(strs(&nats["pdb"]).len(), 1, "{nats}");
    assert_eq!(migrate["stream_replicas"], "3");

    // PostgreSQL: three instances, synchronous, the gateway on the primary's Service
    let pg = &prod["postgres"];
    assert_eq!(int(&pg["instances"]), 3);
    assert!(int(&pg["synchronous"]["number"]) >= 1, "{pg}");
    assert_eq!(pg["synchronous"]["dataDurability"], "required");
    assert_eq!(gw["database_secret"], serde_json::json!([pg["app_secret"], "uri"]));
    assert!(int(&pg["connection_budget"]) < int(&pg["max_connections"]), "{pg}");

    // Prometheus Operator objects and the dashboard
    let mon = &prod["monitoring"];
    assert!(strs(&mon["service_monitors"]).contains("gateway"), "{mon}");
    let pod_monitors = strs(&mon["pod_monitors"]);
    assert!(pod_monitors.contains("relay") && pod_monitors.contains("workers"), "{mon}");
    assert!(strs(&mon["prometheus_rules"]).contains("gateway"), "{mon}");
    assert!(strs(&mon["dashboards"]).contains("gateway-dashboard"), "{mon}");

    // compose.yaml: every worker with its own pool's key
    let compose_workers = facts["compose"]["workers"].as_array().unwrap();
    assert_eq!(compose_workers.len(), 8);
    for w in compose_workers {
        assert_eq!(
            w["key_file"],
            format!("/worker-keys/{}-{}", w["service"].as_str().unwrap(), w["zone"].as_str().unwrap()),
            "{w}"
        );
    }
}
