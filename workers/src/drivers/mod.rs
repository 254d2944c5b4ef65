//! Drivers: the part of a worker that acts on the world.
//!
//! The consume loop ([`crate::run_pool`]) owns everything JetStream and the gateway care
//! about (reports, acks, retries across deliveries); a driver only turns one
//! [`Dispatch`] into an observed status, or says why it could not. The loop and the exec
//! driver both stop at the operation's deadline (`time_left`), with the same
//! `deadline_exceeded` error.
//!
//! **Contract:** a driver is idempotent per [`Dispatch::operation_id`]. The same operation
//! can reach it more than once (a redelivery after a crash, a lost ack, a retry after a
//! transient error), and the effect must happen at most once.

use chrono::Utc;
use gateway_proto::Dispatch;
use std::future::Future;
use std::time::Duration;

pub mod exec;
pub mod sim;

pub use exec::ExecDriver;
pub use sim::{SimConfig, SimDriver};

/// Carries out operations for one service.
///
/// Implementations are shared by every message in flight in a pool, hence `Sync`.
pub trait Driver: Send + Sync + 'static {
    /// Converges the resource on `op.spec` (or performs `op.action`) and returns the
    /// observed status, as JSON, that the gateway stores on the resource.
    ///
    /// Must be idempotent per `op.operation_id`.
    fn execute(
        &self,
        op: &Dispatch,
    ) -> impl Future<Output = Result<serde_json::Value, DriverError>> + Send;
}

/// Why a driver did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// Worth trying again later (a backend timed out, a lock was busy). The loop retries
    /// in process, then hands the message back to JetStream, and fails the operation with
    /// `retries_exhausted` on the last delivery.
    #[error("transient failure: {0}")]
    Transient(String),
    /// Trying again cannot help (bad input, no capacity, a refused request). The loop
    /// reports the operation `failed` with this code and terminates the message.
    #[error("{code}: {message}")]
    Permanent {
        /// Stable machine-readable code, e.g. `capacity_exhausted`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
}

impl DriverError {
    /// A permanent error with `code` and `message`.
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        DriverError::Permanent {
            code: code.into(),
            message: message.into(),
        }
    }

    /// Whether the loop should retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, DriverError::Transient(_))
    }

    /// The permanent error `deadline_exceeded`: `op`'s deadline passed before it was
    /// done.
    pub(crate) fn deadline_exceeded(op: &Dispatch) -> Self {
        DriverError::permanent(
            "deadline_exceeded",
            format!(
                "the operation's deadline {} passed",
                op.deadline.to_rfc3339()
            ),
        )
    }
}

/// The time left until `op`'s deadline; [`DriverError::deadline_exceeded`] once none is.
pub(crate) fn time_left(op: &Dispatch) -> Result<Duration, DriverError> {
    (op.deadline - Utc::now())
        .to_std()
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| DriverError::deadline_exceeded(op))
}
