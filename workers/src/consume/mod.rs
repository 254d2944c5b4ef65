//! The consume loop: pull operations from a pool's durable consumer, run the driver,
//! report through the gateway, and only then settle the message.
//!
//! The loop is split in two so its decisions can be tested without NATS:
//!
//! - `pool`: [`run_pool`] and its helpers speak JetStream: bind the consumer, pull as
//!   many messages as there are free slots, send `Progress` while work runs, ack / nak /
//!   term, drain on shutdown (tested against a real NATS in `workers/tests/nats_loop.rs`);
//! - `handler`: `Handler::handle` decides, for one delivery, what to report and how the
//!   message is settled (`Disposition`), talking to the gateway through a `Reporter`
//!   (unit-tested with a fake gateway).
//!
//! This file holds what both sides share: `Disposition`, and the seeding of backoffs.
//!
//! **Architecture invariant:** a message is acked only after the gateway accepted the
//! operation's terminal report, or told us (`409`) that the operation is not ours to
//! finish. Anything else — crash, shutdown, unreachable gateway — leaves the message to
//! JetStream, which delivers it again.

use backon::ExponentialBuilder;
use std::time::Duration;

mod handler;
mod pool;

pub use handler::nak_delay;
pub use pool::{run_pool, run_pool_with_metrics, PROGRESS_INTERVAL, SHUTDOWN_GRACE};

/// What becomes of a message once handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Done: the gateway accepted the outcome, or said the operation is not ours.
    Ack,
    /// Never deliver again: a poison message, a permanent failure (reported), or a
    /// report the gateway will never accept.
    Term,
    /// Deliver again, after the delay if any.
    Nak(Option<Duration>),
}

/// backon seeds its jitter with a constant unless its `std` feature is on; a random seed
/// keeps workers that failed together from retrying together.
fn seeded(builder: ExponentialBuilder) -> ExponentialBuilder {
    builder.with_jitter_seed(rand::random())
}
