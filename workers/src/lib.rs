//! Zone workers: consume operations from JetStream, run a driver, report through the
//! gateway API.
//!
//! # Code map
//!
//! - [`consume`]: [`run_pool`], the consume loop of one pool (service × zone): bind the
//!   durable pull consumer, pull as many messages as there are free slots, report
//!   `running`, look up peers, run the driver with retries, report the outcome, then
//!   settle the message. Each message is handled in a span carrying the client's
//!   `request_id` and `traceparent` (from the message's headers), which reports and
//!   peer reads forward to the gateway. Its `pool` submodule speaks JetStream; its
//!   `handler` submodule decides what to report and how each message is settled.
//! - [`report`]: [`report::GatewayClient`], the HTTP client for
//!   `POST /v1/operations/{id}/reports`, and the sorting of the gateway's answers into
//!   accepted, refused (`409`), retry (`5xx`, `429`, unreachable) and give up.
//! - [`peers`]: what an operation needs to know about other resources (the VM a volume
//!   attaches to), read through the gateway before the driver runs and handed to the
//!   driver in the dispatch's `input`.
//! - [`drivers`]: the [`Driver`] trait; [`SimDriver`], a simulated backend for every
//!   service; [`ExecDriver`], an external program per operation (JSON in, JSON out).
//! - [`config`]: [`PoolConfig`] for one pool, and [`config::WorkerConfig`], the `worker`
//!   binary's environment.
//! - [`metrics`]: [`WorkerMetrics`], the Prometheus metrics every pool counts into
//!   (messages by outcome, driver attempts, retries and latency, report retries, peer
//!   reads, in-flight); [`run_pool_with_metrics`] takes them, [`run_pool`] keeps them
//!   to itself.
//! - [`http`]: the `worker` binary's own `GET /metrics`, `/healthz` and `/readyz`.
//! - [`nats`]: [`nats::NatsLogin`], how a process logs in to NATS (credentials, TLS,
//!   its own reply inbox), read from the `NATS_*` variables; the gateway uses it too.
//!
//! The wire contract (the `Dispatch` message, `Report`, `ReportAck`, subject and consumer
//! names, header names) lives in `gateway-proto`, shared with the gateway.
//!
//! **Architecture invariant:** workers never touch PostgreSQL; there is no database URL
//! in this crate. Work comes in through NATS; everything else goes through the gateway
//! API, with the worker's own scoped key.
//!
//! **Trust:** a message is acted on only if it carries a valid signature by one of the
//! gateway's dispatch keys ([`PoolConfig::dispatch_keys`], checked before anything else);
//! anything else is terminated and counted as `forged`, never retried.
//!
//! **Architecture invariant:** a message is acknowledged only after the gateway accepted
//! the operation's terminal report (or answered `409`: the operation is not this
//! delivery's to finish). A crash at any point leaves the message to JetStream, and
//! drivers are idempotent per operation ID, so a redelivery never acts twice.

#![warn(missing_docs)]

pub mod batch;
pub mod config;
pub mod consume;
pub mod drivers;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod peers;
pub mod report;

pub use config::PoolConfig;
pub use consume::{run_pool, run_pool_with_metrics};
pub use drivers::{Driver, DriverError, ExecDriver, SimConfig, SimDriver};
pub use gateway_proto::Service;
pub use metrics::WorkerMetrics;

/// What the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod testing {
    /// A port of this host nothing listens on (bound, read and let go).
    pub fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
