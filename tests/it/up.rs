//! `gateway up` prints an admin key only when it made one (issue 11 §2), and neither
//! `up` nor `migrate` ever prints a key the operator supplied through
//! `GATEWAY_ADMIN_KEY`.

use crate::common::{free_port, heavy, Deployment, GatewayEnv};
use crate::common::{nats_url, pg_base};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Reads `child`'s output until it says it is up (60 s at most); returns what it printed.
fn until_up(child: &mut std::process::Child) -> String {
    let mut out = String::new();
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        out.push_str(&line);
        out.push('\n');
        if line.contains("OpenAPI:") || started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    assert!(out.contains("Gateway is up"), "{out}");
    out
}

/// Runs `gateway up` on a deployment's database and stream until it says it is up; returns what it printed.
fn up_output(env: &GatewayEnv, admin_key: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.arg("up")
        .env("DATABASE_URL", &env.database_url)
        .env("NATS_URL", &env.nats_url)
        .env("OPS_STREAM", &env.stream)
        .env("OPS_SUBJECT_PREFIX", &env.subject_prefix)
        .env("EVENTS_SUBJECT_PREFIX", &env.events_prefix)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("GATEWAY_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(key) = admin_key {
        cmd.env("GATEWAY_ADMIN_KEY", key);
    }
    let mut child = cmd.spawn().unwrap();
    let out = until_up(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    out
}

#[tokio::test]
async fn up_prints_only_a_key_it_made() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let supplied = format!("operator-{}", crate::common::unique());
    let out = tokio::task::spawn_blocking({
        let (env, supplied) = (d.env.clone(), supplied.clone());
        move || up_output(&env, Some(&supplied))
    })
    .await
    .unwrap();
    assert!(
        !out.contains(&supplied),
        "the supplied key was printed:\n{out}"
    );
    assert!(out.contains("GATEWAY_ADMIN_KEY"), "{out}");
    let out = tokio::task::spawn_blocking({
        let env = d.env.clone();
        move || up_output(&env, None)
    })
    .await
    .unwrap();
    assert!(
        out.contains("KEY=gw_"),
        "a generated key is shown once:\n{out}"
    );
}

#[tokio::test]
async fn migrate_never_prints_a_supplied_admin_key() {
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("migrate")
        .env("DATABASE_URL", &d.env.database_url)
        .env("NATS_URL", &d.env.nats_url)
        .env("OPS_STREAM", &d.env.stream)
        .env("OPS_SUBJECT_PREFIX", &d.env.subject_prefix)
        .env("EVENTS_SUBJECT_PREFIX", &d.env.events_prefix)
        .env("GATEWAY_ADMIN_KEY", &d.env.admin_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains(&d.env.admin_key), "{text}");
}

/// Whether process `pid` runs with `needle` on its command line.
fn runs(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
}

#[tokio::test]
async fn up_stops_the_broker_a_killed_up_left_running() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let dir = crate::common::TempDir::new("gwtest-up-orphan");
    // The first names the directory relative to where it runs, the second absolute.
    let up = |relative: bool| {
        let (cwd, data) = match relative {
            true => (
                dir.path().parent().unwrap(),
                dir.path().file_name().unwrap(),
            ),
            false => (std::path::Path::new("/"), dir.path().as_os_str()),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("up")
            .current_dir(cwd)
            .env("DATABASE_URL", &d.env.database_url)
            .env_remove("NATS_URL")
            .env("GATEWAY_DATA_DIR", data)
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("GATEWAY_ADMIN_KEY", &d.env.admin_key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_up(&mut child);
        child
    };
    let pid = || -> u32 {
        let file = dir.path().join("nats/nats-server.pid");
        std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let conf = "nats/nats-server.conf";
    let mut first = up(true);
    let orphan = pid();
    // `SIGKILL`: `up` cannot stop its broker, which goes on running.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(runs(orphan, conf), "the broker outlives a killed `up`");
    let mut second = up(false);
    let (left, now) = (runs(orphan, conf), pid());
    second.kill().unwrap();
    second.wait().unwrap();
    let _ = Command::new("kill").arg("-9").arg(now.to_string()).status();
    let _ = Command::new("kill")
        .arg("-9")
        .arg(orphan.to_string())
        .status();
    assert!(
        !left,
        "the broker the first `up` left still runs beside the new one"
    );
    assert_ne!(now, orphan);
}

/// A private broker that dies while `up` runs is said so in `up`'s log at once, and
/// reaped: it stayed a zombie process, and nothing told why operations stopped.
#[tokio::test]
async fn up_says_so_when_its_broker_dies_and_leaves_no_zombie() {
    let _heavy = heavy().await;
    let d = Deployment::new(&pg_base(), &nats_url(), &[]).await;
    let dir = crate::common::TempDir::new("gwtest-up-broker-dies");
    let log = dir.path().join("up.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("up")
        .env("DATABASE_URL", &d.env.database_url)
        .env_remove("NATS_URL")
        .env("GATEWAY_DATA_DIR", dir.path().join("data"))
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("GATEWAY_ADMIN_KEY", &d.env.admin_key)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("OpenAPI:")
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`up` did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = std::fs::read_to_string(dir.path().join("data/nats/nats-server.pid")).unwrap();
    let pid = pid.trim().to_owned();
    let _ = Command::new("kill").args(["-9", &pid]).status();
    let started = Instant::now();
    let said = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if text.contains("the private NATS server exited") && gone {
            break true;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        said,
        "no word of the broker's exit, or it is a zombie:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
