//! The typed client (`gateway-client`) and the CLI (`gwctl`) against a live gateway
//! (issue 9 §4–5): the real binary, its output formats and its exit codes.

use crate::common::{example_spec, spawn_with, unique, Options, TestApp};
use gateway_client::{
    Action, Client, NewResource, OperationState, Phase, ResourcePatch, ResourceQuery,
};
use serde_json::{json, Value};
use std::time::Duration;

/// What a `gwctl` run left.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// `gwctl` on the app with its admin key, isolated from the environment's settings.
fn command(app: &TestApp, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gwctl"));
    cmd.args(["--url", &app.url, "--key", &app.admin_key])
        .args(args)
        .env_remove("GWCTL_URL")
        .env_remove("GWCTL_KEY")
        .env_remove("GWCTL_TENANT")
        .env_remove("GW")
        .env_remove("KEY")
        .env("GWCTL_CONFIG", "/nonexistent/gwctl-config")
        .kill_on_drop(true);
    cmd
}

/// Runs `gwctl` to its end.
async fn gwctl(app: &TestApp, args: &[&str]) -> Run {
    let out = command(app, args).output().await.expect("gwctl runs");
    Run {
        code: out.status.code().expect("gwctl exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const VM_SPEC: &str = r#"{"flavor": "m1.small", "image": "debian-12"}"#;

#[tokio::test]
async fn create_with_wait_prints_the_ready_vm_and_a_failure_exits_1_with_its_code() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;

    let ok = gwctl(
        &app,
        &[
            "-t", &t, "-o", "json", "vms", "create", "web-1", "--zone", "zone-a",
        ]
        .into_iter()
        .chain([
            "--spec",
            VM_SPEC,
            "--label",
            "env=dev",
            "--wait",
            "--timeout",
            "60s",
        ])
        .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    let vm = ok.json();
    assert_eq!(vm["name"], "web-1");
    assert_eq!(vm["phase"], "ready");
    assert_eq!(vm["labels"], json!({"env": "dev"}));
    assert_eq!(vm["generation"], vm["observed_generation"]);
    // Piped: progress comes as plain lines on stderr, ending in the final state.
    assert!(!ok.stderr.contains('\r'), "{}", ok.stderr);
    assert!(ok.stderr.contains("succeeded"), "{}", ok.stderr);
    // The name again: refused, naming the VM that has it.
    let again = gwctl(
        &app,
        &[
            "-t", &t, "vms", "create", "web-1", "--zone", "zone-a", "--spec", VM_SPEC,
        ],
    )
    .await;
    assert_eq!(again.code, 3, "{}", again.stderr);
    assert!(again.stderr.contains("name_taken"), "{}", again.stderr);
    let id = vm["id"].as_str().unwrap();
    assert!(
        again
            .stderr
            .contains(&format!("details: {{\"resource_id\":\"{id}\"}}")),
        "{}",
        again.stderr
    );

    let failed = gwctl(
        &app,
        &[
            "-t", &t, "vms", "create", "fail-1", "--zone", "zone-a", "--spec", VM_SPEC, "--wait",
        ],
    )
    .await;
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    assert!(
        failed.stderr.contains("simulated_failure"),
        "{}",
        failed.stderr
    );
    assert!(failed.stdout.contains("failed"), "{}", failed.stdout);
}

#[tokio::test]
async fn usage_errors_exit_2_and_api_errors_exit_3_with_the_code() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;

    let bad_flag = gwctl(&app, &["-t", &t, "vms", "list", "--no-such-flag"]).await;
    assert_eq!(bad_flag.code, 2, "{}", bad_flag.stderr);
    let no_tenant = gwctl(&app, &["vms", "list"]).await;
    assert_eq!(no_tenant.code, 2, "{}", no_tenant.stderr);
    let not_json = gwctl(
        &app,
        &[
            "-t", &t, "vms", "create", "x", "--zone", "zone-a", "--spec", "{",
        ],
    )
    .await;
    assert_eq!(not_json.code, 2, "{}", not_json.stderr);

    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = gwctl(&app, &["-t", &t, "vms", "get", &unknown]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);
    let missing_op = gwctl(&app, &["ops", "wait", &unknown]).await;
    assert_eq!(missing_op.code, 3, "{}", missing_op.stderr);
    assert!(
        missing_op.stderr.contains("not_found"),
        "{}",
        missing_op.stderr
    );
    let invalid = gwctl(
        &app,
        &[
            "-t", &t, "vms", "create", "web", "--zone", "zone-x", "--spec", VM_SPEC,
        ],
    )
    .await;
    assert_eq!(invalid.code, 3, "{}", invalid.stderr);
    assert!(
        invalid.stderr.contains("unknown_zone"),
        "{}",
        invalid.stderr
    );

    let help = gwctl(&app, &["--help"]).await;
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("Examples:"), "{}", help.stdout);
    let completion = gwctl(&app, &["completion", "bash"]).await;
    assert_eq!(completion.code, 0, "{}", completion.stderr);
    assert!(completion.stdout.contains("gwctl"), "{}", completion.stdout);
}

#[tokio::test]
async fn writes_print_the_operation_and_ops_wait_follows_it() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;

    let created = gwctl(
        &app,
        &[
            "-t", &t, "-o", "json", "volumes", "create", "data", "--zone", "zone-b",
        ]
        .into_iter()
        .chain(["--spec", r#"{"size_gb": 20, "class": "ssd"}"#])
        .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let op = created.json();
    assert_eq!(op["action"], "create");
    let op_id = op["id"].as_str().unwrap();
    let resource = op["resource_id"].as_str().unwrap();

    let waited = gwctl(
        &app,
        &["-o", "json", "ops", "wait", op_id, "--timeout", "60s"],
    )
    .await;
    assert_eq!(waited.code, 0, "{}", waited.stderr);
    assert_eq!(waited.json()["state"], "succeeded");

    // Table and YAML outputs.
    let listed = gwctl(&app, &["-t", &t, "volumes", "list"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let mut lines = listed.stdout.lines();
    assert!(
        lines.next().unwrap().starts_with("ID "),
        "{}",
        listed.stdout
    );
    assert!(lines.next().unwrap().contains("data"), "{}", listed.stdout);
    let yaml = gwctl(&app, &["-t", &t, "-o", "yaml", "volumes", "get", resource]).await;
    assert_eq!(yaml.code, 0, "{}", yaml.stderr);
    assert!(yaml.stdout.contains("\nphase: ready\n"), "{}", yaml.stdout);
    let ops = gwctl(&app, &["-t", &t, "-o", "json", "ops", "list"]).await;
    assert_eq!(ops.json()["items"][0]["id"], op_id);

    // A patch of labels, an action, a delete, each followed.
    let patched = gwctl(
        &app,
        &[
            "-t", &t, "-o", "json", "volumes", "patch", resource, "--label", "env=prod", "--wait",
        ],
    )
    .await;
    assert_eq!(patched.code, 0, "{}", patched.stderr);
    assert_eq!(patched.json()["labels"], json!({"env": "prod"}));
    let resized = gwctl(
        &app,
        &[
            "-t", &t, "-o", "json", "volumes", "action", resource, "resize",
        ]
        .into_iter()
        .chain(["--input", r#"{"size_gb": 30}"#, "--wait"])
        .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(resized.code, 0, "{}", resized.stderr);
    assert_eq!(resized.json()["spec"]["size_gb"], 30);
    let deleted = gwctl(
        &app,
        &[
            "-t", &t, "-o", "json", "volumes", "delete", resource, "--wait",
        ],
    )
    .await;
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    assert_eq!(deleted.json()["state"], "succeeded");
    let gone = gwctl(&app, &["-t", &t, "volumes", "get", resource]).await;
    assert_eq!(gone.code, 3, "{}", gone.stderr);
}

#[tokio::test]
async fn watch_shows_changes_as_they_happen() {
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;
    let watch = command(
        &app,
        &["-t", &t, "watch", "--interval", "200ms", "--timeout", "4s"],
    )
    .output();
    let watching = tokio::spawn(watch);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let op = app
        .create(&t, "vms", "watched", "zone-a", example_spec("vms"))
        .await;
    let out = watching.await.unwrap().expect("watch runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let id = op["id"].as_str().unwrap();
    assert!(stdout.starts_with("TIME "), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(id) && l.contains("succeeded")),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_typed_client_covers_a_resource_life() {
    let app = spawn_with(Options::default()).await;
    let gw = Client::new(&app.url, &app.admin_key);
    let t = format!("t-{}", unique());
    assert_eq!(gw.create_tenant(&t, "Typed").await.unwrap().id, t);
    assert!(gw.list_tenants().await.unwrap().iter().any(|x| x.id == t));
    assert!(!gw.zones().await.unwrap().is_empty());
    assert!(!gw.catalog("flavor").await.unwrap().is_empty());
    assert!(gw.openapi().await.unwrap()["paths"].is_object());
    assert_eq!(gw.ready().await.unwrap()["database"], "ok");

    let new = NewResource {
        name: "web".into(),
        zone: "zone-a".into(),
        spec: example_spec("vms"),
        labels: [("env".to_owned(), "dev".to_owned())].into(),
    };
    let op = gw.create_resource(&t, "vms", &new).await.unwrap();
    let done = gw.wait(op.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.state, OperationState::Succeeded);
    let vm = gw.get_resource(&t, "vms", op.resource_id).await.unwrap();
    assert_eq!(vm.phase, Phase::Ready);
    let etag = vm.etag.clone().expect("a single read carries its ETag");

    // A conditional patch with the ETag read; a stale one is refused with its code.
    let patch = ResourcePatch {
        labels: Some([("env".to_owned(), None)].into()),
        ..Default::default()
    };
    let op = gw
        .patch_resource(&t, "vms", vm.id, &patch, Some(&etag))
        .await
        .unwrap();
    gw.wait(op.id, Duration::from_secs(60)).await.unwrap();
    let stale = gw
        .patch_resource(&t, "vms", vm.id, &patch, Some(&etag))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some("precondition_failed"), "{stale}");
    assert_eq!(stale.status(), Some(412));

    let op = gw
        .action(&t, "vms", vm.id, Action::named("stop"), &json!({}), None)
        .await
        .unwrap();
    let stopped = gw.wait(op.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stopped.state, OperationState::Succeeded);
    let page = gw
        .list_resources(&t, "vms", &ResourceQuery::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.items[0].labels.is_empty());

    let missing = gw.get_operation(uuid::Uuid::new_v4()).await.unwrap_err();
    assert_eq!(missing.code(), Some("not_found"));
    let unknown_action = gw
        .action(&t, "vms", vm.id, Action::named("scale"), &json!({}), None)
        .await
        .unwrap_err();
    assert_eq!(unknown_action.code(), Some("unknown_action"));

    // wait gives up with TimedOut on an operation that outlasts it.
    let slow = NewResource {
        name: "slow-1".into(),
        ..new
    };
    let op = gw.create_resource(&t, "vms", &slow).await.unwrap();
    let err = gw.wait(op.id, Duration::from_millis(1)).await.unwrap_err();
    assert!(matches!(err, gateway_client::Error::TimedOut), "{err}");
}

/// On a terminal, `--wait` rewrites one progress line in place. `script` (util-linux)
/// gives gwctl a terminal; without it the case is skipped.
#[tokio::test]
async fn wait_on_a_terminal_rewrites_one_progress_line() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("no `script`: skipped");
        return;
    }
    let app = spawn_with(Options::default()).await;
    let t = app.tenant().await;
    let line = format!(
        "{} --url {} --key {} -t {t} vms create slow-1 --zone zone-a --spec '{VM_SPEC}' --wait",
        env!("CARGO_BIN_EXE_gwctl"),
        app.url,
        app.admin_key
    );
    let out = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("GWCTL_CONFIG", "/nonexistent/gwctl-config")
        .kill_on_drop(true)
        .output()
        .await
        .expect("script runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("\r\x1b[K"), "{text:?}");
    assert!(text.contains("succeeded (attempt 1"), "{text:?}");
    assert!(text.contains("slow-1"), "the VM: {text:?}");
}

#[tokio::test]
async fn events_and_webhooks_through_the_client_and_the_cli() {
    let app = spawn_with(Options {
        tweak: |c| {
            c.webhooks.policy.allow_http = true;
            c.webhooks.policy.allow_private = true;
        },
        ..Default::default()
    })
    .await;
    let t = app.tenant().await;
    let gw = app.typed();
    let op = app
        .create(&t, "vms", "web-1", "zone-a", example_spec("vms"))
        .await;
    let op_id: uuid::Uuid = op["id"].as_str().unwrap().parse().unwrap();
    gw.wait(op_id, Duration::from_secs(30)).await.unwrap();
    // The client: a page of events, filtered, and its cursor.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let page = loop {
        let q = gateway_client::EventQuery {
            operation: Some(op_id),
            types: vec!["operation.succeeded".into()],
            ..Default::default()
        };
        let page = gw.events(&t, &q).await.unwrap();
        if !page.items.is_empty() {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "no event yet");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(page.items[0].operationid, Some(op_id));
    let cursor: u64 = page.items[0].cursor.as_deref().unwrap().parse().unwrap();
    let next: u64 = page.next_cursor.parse().unwrap();
    assert!(
        next >= cursor,
        "the page's cursor passed what it read, filtered or not"
    );
    // The CLI: the same events, as JSON lines.
    let run = gwctl(
        &app,
        &[
            "-t",
            &t,
            "-o",
            "json",
            "events",
            "--type",
            "resource.created",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stdout);
    assert_eq!(lines[0]["type"], "resource.created");
    // Webhooks: create (the secret shows), list, disable, rotate, delete.
    let run = gwctl(
        &app,
        &[
            "-t",
            &t,
            "-o",
            "json",
            "webhooks",
            "create",
            "http://127.0.0.1:9/hook",
            "--type",
            "operation.failed",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let created = run.json();
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    let id = created["id"].as_str().unwrap().to_owned();
    let hooks = gw.list_webhooks(&t).await.unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].types, ["operation.failed"]);
    let run = gwctl(&app, &["-t", &t, "-o", "json", "webhooks", "disable", &id]).await;
    assert_eq!(run.json()["enabled"], false);
    let run = gwctl(
        &app,
        &["-t", &t, "-o", "json", "webhooks", "rotate-secret", &id],
    )
    .await;
    assert_ne!(run.json()["secret"], created["secret"]);
    let run = gwctl(&app, &["-t", &t, "webhooks", "deliveries", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = gwctl(
        &app,
        &["-t", &t, "webhooks", "create", "ftp://example.com/"],
    )
    .await;
    assert_eq!(run.code, 3, "an API error: {}", run.stderr);
    assert!(run.stderr.contains("invalid_webhook_url"), "{}", run.stderr);
    let run = gwctl(&app, &["-t", &t, "webhooks", "delete", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(gw.list_webhooks(&t).await.unwrap().is_empty());
}

/// `--timeout` with `--wait` bounds the whole command, the write's own request
/// included: against a gateway that takes the connection and never answers, `gwctl`
/// gives up at the timeout (exit 4), not at the HTTP client's 90 s.
#[tokio::test]
async fn a_write_with_wait_gives_up_at_its_timeout_when_the_gateway_never_answers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let id = uuid::Uuid::new_v4().to_string();
    let writes: [&[&str]; 3] = [
        &[
            "vms", "create", "web", "--zone", "zone-a", "--spec", VM_SPEC,
        ],
        &["vms", "delete", &id],
        &["ops", "cancel", &id],
    ];
    for write in writes {
        let started = std::time::Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gwctl"))
            .args(["--url", &url, "--key", "k", "-t", "acme"])
            .args(write)
            .args(["--wait", "--timeout", "1s"])
            .env("GWCTL_CONFIG", "/nonexistent/gwctl-config")
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{write:?}: {stderr}");
        assert!(stderr.contains("timed out"), "{write:?}: {stderr}");
        assert!(took < Duration::from_secs(10), "{write:?} took {took:?}");
    }
}
