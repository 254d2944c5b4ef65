//! The gateway's integration tests, in one binary: one link instead of one per file,
//! and one harness ([`common`]) compiled once.
//!
//! Every test runs against the real PostgreSQL and NATS (`TEST_DATABASE_URL`,
//! `NATS_URL`) in its own database and its own JetStream stream and subjects, so all of
//! them run in parallel. Run one file's tests with `cargo test --test it api::`.

mod common;

mod admission;
mod api;
mod architecture;
mod audit_trail;
mod cli;
mod compat;
mod contract;
mod deploy;
mod deploy_kubernetes;
mod events;
mod events_watch;
mod faults_postgres;
mod faults_reconciler;
mod faults_relay;
mod faults_scale;
mod faults_workers;
mod group_commit;
mod http_defects;
mod jetstream_setup;
mod labels;
mod lifecycle;
mod metrics;
mod nats_auth;
mod operations;
mod outbox;
mod postgres_tls;
mod quotas;
mod reads;
mod regions;
mod reports;
mod resource_types;
mod security;
mod up;
mod validation;
mod webhooks;
mod worker_ready;
