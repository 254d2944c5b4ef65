//! The operator kit in deploy/ is valid and names only metrics the code exports.

use crate::common;
use std::collections::BTreeSet;
use std::process::Command;

fn root() -> std::path::PathBuf {
    crate::common::repo_root()
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .expect("promtool is needed for this test: run scripts/services.sh (installs Debian's prometheus)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{report}");
    report
}

/// Metric names (`gateway_…`, `worker_…`) mentioned in `text`, without the suffixes
/// Prometheus adds to series of one family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts = (rest.starts_with("gateway_") || rest.starts_with("worker_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let mut name = &rest[..len];
            for suffix in ["_bucket", "_count", "_sum", "_total"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            names.insert(name.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
}

#[tokio::test]
async fn alerts_and_dashboards_use_only_exported_metrics() {
    let app = common::spawn_app().await;
    // Families show in the exposition once they have a series: run one operation through,
    // and give the installation a peer region (whose lag is then reported).
    sqlx::query("INSERT INTO replication_peers (region) VALUES ('peer')")
        .execute(&app.pool)
        .await
        .unwrap();
    let tenant = app.tenant().await;
    let op = app
        .create(&tenant, "vms", "m", "zone-a", common::example_spec("vms"))
        .await;
    app.wait_done(op["id"].as_str().unwrap()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // a metrics refresh
    let exposition = reqwest::get(format!("{}/metrics", app.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard = std::fs::read_to_string(root().join("deploy/grafana/gateway.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    for (file, text) in [
        ("deploy/grafana/gateway.json", &dashboard),
        ("deploy/prometheus/alerts.yml", &alerts),
    ] {
        let used = metric_names(text);
        assert!(!used.is_empty(), "{file}");
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which /metrics does not export:\n{exported:?}"
            );
        }
    }
}
