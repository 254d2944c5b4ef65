//! The gateway's Prometheus metrics, in one place (OpenMetrics text at `GET /metrics`).
//!
//! Labels are of bounded cardinality only: service, zone, state, action, outcome, route
//! template, method, status class — never an ID. Gauges that describe the database or
//! JetStream (backlogs, active operations, consumer state) are refreshed by
//! [`Metrics::refresh`] every few seconds rather than at scrape time, so a scrape never
//! waits on PostgreSQL or NATS.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `gateway_http_requests_total` | counter | route, method, status | answered requests (status class `2xx`…) |
//! | `gateway_http_request_duration_seconds` | histogram | route, method | time to answer |
//! | `gateway_http_requests_in_flight` | gauge | | requests being answered |
//! | `gateway_rate_limited_total` | counter | bucket | requests refused with `429` |
//! | `gateway_admission_write_limit` | gauge | | writes admitted at once now: `GATEWAY_MAX_IN_FLIGHT_WRITES`, lower while admitted writes take longer than `GATEWAY_WRITE_LATENCY_TARGET_MS` |
//! | `gateway_overloaded_total` | counter | class | requests (`write`, `read`, `poll`, `report`) and connections (`connection`) refused with `503 overloaded` |
//! | `gateway_operations_created_total` | counter | action, service, zone | accepted operations |
//! | `gateway_operations_finished_total` | counter | action, service, zone, outcome | operations that ended, by terminal state |
//! | `gateway_operation_duration_seconds` | histogram | action, service | submission to terminal state |
//! | `gateway_operation_wait_seconds` | histogram | action, service | submission to a worker starting it (time queued) |
//! | `gateway_operations_active` | gauge | state | operations in each non-terminal state |
//! | `gateway_outbox_pending` | gauge | | rows waiting for the relay |
//! | `gateway_outbox_oldest_age_seconds` | gauge | | age of the oldest waiting row |
//! | `gateway_outbox_published_total` | counter | | rows JetStream acknowledged (duplicates included) |
//! | `gateway_outbox_publish_errors_total` | counter | | publishes that failed or timed out |
//! | `gateway_relay_batch_size` | histogram | | rows claimed per relay pass |
//! | `gateway_relay_lag_seconds` | histogram | | outbox row written (its insert, not its transaction's start) to JetStream ack, counted once per message, in the pass JetStream acknowledged it in |
//! | `gateway_relay_empty_passes_total` | counter | | relay passes for dispatches that found nothing to publish (a ring another loop answered, a poll); idle work, not a fault |
//! | `gateway_relay_busy_rows_total` | counter | | outbox rows a relay pass published (or found published by an earlier one) but could not record, because another transaction held their resource at that moment; a later pass records them without publishing them again; not a fault |
//! | `gateway_write_batch_size` | histogram | | creates recorded per group-commit transaction |
//! | `gateway_write_batch_failures_total` | counter | | group-commit batches of two or more creates whose statement or transaction failed; their creates were then recorded one by one |
//! | `gateway_events_pending` | gauge | | events recorded and not yet published |
//! | `gateway_events_oldest_age_seconds` | gauge | | age of the oldest unpublished event |
//! | `gateway_events_published_total` | counter | | events JetStream acknowledged |
//! | `gateway_events_malformed_total` | counter | | event rows that could not be turned into CloudEvents (dropped, logged) |
//! | `gateway_events_lag_seconds` | histogram | | a change's commit to its event's JetStream ack |
//! | `gateway_watch_streams` | gauge | | open watch (server-sent events) streams |
//! | `gateway_watch_events_sent_total` | counter | | events sent to watch streams |
//! | `gateway_watch_refused_total` | counter | reason | watch streams refused (`too_many_streams`) |
//! | `gateway_webhook_events_total` | counter | | deliveries created by the fan-out of events to endpoints |
//! | `gateway_webhook_attempts_total` | counter | outcome | delivery attempts: `delivered`, `retrying`, `failed` (the schedule is spent) |
//! | `gateway_webhook_attempt_duration_seconds` | histogram | | time to an endpoint's answer (or failure) |
//! | `gateway_webhook_endpoints_disabled_total` | counter | | endpoints disabled for failing |
//! | `gateway_webhook_deliveries_expired_total` | counter | | deliveries deleted, with their attempts, past `WEBHOOK_RETENTION_SECONDS` (over, or waiting for a disabled endpoint) |
//! | `gateway_webhook_backlog` | gauge | | deliveries waiting (due or scheduled) for enabled endpoints |
//! | `gateway_webhook_oldest_due_seconds` | gauge | | how long the oldest due delivery has waited |
//! | `gateway_jetstream_consumer_pending` | gauge | service, zone | messages not yet delivered |
//! | `gateway_jetstream_consumer_ack_pending` | gauge | service, zone | delivered, not yet acknowledged |
//! | `gateway_jetstream_consumer_redelivered` | gauge | service, zone | messages redelivered at least once |
//! | `gateway_jetstream_consumer_waiting` | gauge | service, zone | pull requests waiting |
//! | `gateway_dead_letters_total` | counter | service, zone | operations failed because JetStream gave up delivering them |
//! | `gateway_db_connections` | gauge | state | pool connections `in_use` / `idle` |
//! | `gateway_database_autovacuum` | gauge | | 1 while PostgreSQL's `autovacuum` is on, 0 while it is off (the queue tables then grow without bound and the planner's statistics go stale) |
//! | `gateway_queue_table_bytes` | gauge | table | on-disk size (with indexes and TOAST) of the tables whose rows live for one relay pass: `outbox`, `event_outbox`; large only when vacuum cannot remove their dead rows |
//! | `gateway_reconciler_actions_total` | counter | action | repairs (`expired`, `redispatched`, `converged`, …) |
//! | `gateway_audit_write_errors_total` | counter | | audit rows lost: the spool was full, or the process stopped with rows unwritten |
//! | `gateway_audit_spooled` | gauge | | audit rows waiting to be written (while the database is down, the spool) |
//! | `gateway_audit_chain_rewritten_total` | counter | | times a sealer found a link of the audit chain it had seen gone or changed: the chain's newest rows and links were removed or replaced (links are only ever appended) |
//! | `gateway_audit_anchor_errors_total` | counter | | failed reads or writes of the audit chain's end saved on the broker (`{OPS_STREAM}-AUDIT`); while they fail, a rewrite of the chain's end made while no gateway runs goes unnoticed |
//! | `gateway_audit_unsealed` | gauge | | audit rows written and not yet in the hash chain; grows while a transaction stays open, since rows newer than it wait for it to end; counted up to 100,000 (which then means "at least") |
//! | `gateway_cache_requests_total` | counter | cache, result | lookups of the catalog, zones, tenants, API keys and of operations and resources read by ID, answered from memory (`hit`) or the database (`miss`) |
//! | `gateway_quota_rejections_total` | counter | service, dimension | writes refused with `quota_exceeded`, by the dimension of the limit they would pass |
//! | `gateway_replication_lag_seconds` | gauge | peer | how far behind this region's copy of a peer region's global data is: now minus the peer's clock in the newest change or heartbeat applied from it (heartbeats come every second; `+Inf` before the first) |
//! | `gateway_replication_changes_total` | counter | peer, result | changes from a peer region: `applied`, `stale` (a newer version was here), `parked` (retried later) |
//! | `gateway_replication_pending` | gauge | | this region's changes not yet published to its replication stream |
//! | `gateway_replication_parked` | gauge | | peer changes waiting for a parent row or a unique name |
//! | `gateway_replication_tombstones` | gauge | | deleted rows remembered: until every region has seen the deletion, and for good those this region deleted |
//! | `gateway_quota_usage_ratio` | histogram | dimension | how full each quota limit a write grows is once the write is accepted (used / limit); no tenant label |

use crate::domain::quota::Dimension;
use crate::domain::{Action, OperationState, Service};
use crate::store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Route template, method and status class of an answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route template, e.g. `/v1/operations/{id}`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// `2xx`, `4xx`, …
    pub status: String,
}

/// Route template and method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route template.
    pub route: String,
    /// HTTP method.
    pub method: String,
}

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BucketLabels {
    /// Rate-limit bucket: `write`, `read`, `poll`, `anonymous`.
    pub bucket: String,
}

/// A class of requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `write`, `read`, `poll`, `report` or `connection`.
    pub class: String,
}

/// An outcome alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeOnly {
    /// What became of it.
    pub outcome: String,
}

/// Labels of a peer region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer region.
    pub peer: String,
}

/// Labels of changes from a peer region.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerResultLabels {
    /// The peer region.
    pub peer: String,
    /// `applied`, `stale` or `parked`.
    pub result: String,
}

/// Why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A stable code, e.g. `too_many_streams`.
    pub reason: String,
}

/// What an operation does, where.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `create`, `delete`, …
    pub action: String,
    /// `vm`, `bm`, `k8s`, `storage`.
    pub service: String,
    /// Zone.
    pub zone: String,
}

/// What an operation does, where, and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `create`, `delete`, …
    pub action: String,
    /// Service.
    pub service: String,
    /// Zone.
    pub zone: String,
    /// `succeeded`, `failed`, `cancelled`.
    pub outcome: String,
}

/// What an operation does, for latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `create`, `delete`, …
    pub action: String,
    /// Service.
    pub service: String,
}

/// One worker pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Service.
    pub service: String,
    /// Zone.
    pub zone: String,
}

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// An operation state, or a connection state.
    pub state: String,
}

/// A table of the database.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// Its name.
    pub table: String,
}

/// Which cache, and whether it had the answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `catalog`, `zones`, `tenants`, `keys`, `operations` or `resources`.
    pub cache: String,
    /// `hit` or `miss`.
    pub result: String,
}

/// Which service's write a quota refused, and in which dimension.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    /// Service.
    pub service: String,
    /// `count`, `vcpus`, `memory_mb`, `nodes`, `storage_gb`.
    pub dimension: String,
}

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DimensionLabels {
    /// `count`, `vcpus`, `memory_mb`, `nodes`, `storage_gb`.
    pub dimension: String,
}

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    /// What the reconciler did.
    pub action: String,
}

/// What the reconciler and the dead-letter handler count in
/// `gateway_reconciler_actions_total`.
pub const REPAIRS: &[&str] = &[
    "expired",
    "redispatched",
    "converged",
    "dead_lettered",
    "idempotency_expired",
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn fill_ratio() -> Histogram {
    // How full a quota limit is: finer towards full.
    Histogram::new([0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0])
}

fn long_latency() -> Histogram {
    // 50 ms … ~3.6 h
    Histogram::new(exponential_buckets(0.05, 2.0, 19))
}

/// Every metric of the gateway. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// The metric families.
pub struct Inner {
    /// See the table in the module docs.
    pub http_requests: Family<HttpLabels, Counter>,
    /// See the table in the module docs.
    pub http_duration: HistogramFamily<RouteLabels>,
    /// See the table in the module docs.
    pub http_in_flight: Gauge,
    /// See the table in the module docs.
    pub rate_limited: Family<BucketLabels, Counter>,
    /// See the table in the module docs.
    pub overloaded: Family<ClassLabels, Counter>,
    /// See the table in the module docs.
    pub write_limit: Gauge,
    /// See the table in the module docs.
    pub operations_created: Family<OperationLabels, Counter>,
    /// See the table in the module docs.
    pub operations_finished: Family<OutcomeLabels, Counter>,
    /// See the table in the module docs.
    pub operation_duration: HistogramFamily<ActionLabels>,
    /// See the table in the module docs.
    pub operation_wait: HistogramFamily<ActionLabels>,
    /// See the table in the module docs.
    pub operations_active: Family<StateLabels, Gauge>,
    /// See the table in the module docs.
    pub database_autovacuum: Gauge,
    /// See the table in the module docs.
    pub queue_table_bytes: Family<TableLabels, Gauge>,
    /// Whether the log has said that autovacuum is off (it says so once, not at every
    /// refresh).
    autovacuum_warned: std::sync::atomic::AtomicBool,
    /// See the table in the module docs.
    pub outbox_pending: Gauge,
    /// See the table in the module docs.
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    /// See the table in the module docs.
    pub outbox_published: Counter,
    /// See the table in the module docs.
    pub outbox_publish_errors: Counter,
    /// See the table in the module docs.
    pub relay_batch_size: Histogram,
    /// See the table in the module docs.
    pub relay_lag: Histogram,
    /// See the table in the module docs.
    pub relay_empty_passes: Counter,
    /// See the table in the module docs.
    pub relay_busy_rows: Counter,
    /// See the table in the module docs.
    pub write_batch_size: Histogram,
    /// See the table in the module docs.
    pub write_batch_failures: Counter,
    /// See the table in the module docs.
    pub events_pending: Gauge,
    /// See the table in the module docs.
    pub events_oldest_age: Gauge<f64, AtomicU64>,
    /// See the table in the module docs.
    pub events_published: Counter,
    /// See the table in the module docs.
    pub events_malformed: Counter,
    /// See the table in the module docs.
    pub events_lag: Histogram,
    /// See the table in the module docs.
    pub watch_streams: Gauge,
    /// See the table in the module docs.
    pub watch_events_sent: Counter,
    /// See the table in the module docs.
    pub watch_refused: Family<ReasonLabels, Counter>,
    /// See the table in the module docs.
    pub webhook_events: Counter,
    /// See the table in the module docs.
    pub webhook_attempts: Family<OutcomeOnly, Counter>,
    /// See the table in the module docs.
    pub webhook_latency: Histogram,
    /// See the table in the module docs.
    pub webhook_disabled: Counter,
    /// See the table in the module docs.
    pub webhook_expired: Counter,
    /// See the table in the module docs.
    pub webhook_backlog: Gauge,
    /// See the table in the module docs.
    pub webhook_oldest_due: Gauge<f64, AtomicU64>,
    /// See the table in the module docs.
    pub consumer_pending: Family<PoolLabels, Gauge>,
    /// See the table in the module docs.
    pub consumer_ack_pending: Family<PoolLabels, Gauge>,
    /// See the table in the module docs.
    pub consumer_redelivered: Family<PoolLabels, Gauge>,
    /// See the table in the module docs.
    pub consumer_waiting: Family<PoolLabels, Gauge>,
    /// See the table in the module docs.
    pub dead_letters: Family<PoolLabels, Counter>,
    /// See the table in the module docs.
    pub db_connections: Family<StateLabels, Gauge>,
    /// See the table in the module docs.
    pub reconciler_actions: Family<RepairLabels, Counter>,
    /// See the table in the module docs.
    pub audit_write_errors: Counter,
    /// See the table in the module docs.
    pub audit_spooled: Gauge,
    /// See the table in the module docs.
    pub audit_unsealed: Gauge,
    /// See the table in the module docs.
    pub audit_chain_rewritten: Counter,
    /// See the table in the module docs.
    pub audit_anchor_errors: Counter,
    /// See the table in the module docs.
    pub cache_requests: Family<CacheLabels, Counter>,
    /// See the table in the module docs.
    pub quota_rejections: Family<QuotaLabels, Counter>,
    /// See the table in the module docs.
    pub quota_usage: HistogramFamily<DimensionLabels>,
    /// See the table in the module docs.
    pub replication_lag: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// See the table in the module docs.
    pub replication_changes: Family<PeerResultLabels, Counter>,
    /// See the table in the module docs.
    pub replication_pending: Gauge,
    /// See the table in the module docs.
    pub replication_parked: Gauge,
    /// See the table in the module docs.
    pub replication_tombstones: Gauge,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Default for Metrics {
    /// Metrics registered nowhere (for tests and tools that do not expose them).
    fn default() -> Self {
        Self::register(&mut Registry::default())
    }
}

impl Inner {
    /// The families of replication between regions.
    fn register_replication(&self, r: &mut Registry) {
        r.register(
            "replication_lag_seconds",
            "How far behind this region's copy of each peer region's global data is",
            self.replication_lag.clone(),
        );
        r.register(
            "replication_changes",
            "Changes from peer regions, by result",
            self.replication_changes.clone(),
        );
        r.register(
            "replication_pending",
            "This region's changes not yet published to its replication stream",
            self.replication_pending.clone(),
        );
        r.register(
            "replication_parked",
            "Peer changes waiting for a parent row or a unique name",
            self.replication_parked.clone(),
        );
        r.register(
            "replication_tombstones",
            "Deleted rows remembered: until every region has seen the deletion, and for good those this region deleted",
            self.replication_tombstones.clone(),
        );
    }

    /// The families of tenant quotas.
    fn register_quotas(&self, r: &mut Registry) {
        r.register(
            "quota_rejections",
            "Writes refused because they would pass a tenant's quota, by service and dimension",
            self.quota_rejections.clone(),
        );
        r.register(
            "quota_usage_ratio",
            "How full each quota limit a write grows is once the write is accepted",
            self.quota_usage.clone(),
        );
    }

    /// The families of HTTP requests, operations and the audit spool.
    fn register_requests(&self, r: &mut Registry) {
        r.register(
            "audit_spooled",
            "Audit rows waiting to be written",
            self.audit_spooled.clone(),
        );
        r.register(
            "audit_unsealed",
            "Audit rows written and not yet in the hash chain (counted up to 100,000)",
            self.audit_unsealed.clone(),
        );
        r.register(
            "audit_chain_rewritten",
            "Times a sealer found a link of the audit chain it had seen gone or changed",
            self.audit_chain_rewritten.clone(),
        );
        r.register(
            "audit_anchor_errors",
            "Failed reads or writes of the audit chain's end saved on the broker",
            self.audit_anchor_errors.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status class",
            self.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests",
            self.http_duration.clone(),
        );
        r.register(
            "http_requests_in_flight",
            "HTTP requests being answered",
            self.http_in_flight.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused with 429, by bucket",
            self.rate_limited.clone(),
        );
        r.register(
            "overloaded",
            "Requests and connections refused with 503 overloaded, by class",
            self.overloaded.clone(),
        );
        r.register(
            "admission_write_limit",
            "Writes admitted at once now (follows their latency when a target is set)",
            self.write_limit.clone(),
        );
        r.register(
            "operations_created",
            "Operations accepted",
            self.operations_created.clone(),
        );
        r.register(
            "operations_finished",
            "Operations that reached a terminal state, by outcome",
            self.operations_finished.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Time from submission to a terminal state",
            self.operation_duration.clone(),
        );
        r.register(
            "operation_wait_seconds",
            "Time from submission to a worker starting the operation",
            self.operation_wait.clone(),
        );
        r.register(
            "operations_active",
            "Operations in each non-terminal state",
            self.operations_active.clone(),
        );
    }

    /// The families of webhooks.
    fn register_webhooks(&self, r: &mut Registry) {
        r.register(
            "webhook_events",
            "Deliveries created by the fan-out of events to endpoints",
            self.webhook_events.clone(),
        );
        r.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, retrying, failed)",
            self.webhook_attempts.clone(),
        );
        r.register(
            "webhook_attempt_duration_seconds",
            "Time to a webhook endpoint's answer or failure",
            self.webhook_latency.clone(),
        );
        r.register(
            "webhook_endpoints_disabled",
            "Webhook endpoints disabled for failing",
            self.webhook_disabled.clone(),
        );
        r.register(
            "webhook_deliveries_expired",
            "Webhook deliveries deleted past the retention",
            self.webhook_expired.clone(),
        );
        r.register(
            "webhook_backlog",
            "Webhook deliveries waiting for enabled endpoints",
            self.webhook_backlog.clone(),
        );
        r.register(
            "webhook_oldest_due_seconds",
            "How long the oldest due webhook delivery has waited",
            self.webhook_oldest_due.clone(),
        );
    }

    /// The families of the events outbox.
    fn register_events(&self, r: &mut Registry) {
        r.register(
            "events_pending",
            "Events recorded and not yet published",
            self.events_pending.clone(),
        );
        r.register(
            "events_oldest_age_seconds",
            "Age of the oldest unpublished event",
            self.events_oldest_age.clone(),
        );
        r.register(
            "events_published",
            "Events JetStream acknowledged",
            self.events_published.clone(),
        );
        r.register(
            "events_malformed",
            "Event rows that could not become CloudEvents (dropped and logged)",
            self.events_malformed.clone(),
        );
        r.register(
            "events_lag_seconds",
            "Time from a change's commit to its event's JetStream ack",
            self.events_lag.clone(),
        );
        r.register(
            "watch_streams",
            "Open watch (server-sent events) streams",
            self.watch_streams.clone(),
        );
        r.register(
            "watch_events_sent",
            "Events sent to watch streams",
            self.watch_events_sent.clone(),
        );
        r.register(
            "watch_refused",
            "Watch streams refused, by reason",
            self.watch_refused.clone(),
        );
        self.register_webhooks(r);
    }

    /// The families of the group commit.
    fn register_writes(&self, r: &mut Registry) {
        r.register(
            "write_batch_size",
            "Creates recorded per group-commit transaction",
            self.write_batch_size.clone(),
        );
        r.register(
            "write_batch_failures",
            "Group-commit batches of two or more creates that failed as a whole (their creates were then recorded one by one)",
            self.write_batch_failures.clone(),
        );
    }

    /// The families of the outbox and the relay.
    fn register_relay(&self, r: &mut Registry) {
        r.register(
            "outbox_pending",
            "Outbox rows waiting for the relay",
            self.outbox_pending.clone(),
        );
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest outbox row",
            self.outbox_oldest_age.clone(),
        );
        r.register(
            "outbox_published",
            "Outbox rows JetStream acknowledged (duplicates included)",
            self.outbox_published.clone(),
        );
        r.register(
            "outbox_publish_errors",
            "Outbox publishes that failed or timed out",
            self.outbox_publish_errors.clone(),
        );
        r.register(
            "relay_batch_size",
            "Outbox rows claimed per relay pass",
            self.relay_batch_size.clone(),
        );
        r.register(
            "relay_empty_passes",
            "Relay passes for dispatches that found nothing to publish",
            self.relay_empty_passes.clone(),
        );
        r.register(
            "relay_busy_rows",
            "Published outbox rows left for a later relay pass to record because their resource was in use",
            self.relay_busy_rows.clone(),
        );
        r.register(
            "relay_lag_seconds",
            "Time from an outbox row's insert to JetStream's ack",
            self.relay_lag.clone(),
        );
    }

    /// The families of the outbox, the relay, JetStream, repairs and the process.
    fn register_delivery(&self, r: &mut Registry) {
        self.register_relay(r);
        self.register_events(r);
        r.register(
            "jetstream_consumer_pending",
            "Messages not yet delivered to the pool",
            self.consumer_pending.clone(),
        );
        r.register(
            "jetstream_consumer_ack_pending",
            "Messages delivered to the pool and not yet acknowledged",
            self.consumer_ack_pending.clone(),
        );
        r.register(
            "jetstream_consumer_redelivered",
            "Messages of the pool redelivered at least once",
            self.consumer_redelivered.clone(),
        );
        r.register(
            "jetstream_consumer_waiting",
            "Pull requests of the pool waiting for messages",
            self.consumer_waiting.clone(),
        );
        r.register(
            "dead_letters",
            "Operations failed because JetStream gave up delivering them",
            self.dead_letters.clone(),
        );
        r.register(
            "db_connections",
            "Database pool connections by state (in_use, idle)",
            self.db_connections.clone(),
        );
        r.register(
            "database_autovacuum",
            "1 while PostgreSQL's autovacuum is on, 0 while it is off",
            self.database_autovacuum.clone(),
        );
        r.register(
            "queue_table_bytes",
            "On-disk size of the tables whose rows live for one relay pass (outbox, event_outbox), indexes and TOAST included",
            self.queue_table_bytes.clone(),
        );
        r.register(
            "reconciler_actions",
            "Repairs made by the reconciler, by kind",
            self.reconciler_actions.clone(),
        );
        r.register(
            "audit_write_errors",
            "Audit rows lost (spool full, or unwritten at exit)",
            self.audit_write_errors.clone(),
        );
        r.register(
            "cache_requests",
            "Cache lookups by cache and result (hit, miss)",
            self.cache_requests.clone(),
        );
    }
}

impl Metrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let inner = Inner {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency),
            http_in_flight: Gauge::default(),
            rate_limited: Family::default(),
            overloaded: Family::default(),
            write_limit: Gauge::default(),
            operations_created: Family::default(),
            operations_finished: Family::default(),
            operation_duration: Family::new_with_constructor(long_latency),
            operation_wait: Family::new_with_constructor(long_latency),
            operations_active: Family::default(),
            database_autovacuum: Gauge::default(),
            queue_table_bytes: Family::default(),
            autovacuum_warned: Default::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_age: Gauge::default(),
            outbox_published: Counter::default(),
            outbox_publish_errors: Counter::default(),
            relay_empty_passes: Counter::default(),
            relay_busy_rows: Counter::default(),
            relay_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            relay_lag: latency(),
            write_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            write_batch_failures: Counter::default(),
            events_pending: Gauge::default(),
            events_oldest_age: Gauge::default(),
            events_published: Counter::default(),
            events_malformed: Counter::default(),
            events_lag: latency(),
            watch_streams: Gauge::default(),
            watch_events_sent: Counter::default(),
            watch_refused: Family::default(),
            webhook_events: Counter::default(),
            webhook_attempts: Family::default(),
            webhook_latency: latency(),
            webhook_disabled: Counter::default(),
            webhook_expired: Counter::default(),
            webhook_backlog: Gauge::default(),
            webhook_oldest_due: Gauge::default(),
            consumer_pending: Family::default(),
            consumer_ack_pending: Family::default(),
            consumer_redelivered: Family::default(),
            consumer_waiting: Family::default(),
            dead_letters: Family::default(),
            db_connections: Family::default(),
            reconciler_actions: Family::default(),
            audit_write_errors: Counter::default(),
            audit_spooled: Gauge::default(),
            audit_unsealed: Gauge::default(),
            audit_chain_rewritten: Counter::default(),
            audit_anchor_errors: Counter::default(),
            cache_requests: Family::default(),
            quota_rejections: Family::default(),
            quota_usage: Family::new_with_constructor(fill_ratio),
            replication_lag: Family::default(),
            replication_changes: Family::default(),
            replication_pending: Gauge::default(),
            replication_parked: Gauge::default(),
            replication_tombstones: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("gateway");
        inner.register_requests(r);
        inner.register_delivery(r);
        inner.register_writes(r);
        inner.register_quotas(r);
        inner.register_replication(r);
        Metrics(Arc::new(inner))
    }

    /// Creates, at zero, the series whose label values are known up front, so that
    /// `increase()` and alerts see them from the first scrape.
    pub fn init_series(&self, zones: &[String], types: &crate::registry::Snapshot) {
        let services = types.services();
        for zone in zones {
            for service in &services {
                let labels = PoolLabels {
                    service: service.to_string(),
                    zone: zone.clone(),
                };
                let _ = self.dead_letters.get_or_create(&labels);
            }
        }
        for cache in [
            "catalog",
            "zones",
            "tenants",
            "keys",
            "operations",
            "resources",
        ] {
            for result in ["hit", "miss"] {
                let _ = self.cache_requests.get_or_create(&CacheLabels {
                    cache: cache.into(),
                    result: result.into(),
                });
            }
        }
        for bucket in ["write", "read", "poll", "anonymous"] {
            let _ = self.rate_limited.get_or_create(&BucketLabels {
                bucket: bucket.into(),
            });
        }
        for class in ["write", "read", "poll", "report", "connection"] {
            let _ = self.overloaded.get_or_create(&ClassLabels {
                class: class.into(),
            });
        }
        for outcome in ["delivered", "retrying", "failed"] {
            let _ = self.webhook_attempts.get_or_create(&OutcomeOnly {
                outcome: outcome.into(),
            });
        }
        let _ = self.watch_refused.get_or_create(&ReasonLabels {
            reason: "too_many_streams".into(),
        });
        for action in REPAIRS {
            let _ = self.reconciler_actions.get_or_create(&RepairLabels {
                action: (*action).into(),
            });
        }
        for dimension in Dimension::ALL {
            let _ = self.quota_usage.get_or_create(&DimensionLabels {
                dimension: dimension.as_str().into(),
            });
            for t in types
                .types()
                .iter()
                .filter(|t| t.dimensions().contains(&dimension))
            {
                let _ = self
                    .quota_rejections
                    .get_or_create(&quota_labels(t.service(), dimension));
            }
        }
    }

    /// A write on a resource of `kind` was refused by a limit in `dimension`.
    pub fn quota_rejected(&self, service: &Service, dimension: Dimension) {
        self.quota_rejections
            .get_or_create(&quota_labels(service, dimension))
            .inc();
    }

    /// A group commit took `n` creates.
    pub fn write_batch(&self, n: usize) {
        self.write_batch_size.observe(n as f64);
    }

    /// A group commit's transaction failed; its creates are recorded one by one.
    pub fn write_batch_failed(&self) {
        self.write_batch_failures.inc();
    }

    /// A webhook delivery attempt ended with `outcome`.
    pub fn webhook_attempt(&self, outcome: &str, took: Duration) {
        self.webhook_attempts
            .get_or_create(&OutcomeOnly {
                outcome: outcome.into(),
            })
            .inc();
        self.webhook_latency.observe(took.as_secs_f64());
    }

    /// A request (or connection) of `class` was refused with `503 overloaded`.
    pub fn overloaded(&self, class: &str) {
        self.overloaded
            .get_or_create(&ClassLabels {
                class: class.into(),
            })
            .inc();
    }

    /// A watch stream was refused for `reason`.
    pub fn watch_refused(&self, reason: &str) {
        self.watch_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one lookup of in-memory cache `cache`: answered from memory (`hit`) or
    /// not.
    pub fn cache_lookup(&self, cache: &str, hit: bool) {
        self.cache_requests
            .get_or_create(&CacheLabels {
                cache: cache.to_owned(),
                result: if hit { "hit" } else { "miss" }.to_owned(),
            })
            .inc();
    }

    /// An accepted write left a quota limit in `dimension` `ratio` full.
    pub fn quota_filled(&self, dimension: Dimension, ratio: f64) {
        self.quota_usage
            .get_or_create(&DimensionLabels {
                dimension: dimension.as_str().into(),
            })
            .observe(ratio);
    }

    /// An operation was accepted.
    pub fn operation_created(&self, action: &Action, service: &Service, zone: &str) {
        self.operations_created
            .get_or_create(&OperationLabels {
                action: action.to_string(),
                service: service.to_string(),
                zone: zone.to_owned(),
            })
            .inc();
    }

    /// A worker started an operation submitted `waited` ago.
    pub fn operation_started(&self, action: &Action, service: &Service, waited: Duration) {
        self.operation_wait
            .get_or_create(&ActionLabels {
                action: action.to_string(),
                service: service.to_string(),
            })
            .observe(waited.as_secs_f64());
    }

    /// An operation submitted `took` ago ended in `state`.
    pub fn operation_finished(
        &self,
        action: &Action,
        service: &Service,
        zone: &str,
        state: OperationState,
        took: Duration,
    ) {
        self.operations_finished
            .get_or_create(&OutcomeLabels {
                action: action.to_string(),
                service: service.to_string(),
                zone: zone.to_owned(),
                outcome: state.to_string(),
            })
            .inc();
        self.operation_duration
            .get_or_create(&ActionLabels {
                action: action.to_string(),
                service: service.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The reconciler (or dead-letter handler) repaired something.
    pub fn repaired(&self, action: &str, n: usize) {
        self.reconciler_actions
            .get_or_create(&RepairLabels {
                action: action.to_owned(),
            })
            .inc_by(n as u64);
    }

    /// The outbox, events, webhook and audit-chain backlog gauges.
    async fn refresh_backlogs(&self, pool: &PgPool) {
        match store::outbox::backlog(pool).await {
            Ok((n, age)) => {
                self.outbox_pending.set(n);
                self.outbox_oldest_age.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "metrics: outbox backlog unavailable"),
        }
        match store::webhooks::backlog(pool).await {
            Ok((n, age)) => {
                self.webhook_backlog.set(n);
                self.webhook_oldest_due.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "metrics: webhook backlog unavailable"),
        }
        match store::events::backlog(pool).await {
            Ok((n, age)) => {
                self.events_pending.set(n);
                self.events_oldest_age.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "metrics: events backlog unavailable"),
        }
        match store::audit::unsealed_count(pool).await {
            Ok(n) => {
                self.audit_unsealed.set(n);
            }
            Err(e) => tracing::debug!(error = %e, "metrics: audit backlog unavailable"),
        }
        self.refresh_replication(pool).await;
        self.refresh_upkeep(pool).await;
    }

    /// The gauges of what keeps the database small: autovacuum, and the size of the
    /// queue tables. Says once in the log that autovacuum is off.
    async fn refresh_upkeep(&self, pool: &PgPool) {
        let upkeep = match store::health::upkeep(pool).await {
            Ok(upkeep) => upkeep,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: database upkeep unavailable");
                return;
            }
        };
        self.database_autovacuum.set(i64::from(upkeep.autovacuum));
        let warned = &self.autovacuum_warned;
        if !upkeep.autovacuum && !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "PostgreSQL runs with autovacuum off: the outbox tables keep every dead row \
                 and the planner's statistics go stale, so the relay and the API slow down \
                 as they grow; turn autovacuum on (README, operations guide)"
            );
        }
        for (table, bytes) in upkeep.queue_tables {
            self.queue_table_bytes
                .get_or_create(&TableLabels {
                    table: table.to_owned(),
                })
                .set(bytes);
        }
    }

    /// The replication gauges (nothing in a single-region installation).
    async fn refresh_replication(&self, pool: &PgPool) {
        let (peers, pending, parked, tombstones) = match store::replication::state(pool).await {
            Ok(state) => state,
            Err(e) => {
                tracing::debug!(error = %e, "metrics: replication state unavailable");
                return;
            }
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        for peer in peers {
            let lag = match peer.applied_hlc {
                0 => f64::INFINITY,
                hlc => (now_ms - crate::domain::region::hlc_millis(hlc)).max(0) as f64 / 1000.0,
            };
            self.replication_lag
                .get_or_create(&PeerLabels { peer: peer.region })
                .set(lag);
        }
        self.replication_pending.set(pending);
        self.replication_parked.set(parked);
        self.replication_tombstones.set(tombstones);
    }

    /// Refreshes the gauges that describe PostgreSQL and JetStream.
    pub async fn refresh(
        &self,
        pool: &PgPool,
        js: Option<(&async_nats::jetstream::Context, &str)>,
        zones: &[String],
        services: &[Service],
    ) {
        let in_use = pool.size().saturating_sub(pool.num_idle() as u32);
        self.db_connections
            .get_or_create(&StateLabels {
                state: "in_use".into(),
            })
            .set(i64::from(in_use));
        self.db_connections
            .get_or_create(&StateLabels {
                state: "idle".into(),
            })
            .set(pool.num_idle() as i64);
        self.refresh_backlogs(pool).await;
        match store::operations::count_active_by_state(pool).await {
            Ok(counts) => {
                for state in OperationState::ALL.iter().filter(|s| !s.is_terminal()) {
                    let n = counts
                        .iter()
                        .find(|(s, _)| s == state.as_str())
                        .map_or(0, |(_, n)| *n);
                    self.operations_active
                        .get_or_create(&StateLabels {
                            state: state.to_string(),
                        })
                        .set(n);
                }
            }
            Err(e) => tracing::debug!(error = %e, "metrics: operation counts unavailable"),
        }
        let Some((js, stream_name)) = js else {
            return;
        };
        // While NATS is down every request would wait out its timeout, one pool after
        // another, and hold up the next refresh of the database gauges operators need
        // most then (the outbox growing): skip JetStream until it is back.
        if js.client().connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let Ok(stream) = js.get_stream_no_info(stream_name).await else {
            return;
        };
        for zone in zones {
            for service in services {
                let name = gateway_proto::consumer_name(service, zone);
                let Ok(info) = stream.consumer_info(&name).await else {
                    continue;
                };
                let labels = PoolLabels {
                    service: service.to_string(),
                    zone: zone.clone(),
                };
                self.consumer_pending
                    .get_or_create(&labels)
                    .set(info.num_pending as i64);
                self.consumer_ack_pending
                    .get_or_create(&labels)
                    .set(info.num_ack_pending as i64);
                self.consumer_redelivered
                    .get_or_create(&labels)
                    .set(info.num_redelivered as i64);
                self.consumer_waiting
                    .get_or_create(&labels)
                    .set(info.num_waiting as i64);
            }
        }
    }
}

fn quota_labels(service: &Service, dimension: Dimension) -> QuotaLabels {
    QuotaLabels {
        service: service.to_string(),
        dimension: dimension.as_str().into(),
    }
}

/// Renders `registry` as OpenMetrics text (shared with the workers, whose families
/// an all-in-one process registers in the same registry).
pub fn render(registry: &Registry) -> String {
    workers::metrics::render(registry).expect("writing to a String cannot fail")
}

pub use workers::metrics::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_with_the_gateway_prefix() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.operation_created(&Action::create(), &Service::named("storage"), "zone-a");
        m.operation_finished(
            &Action::create(),
            &Service::named("storage"),
            "zone-a",
            OperationState::Succeeded,
            Duration::from_millis(30),
        );
        let text = render(&registry);
        assert!(text.contains("gateway_operations_created_total{action=\"create\",service=\"storage\",zone=\"zone-a\"} 1"), "{text}");
        assert!(text.contains("gateway_operation_duration_seconds_bucket{"));
        assert!(text.trim_end().ends_with("# EOF"));
        assert!(!text.contains("operation_id"), "no IDs in labels");
    }
}
