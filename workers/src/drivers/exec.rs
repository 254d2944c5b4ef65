//! A driver that runs an external program, so real provisioning tools plug in without
//! Rust.
//!
//! The protocol, for the program's author:
//!
//! - stdin: the [`Dispatch`] as one JSON document, then end of file (for an attached
//!   volume, its `input` also carries `attach_target`, what the gateway said about the
//!   VM: see [`crate::peers`]);
//! - stdout: the observed status as one JSON document (empty output means `{}`);
//! - exit 0: success; exit 75 (`EX_TEMPFAIL`): transient failure, stderr says why;
//!   any other exit: permanent failure `exec_failed`, stderr says why;
//! - the program is killed if it runs past the operation's deadline;
//! - it must be idempotent per `operation_id`: the same operation can arrive again.

use super::{time_left, Driver, DriverError};
use gateway_proto::Dispatch;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// `EX_TEMPFAIL` from `sysexits.h`: the program asks to be run again later.
pub const EXIT_TEMPFAIL: i32 = 75;

/// Longest error message taken from stderr; the rest is cut.
const MAX_MESSAGE_BYTES: usize = 2048;

/// Runs one program per operation; see the module documentation for the protocol.
#[derive(Debug, Clone)]
pub struct ExecDriver {
    /// The program to run: a path, or a name looked up in `PATH`.
    program: PathBuf,
    /// Its arguments, the same for every operation.
    args: Vec<String>,
}

impl ExecDriver {
    /// A driver that runs `program` with `args` for every operation.
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        Self { program, args }
    }

    /// Starts the program with piped stdin, stdout and stderr, to be killed when dropped.
    fn spawn(&self) -> Result<Child, DriverError> {
        Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropping the future (deadline, shutdown) must not leave the program running.
            .kill_on_drop(true)
            .spawn()
            // The program may appear (a mount, a deploy in progress): let the loop retry,
            // and fail the operation with `retries_exhausted` if it never does.
            .map_err(|e| {
                DriverError::Transient(format!("cannot start {}: {e}", self.program.display()))
            })
    }

    /// What the program's exit status and output say, as the protocol defines it.
    fn outcome(&self, output: &Output) -> Result<serde_json::Value, DriverError> {
        let stderr = message(&output.stderr);
        match output.status.code() {
            Some(0) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                if stdout.trim().is_empty() {
                    return Ok(serde_json::json!({}));
                }
                serde_json::from_str(stdout.trim()).map_err(|e| {
                    DriverError::permanent(
                        "exec_bad_output",
                        format!(
                            "{} printed something that is not JSON: {e}",
                            self.program.display()
                        ),
                    )
                })
            }
            Some(EXIT_TEMPFAIL) => Err(DriverError::Transient(stderr)),
            Some(code) => Err(DriverError::permanent(
                "exec_failed",
                if stderr.is_empty() {
                    format!("{} exited with status {code}", self.program.display())
                } else {
                    stderr
                },
            )),
            None => Err(DriverError::permanent(
                "exec_failed",
                format!(
                    "{} was killed by a signal: {stderr}",
                    self.program.display()
                ),
            )),
        }
    }
}

impl Driver for ExecDriver {
    async fn execute(&self, op: &Dispatch) -> Result<serde_json::Value, DriverError> {
        let remaining = time_left(op)?;
        let input = serde_json::to_vec(op).map_err(|e| {
            DriverError::permanent("exec_failed", format!("cannot encode the operation: {e}"))
        })?;
        let child = self.spawn()?;
        let output = match tokio::time::timeout(remaining, feed_and_wait(child, input)).await {
            Ok(output) => output.map_err(|e| {
                DriverError::Transient(format!("waiting for {}: {e}", self.program.display()))
            })?,
            // The timeout dropped the child, which kills it.
            Err(_) => return Err(DriverError::deadline_exceeded(op)),
        };
        self.outcome(&output)
    }
}

/// Writes `input` to the child's stdin, closes it, and waits for the child to exit.
async fn feed_and_wait(mut child: Child, input: Vec<u8>) -> std::io::Result<Output> {
    let mut stdin = child.stdin.take();
    let feed = async move {
        if let Some(stdin) = stdin.as_mut() {
            // A program that does not read its input closes the pipe early; that is its
            // business, so a broken pipe is not an error.
            if let Err(e) = stdin.write_all(&input).await {
                tracing::debug!(error = %e, "exec driver: program did not read all of its input");
            }
        }
        drop(stdin);
    };
    tokio::join!(feed, child.wait_with_output()).1
}

/// Stderr as an error message: trimmed, lossily decoded, cut to a bounded length.
fn message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sim::tests::dispatch;
    use chrono::Utc;
    use gateway_proto::{Action, Kind};
    use serde_json::json;

    fn sh(script: &str) -> ExecDriver {
        ExecDriver::new("/bin/sh".into(), vec!["-c".into(), script.into()])
    }

    fn op() -> Dispatch {
        dispatch(
            Kind::named("volume"),
            Action::create(),
            "data",
            json!({"size_gb": 20, "class": "ssd"}),
        )
    }

    #[tokio::test]
    async fn exit_zero_returns_stdout_as_the_status() {
        let status = sh(r#"cat >/dev/null; echo '{"size_gb": 20, "ok": true}'"#)
            .execute(&op())
            .await
            .unwrap();
        assert_eq!(status, json!({"size_gb": 20, "ok": true}));
    }

    #[tokio::test]
    async fn the_program_reads_the_dispatch_on_stdin() {
        let op = op();
        let status = sh("cat").execute(&op).await.unwrap();
        assert_eq!(status["operation_id"], op.operation_id.to_string());
        assert_eq!(status["spec"]["class"], "ssd");
    }

    #[tokio::test]
    async fn empty_output_is_an_empty_status() {
        assert_eq!(sh("true").execute(&op()).await.unwrap(), json!({}));
    }

    #[tokio::test]
    async fn exit_75_is_transient_with_stderr_as_the_reason() {
        let err = sh("echo 'backend busy' >&2; exit 75")
            .execute(&op())
            .await
            .unwrap_err();
        assert_eq!(err, DriverError::Transient("backend busy".into()));
    }

    #[tokio::test]
    async fn other_failures_are_permanent() {
        let err = sh("echo '  no such image  ' >&2; exit 1")
            .execute(&op())
            .await
            .unwrap_err();
        assert_eq!(err, DriverError::permanent("exec_failed", "no such image"));

        let err = sh("echo not-json").execute(&op()).await.unwrap_err();
        assert!(matches!(err, DriverError::Permanent { code, .. } if code == "exec_bad_output"));
    }

    #[tokio::test]
    async fn a_program_past_the_deadline_is_killed() {
        let mut op = op();
        op.deadline = Utc::now() + chrono::Duration::milliseconds(50);
        let started = std::time::Instant::now();
        let err = sh("sleep 5").execute(&op).await.unwrap_err();
        assert!(matches!(err, DriverError::Permanent { code, .. } if code == "deadline_exceeded"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_missing_program_is_transient() {
        let driver = ExecDriver::new("/nonexistent/provision".into(), vec![]);
        assert!(driver.execute(&op()).await.unwrap_err().is_transient());
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = message(long.as_bytes());
        assert!(cut.len() <= MAX_MESSAGE_BYTES + "…".len());
        assert!(cut.ends_with('…'));
    }
}
