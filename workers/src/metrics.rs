//! The worker's Prometheus metrics, in one place.
//!
//! [`WorkerMetrics`] holds the metric families; [`WorkerMetrics::register`] adds them to a
//! [`Registry`] (the `worker` binary's own, served at `GET /metrics` by [`crate::http`],
//! or the gateway's in the all-in-one `up`). Several pools share one `WorkerMetrics`;
//! the `service` and `zone` labels tell them apart. Each pool creates all its series when
//! it starts, so they read `0` rather than being absent until something happens.
//!
//! Labels are of bounded cardinality only: `service` (`vm`, `bm`, `k8s`, `storage`),
//! `zone`, and a fixed set of `outcome`s — never an operation, resource or tenant ID.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `worker_messages_total` | counter | service, zone, outcome | deliveries handled, by what became of them (below) |
//! | `worker_driver_attempts_total` | counter | service, zone | calls of the driver, retries included |
//! | `worker_driver_retries_total` | counter | service, zone | in-process retries of the driver after a transient error |
//! | `worker_driver_duration_seconds` | histogram | service, zone, outcome | time of one driver call, by `ok`, `transient` or `permanent` (a call cut short by the operation's deadline counts as `permanent`) |
//! | `worker_report_retries_total` | counter | service, zone | report POSTs sent again because the gateway was unreachable, overloaded or failing |
//! | `worker_peer_lookups_total` | counter | service, zone, outcome | reads of another resource an operation needs (the VM a volume attaches to), by `found`, `not_found`, `transient` (gateway unavailable; read again) or `permanent` (read refused) |
//! | `worker_in_flight` | gauge | service, zone | messages being worked on in this process |
//!
//! The `outcome` of `worker_messages_total`; exactly one per delivery:
//!
//! | outcome | the message is | when |
//! |---|---|---|
//! | `succeeded` | acked | the driver succeeded and the gateway accepted the report |
//! | `failed` | terminated | the operation failed (driver error, deadline, retries exhausted, attach target missing) and the gateway accepted the report |
//! | `cancelled` | acked | cancellation was requested before the driver ran; the gateway accepted the report |
//! | `finished_elsewhere` | acked | the gateway answered `409`: the operation already ended, or this delivery's attempt is stale or too early |
//! | `retried` | nakked with a delay | the driver failed transiently (after its in-process retries) before the last delivery |
//! | `poison` | terminated | no report was accepted: the payload is not an operation, the message belongs to another pool or has no JetStream metadata, or the gateway will never accept the report (`401`, `403`, `422`, …) |
//! | `forged` | terminated | the message is not signed by a trusted dispatch key (unsigned, unknown key, or a signature that does not match: forged or altered); nothing in it was read or reported, the driver did not run (logged at `warn`) |
//! | `handed_back` | nakked at once | shutdown came before the operation finished, or the server sent more messages than were asked for |

use gateway_proto::Service;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

/// The `Content-Type` of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the driver duration buckets, in seconds: from the simulator's
/// sub-second answers to an hour of bare-metal provisioning.
const DRIVER_BUCKETS: [f64; 15] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The labels of a per-pool metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    service: String,
    zone: String,
}

/// The labels of a per-pool metric split by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    zone: String,
    outcome: &'static str,
}

/// The metric families of the workers, cheap to clone (each family is shared).
///
/// [`WorkerMetrics::default`] is registered nowhere: the numbers are kept but nobody
/// reads them, for callers that do not care.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    messages: Family<OutcomeLabels, Counter>,
    driver_attempts: Family<PoolLabels, Counter>,
    driver_retries: Family<PoolLabels, Counter>,
    driver_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    report_retries: Family<PoolLabels, Counter>,
    peer_lookups: Family<OutcomeLabels, Counter>,
    in_flight: Family<PoolLabels, Gauge>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            messages: Family::default(),
            driver_attempts: Family::default(),
            driver_retries: Family::default(),
            driver_duration: Family::new_with_constructor(|| Histogram::new(DRIVER_BUCKETS)),
            report_retries: Family::default(),
            peer_lookups: Family::default(),
            in_flight: Family::default(),
        }
    }
}

impl WorkerMetrics {
    /// Creates the families and registers them in `registry` (names as in the
    /// [module documentation](self)).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // The registry appends `_total` to counters and the unit to the name, and ends
        // each help text with a full stop.
        registry.register(
            "worker_messages",
            "Deliveries handled by the worker, by outcome: succeeded, failed, cancelled, \
             finished_elsewhere (409 from the gateway), retried (nak for redelivery), \
             poison (terminated without a report), forged (no valid dispatch signature; \
             terminated unread), handed_back (shutdown)",
            metrics.messages.clone(),
        );
        registry.register(
            "worker_driver_attempts",
            "Calls of the driver, in-process retries included",
            metrics.driver_attempts.clone(),
        );
        registry.register(
            "worker_driver_retries",
            "In-process retries of the driver after a transient error",
            metrics.driver_retries.clone(),
        );
        registry.register_with_unit(
            "worker_driver_duration",
            "Time of one driver call, by outcome: ok, transient or permanent",
            Unit::Seconds,
            metrics.driver_duration.clone(),
        );
        registry.register(
            "worker_report_retries",
            "Report POSTs sent again because the gateway was unreachable, overloaded or failing",
            metrics.report_retries.clone(),
        );
        registry.register(
            "worker_peer_lookups",
            "Reads through the gateway of another resource an operation needs (the VM a \
             volume attaches to), by outcome: found, not_found, transient, permanent",
            metrics.peer_lookups.clone(),
        );
        registry.register(
            "worker_in_flight",
            "Messages being worked on in this process",
            metrics.in_flight.clone(),
        );
        metrics
    }

    /// The series of the pool of `service` in `zone`, all created now (at zero).
    pub(crate) fn pool(&self, service: &Service, zone: &str) -> PoolMetrics {
        let pool = PoolLabels {
            service: service.to_string(),
            zone: zone.to_owned(),
        };
        let outcome = |outcome: &'static str| OutcomeLabels {
            service: pool.service.clone(),
            zone: pool.zone.clone(),
            outcome,
        };
        PoolMetrics {
            messages: MessageOutcome::ALL
                .map(|o| self.messages.get_or_create_owned(&outcome(o.as_str()))),
            driver_attempts: self.driver_attempts.get_or_create_owned(&pool),
            driver_retries: self.driver_retries.get_or_create_owned(&pool),
            driver_duration: DriverOutcome::ALL.map(|o| {
                self.driver_duration
                    .get_or_create_owned(&outcome(o.as_str()))
            }),
            report_retries: self.report_retries.get_or_create_owned(&pool),
            peer_lookups: LookupOutcome::ALL
                .map(|o| self.peer_lookups.get_or_create_owned(&outcome(o.as_str()))),
            in_flight: self.in_flight.get_or_create_owned(&pool),
        }
    }
}

/// The series of one pool, resolved once so that counting takes no lock.
#[derive(Clone, Debug)]
pub(crate) struct PoolMetrics {
    messages: [Counter; MessageOutcome::ALL.len()],
    driver_attempts: Counter,
    driver_retries: Counter,
    driver_duration: [Histogram; DriverOutcome::ALL.len()],
    report_retries: Counter,
    peer_lookups: [Counter; LookupOutcome::ALL.len()],
    in_flight: Gauge,
}

impl PoolMetrics {
    /// Counts a delivery handled.
    pub(crate) fn message(&self, outcome: MessageOutcome) {
        self.messages[outcome as usize].inc();
    }

    /// Counts a call of the driver.
    pub(crate) fn driver_attempt(&self) {
        self.driver_attempts.inc();
    }

    /// Counts an in-process retry of the driver.
    pub(crate) fn driver_retry(&self) {
        self.driver_retries.inc();
    }

    /// Records how long a driver call took and how it ended.
    pub(crate) fn driver_finished(&self, outcome: DriverOutcome, took: Duration) {
        self.driver_duration[outcome as usize].observe(took.as_secs_f64());
    }

    /// Counts a report sent again.
    pub(crate) fn report_retry(&self) {
        self.report_retries.inc();
    }

    /// Counts a read of another resource.
    pub(crate) fn peer_lookup(&self, outcome: LookupOutcome) {
        self.peer_lookups[outcome as usize].inc();
    }

    /// Counts a message in flight until the returned guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

/// One message in flight; dropping it (however the task ends) counts it out.
#[derive(Debug)]
pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Declares a label enum: variants in index order, each with its label value.
macro_rules! outcomes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in index order.
            pub(crate) const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The label value.
            pub(crate) fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
    };
}

outcomes! {
    /// What became of a delivery: the `outcome` of `worker_messages_total`.
    MessageOutcome {
        /// Reported `succeeded`, acked.
        Succeeded => "succeeded",
        /// Reported `failed`, terminated.
        Failed => "failed",
        /// Reported `cancelled`, acked.
        Cancelled => "cancelled",
        /// The gateway answered `409`; acked.
        FinishedElsewhere => "finished_elsewhere",
        /// Handed back for redelivery after transient failures.
        Retried => "retried",
        /// Terminated without an accepted report.
        Poison => "poison",
        /// Not signed by a trusted dispatch key: terminated before anything else.
        Forged => "forged",
        /// Handed back unfinished (shutdown) or unprocessed.
        HandedBack => "handed_back",
    }
}

outcomes! {
    /// How a driver call ended: the `outcome` of `worker_driver_duration_seconds`.
    DriverOutcome {
        /// It returned a status.
        Ok => "ok",
        /// A transient error.
        Transient => "transient",
        /// A permanent error, or the operation's deadline cut it short.
        Permanent => "permanent",
    }
}

outcomes! {
    /// How a read of another resource ended: the `outcome` of `worker_peer_lookups_total`.
    LookupOutcome {
        /// `200`.
        Found => "found",
        /// `404`.
        NotFound => "not_found",
        /// The gateway is unavailable; read again.
        Transient => "transient",
        /// The read was refused, or the answer is not a resource.
        Permanent => "permanent",
    }
}

/// The registry as OpenMetrics text, ending with `# EOF`.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Reading metrics back in tests.
#[cfg(test)]
pub(crate) mod testing {
    /// The value of the sample whose name and labels are exactly `series` (e.g.
    /// `worker_in_flight{service="vm",zone="zone-a"}`) in OpenMetrics `text`.
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a sample value is a number"))
        })
    }

    /// The non-zero `worker_messages_total` samples in `text` (of every pool), as
    /// (outcome, value) sorted by outcome.
    pub(crate) fn message_outcomes(text: &str) -> Vec<(String, f64)> {
        let mut outcomes: Vec<(String, f64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("worker_messages_total{")?;
                let outcome = rest.split("outcome=\"").nth(1)?.split('"').next()?;
                let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
                (value != 0.0).then(|| (outcome.to_owned(), value))
            })
            .collect();
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{message_outcomes, sample};
    use super::*;

    #[test]
    fn every_series_of_a_pool_exists_from_the_start_with_its_labels() {
        let mut registry = Registry::default();
        let metrics = WorkerMetrics::register(&mut registry);
        metrics.pool(&Service::named("storage"), "zone-b");
        let text = render(&registry).unwrap();
        for outcome in MessageOutcome::ALL {
            let series = format!(
                "worker_messages_total{{service=\"storage\",zone=\"zone-b\",outcome=\"{}\"}}",
                outcome.as_str()
            );
            assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
        }
        for name in [
            "worker_driver_attempts_total",
            "worker_driver_retries_total",
            "worker_report_retries_total",
            "worker_in_flight",
        ] {
            let series = format!("{name}{{service=\"storage\",zone=\"zone-b\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
        }
        for outcome in ["found", "not_found", "transient", "permanent"] {
            let series = format!("worker_peer_lookups_total{{service=\"storage\",zone=\"zone-b\",outcome=\"{outcome}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        for outcome in ["ok", "transient", "permanent"] {
            let series = format!("worker_driver_duration_seconds_count{{service=\"storage\",zone=\"zone-b\",outcome=\"{outcome}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        assert!(text.contains("# TYPE worker_driver_duration_seconds histogram"));
        assert!(text.contains("# UNIT worker_driver_duration_seconds seconds"));
        assert!(text.contains("# HELP worker_messages Deliveries handled by the worker"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn pools_sharing_the_metrics_count_apart_and_in_flight_falls_when_work_ends() {
        let mut registry = Registry::default();
        let metrics = WorkerMetrics::register(&mut registry);
        let vm_a = metrics.pool(&Service::named("vm"), "zone-a");
        let vm_b = metrics.clone().pool(&Service::named("vm"), "zone-b");
        vm_a.message(MessageOutcome::Succeeded);
        vm_a.message(MessageOutcome::Succeeded);
        vm_b.message(MessageOutcome::Poison);
        vm_a.driver_finished(DriverOutcome::Ok, Duration::from_millis(300));
        let held = vm_b.in_flight();
        let text = render(&registry).unwrap();
        assert_eq!(
            message_outcomes(&text),
            [("poison".to_owned(), 1.0), ("succeeded".to_owned(), 2.0)]
        );
        let series = |zone: &str, outcome: &str| {
            format!("worker_messages_total{{service=\"vm\",zone=\"{zone}\",outcome=\"{outcome}\"}}")
        };
        assert_eq!(sample(&text, &series("zone-a", "succeeded")), Some(2.0));
        assert_eq!(sample(&text, &series("zone-b", "succeeded")), Some(0.0));
        assert_eq!(sample(&text, &series("zone-b", "poison")), Some(1.0));
        let in_flight_b = r#"worker_in_flight{service="vm",zone="zone-b"}"#;
        assert_eq!(sample(&text, in_flight_b), Some(1.0));
        let le_half = r#"worker_driver_duration_seconds_bucket{le="0.5",service="vm",zone="zone-a",outcome="ok"}"#;
        let le_quarter = r#"worker_driver_duration_seconds_bucket{le="0.25",service="vm",zone="zone-a",outcome="ok"}"#;
        assert_eq!(sample(&text, le_half), Some(1.0), "{text}");
        assert_eq!(sample(&text, le_quarter), Some(0.0));

        drop(held);
        let text = render(&registry).unwrap();
        assert_eq!(sample(&text, in_flight_b), Some(0.0));
    }

    #[test]
    fn default_metrics_count_without_a_registry() {
        let pool = WorkerMetrics::default().pool(&Service::named("bm"), "zone-a");
        pool.message(MessageOutcome::Failed);
        pool.report_retry();
        assert_eq!(pool.messages[MessageOutcome::Failed as usize].get(), 1);
        assert_eq!(pool.report_retries.get(), 1);
    }
}
