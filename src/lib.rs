//! # Control-plane gateway
//!
//! The one front door of a private cloud: clients create, change and delete VMs,
//! bare-metal servers, Kubernetes clusters and volumes through this API; workers in
//! each zone do the work and report back through the same API; PostgreSQL holds the
//! truth. See `README.md` for the picture and `docs/ARCHITECTURE.md` for the design.
//!
//! ## Code map
//!
//! - [`config`]: one `Config` from the environment.
//! - [`domain`]: resource types (JSON Schema specs, `x-` rules, actions, safe
//!   evolution), phases, quotas, the report state machine. Pure: no I/O.
//! - [`registry`]: the registered resource types each process serves, kept fresh by
//!   notification ([`notify`]).
//! - [`store`]: every SQL statement, one module per table group.
//! - [`lifecycle`]: each state change as one transaction (resource + operation +
//!   outbox row), including the promotion of queued operations.
//! - [`changes`]: after-commit notifications: operation changes for long-polls, and the
//!   relay's doorbell.
//! - [`replication`]: global data (tenants, keys, catalog, quotas, webhooks, types)
//!   between regions, through JetStream, last writer wins by hybrid logical clock.
//! - [`relay`]: outbox → JetStream, every message signed; [`jetstream`]: stream and
//!   consumer definitions.
//! - [`credentials`]: the broker's users and permissions, their NKEYs, the dispatch
//!   signing key; [`broker`]: `up`'s private, authenticated `nats-server`.
//! - [`reconciler`]: deadlines, lost messages and unapplied specs, one active per
//!   deployment; [`deadletter`]: operations whose message JetStream gave up on.
//! - [`api`]: the HTTP surface (axum), errors, extractors, OpenAPI.
//! - [`auth`]: keys, roles and the permission table; [`audit`]: the hash-chained trail.
//! - [`cache`]: the read-through catalog cache; [`keycache`]: resolved API keys, dropped
//!   when a key changes anywhere; [`readcache`]: operations and resources read by ID,
//!   dropped when they change anywhere; [`metrics`]: every Prometheus metric.
//! - [`serve`]: the HTTP accept loop (header timeout, graceful drain).
//! - [`app`]: assembling the processes (`migrate`, `serve`, `relay`, `up`);
//!   [`admin`]: `gateway admin …`; [`telemetry`]: logging set-up.
//!
//! ## Invariants
//!
//! One numbered list, each with the test that guards it: `docs/ARCHITECTURE.md`,
//! "Invariants".

pub mod admin;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod changes;
pub mod config;
pub mod credentials;
pub mod deadletter;
pub mod domain;
pub mod eventlog;
pub mod events;
pub mod jetstream;
pub mod keycache;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
#[cfg(debug_assertions)]
pub mod pause;
pub mod readcache;
pub mod reconciler;
pub mod registry;
pub mod relay;
pub mod replication;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod views;
pub mod webhooks;
