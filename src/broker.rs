//! `up`'s private broker: when `NATS_URL` is unset, `gateway up` runs a `nats-server` of
//! its own with JetStream and authentication on, so the one-command start has the same
//! broker security as a deployment.
//!
//! Everything lives in `{GATEWAY_DATA_DIR}/nats/`: the credentials ([`credentials::write`]:
//! one NKEY per user, `auth.conf`), `nats-server.conf` (listen address, JetStream store,
//! `include "auth.conf"`), the store and the server's log. Seeds are kept across runs, so
//! messages and consumers survive a restart of `up`. Every part of `up` logs in as its
//! own user ([`RoleLogins`]). The server is stopped when `up` stops ([`PrivateBroker::stop`],
//! and killed if `up` dies without stopping it).

use crate::config::{NatsNames, RegionSettings};
use crate::credentials;
use anyhow::Context as _;
use gateway_proto::Service;
use std::path::{Path, PathBuf};
use std::time::Duration;
use workers::nats::{inbox_prefix, wait_connected, NatsLogin};

/// How long the private server gets to start listening, and to stop.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Where to find `nats-server`: `configured`, else on `PATH`, else where Debian puts it.
pub fn nats_server_bin(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .context("nats-server: not found on PATH or in /usr/sbin (install it, set NATS_SERVER_BIN, or set NATS_URL to use a running server)")
}

/// How each user of a deployment logs in to one broker: the URL, and the seeds in a
/// credentials directory.
#[derive(Debug, Clone)]
pub struct RoleLogins {
    /// The broker.
    pub url: String,
    /// The credentials directory ([`credentials::write`]).
    pub dir: PathBuf,
    /// The deployment's names (for each user's inbox).
    pub names: NatsNames,
    /// The running server, to reload when users are added.
    pub server: Option<ServerHandle>,
}

/// How to reach a running private server's process.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    /// Its `nats-server` binary.
    pub bin: PathBuf,
    /// Its process ID.
    pub pid: u32,
}

impl RoleLogins {
    /// Adds the worker users of `services` in `zones` (a service registered while the
    /// broker runs): writes the credentials again and reloads the server, which keeps
    /// every connection. Nothing to do on a broker this process did not start.
    pub async fn add_pools(&self, zones: &[String], services: &[Service]) -> anyhow::Result<()> {
        let Some(server) = &self.server else {
            return Ok(());
        };
        credentials::write(&self.dir, &self.names, zones, services, &[])?;
        let status = tokio::process::Command::new(&server.bin)
            .arg("--signal")
            .arg(format!("reload={}", server.pid))
            .status()
            .await?;
        anyhow::ensure!(status.success(), "nats-server --signal reload: {status}");
        Ok(())
    }
}

impl RoleLogins {
    /// Connects as `user` (e.g. [`credentials::RELAY`], a worker's user); returns once
    /// connected, or fails after 10 s.
    pub async fn connect(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        let login: NatsLogin = credentials::login(&self.dir, user)?;
        let inbox = inbox_prefix(&self.names.stream, user);
        let client = login.connect(&self.url, user, &inbox).await?;
        wait_connected(&client, &self.url).await?;
        Ok(client)
    }
}

/// A running private `nats-server`.
pub struct PrivateBroker {
    /// Its URL (`nats://127.0.0.1:{port}`).
    pub url: String,
    /// How each user logs in to it.
    pub logins: RoleLogins,
    child: tokio::process::Child,
    bin: PathBuf,
}

impl PrivateBroker {
    /// Writes the credentials and configuration for `names`, `zones` and `services`
    /// under `dir` and starts `nats-server` (`bin`) on `port` (0: any free port); returns
    /// once it listens.
    pub async fn start(
        dir: &Path,
        bin: PathBuf,
        port: u16,
        names: &NatsNames,
        zones: &[String],
        services: &[Service],
        region: Option<&RegionSettings>,
    ) -> anyhow::Result<Self> {
        credentials::write(dir, names, zones, services, &[])?;
        let port = match port {
            0 => free_port()?,
            p => p,
        };
        let conf = dir.join("nats-server.conf");
        let store = dir.join("store");
        let pid_file = dir.join(PID_FILE);
        stop_left_over(&pid_file, &conf, &bin).await;
        std::fs::write(&conf, server_conf(port, &store, &pid_file, names, region))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let log = std::fs::File::create(dir.join("nats-server.log"))?;
        let child = tokio::process::Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        let mut broker = Self {
            logins: RoleLogins {
                url: url.clone(),
                dir: dir.to_owned(),
                names: names.clone(),
                server: child.id().map(|pid| ServerHandle {
                    bin: bin.clone(),
                    pid,
                }),
            },
            url,
            child,
            bin,
        };
        broker.wait_listening(port, dir).await?;
        Ok(broker)
    }

    async fn wait_listening(&mut self, port: u16, dir: &Path) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            self.still_running(dir)?;
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("nats-server did not listen on port {port} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Something listens; that it is this server and not one left on the port (which
        // makes this one exit, unable to bind) shows a moment later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.still_running(dir)
    }

    /// An error with the server's log if it has exited.
    fn still_running(&mut self, dir: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
            anyhow::bail!("nats-server exited ({status}):\n{log}");
        }
        Ok(())
    }

    /// Waits until the server exits (it was killed, or crashed), and says so: `up`
    /// cannot work without it, and the exit, reaped, leaves no zombie process behind.
    /// Clients reconnect by themselves if it is started again.
    pub async fn watch(&mut self) {
        let status = self.child.wait().await;
        let log = self.logins.dir.join("nats-server.log");
        tracing::error!(
            status = ?status,
            log = %log.display(),
            "the private NATS server exited: operations, events and replication wait until \
             one runs again on its port (restart `up`)"
        );
    }

    /// Stops the server gracefully (`nats-server --signal quit`), killing it if it has
    /// not stopped within a few seconds.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new(&self.bin)
                .arg("--signal")
                .arg(format!("quit={pid}"))
                .status()
                .await;
        }
        if tokio::time::timeout(START_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Where the private server writes its process ID.
const PID_FILE: &str = "nats-server.pid";

/// Stops the server an earlier `up` started with `conf` and could not stop (it was
/// killed with `SIGKILL`), which would otherwise keep the port, or share the JetStream
/// store with the new one. Only a process whose command line names `conf` (read from
/// `/proc`) is stopped: a process ID may have been given to another program since.
async fn stop_left_over(pid_file: &Path, conf: &Path, bin: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    else {
        return;
    };
    let alive = || runs_with(pid, conf);
    if !alive() {
        return;
    }
    tracing::warn!(
        pid,
        "stopping the private nats-server an earlier `up` left running"
    );
    for signal in ["quit", "kill"] {
        let _ = tokio::process::Command::new(bin)
            .arg("--signal")
            .arg(format!("{signal}={pid}"))
            .status()
            .await;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !alive() {
            return;
        }
    }
}

/// Whether process `pid` is a server started with the configuration file `conf`: its
/// `-c` argument (from `/proc`), resolved against its working directory, is the same
/// file however either was written (relative or absolute, through links).
fn runs_with(pid: u32, conf: &Path) -> bool {
    let (Ok(cmdline), Ok(cwd)) = (
        std::fs::read(format!("/proc/{pid}/cmdline")),
        std::fs::read_link(format!("/proc/{pid}/cwd")),
    ) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let Some(given) = args.windows(2).find(|w| w[0] == b"-c").map(|w| w[1]) else {
        return false;
    };
    let given = cwd.join(String::from_utf8_lossy(given).as_ref());
    match (std::fs::canonicalize(given), std::fs::canonicalize(conf)) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    }
}

/// A TCP port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The private server's configuration: loopback only, JetStream, the users of
/// `auth.conf`; with regions, the region's JetStream domain and its leaf node links.
fn server_conf(
    port: u16,
    store: &Path,
    pid_file: &Path,
    names: &NatsNames,
    region: Option<&RegionSettings>,
) -> String {
    let domain = region.map_or(String::new(), |r| format!("  domain: \"{}\"\n", r.name));
    let mut conf = format!(
        "# Written by `gateway up` for its private broker; rewritten at every start.\n\
         listen: 127.0.0.1:{port}\n\
         pid_file: \"{pid_file}\"\n\
         jetstream {{\n  store_dir: \"{store}\"\n{domain}}}\n\
         include \"{auth}\"\n",
        pid_file = pid_file.display(),
        store = store.display(),
        auth = credentials::AUTH_CONF,
    );
    if let Some(region) = region {
        conf.push_str(&leafnodes_conf(names, region));
    }
    conf
}

/// The `leafnodes` block linking this region's server to the others': it accepts them
/// on `leaf_port` (user `leaf`), advertising `leaf_advertise` (the address peers reach it
/// at: a tunnel, a proxy, a load balancer between sites; peers reconnect there, never
/// straight to the address this server sees itself at), and connects to `leaf_remotes`. Only replication crosses
/// a link: each remote denies this deployment's own subjects both ways, so the regions'
/// operation and event streams (same names, same subjects) never capture each other's
/// messages.
pub fn leafnodes_conf(names: &NatsNames, region: &RegionSettings) -> String {
    let mut out = String::from("leafnodes {\n");
    if let (Some(port), Some(password)) = (region.leaf_port, &region.leaf_password) {
        let advertise = match &region.leaf_advertise {
            Some(address) => format!("advertise: \"{address}\""),
            None => "no_advertise: true".into(),
        };
        out.push_str(&format!(
            "  listen: 127.0.0.1:{port}\n  {advertise}\n  authorization {{ user: leaf, password: \"{}\" }}\n",
            password.expose()
        ));
    }
    let local: Vec<String> = local_subjects(names)
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    let remotes: Vec<String> = region
        .leaf_remotes
        .iter()
        .map(|url| {
            format!(
                "    {{ url: \"{url}\", deny_imports: [{l}], deny_exports: [{l}] }}",
                l = local.join(", ")
            )
        })
        .collect();
    if !remotes.is_empty() {
        out.push_str(&format!("  remotes: [\n{}\n  ]\n", remotes.join(",\n")));
    }
    out.push_str("}\n");
    out
}

/// The subjects of one region's own deployment, which must not cross to another region.
pub fn local_subjects(names: &NatsNames) -> Vec<String> {
    vec![
        format!("{}.>", names.subject_prefix),
        format!("{}.>", names.events_prefix),
        "_gateway.>".into(),
        "$JS.EVENT.>".into(),
    ]
}
