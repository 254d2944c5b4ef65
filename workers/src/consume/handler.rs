//! The decisions of the consume loop, for one delivery: [`Handler::handle`] reports
//! `running`, looks up peers, runs the driver with retries and deadline, reports the
//! outcome, and says how the message is to be settled ([`Disposition`]). It talks to
//! the gateway through a [`Reporter`] and [`Peers`], never to NATS, so it is tested here
//! with a fake gateway.

use super::{seeded, Disposition, PROGRESS_INTERVAL};
use crate::drivers::{time_left, Driver, DriverError};
use crate::metrics::{DriverOutcome, LookupOutcome, MessageOutcome, PoolMetrics};
use crate::peers::{LookupError, Peer, PeerAnswer, Peers};
use crate::report::{ReportError, ReportOutcome, Reporter, TraceHeaders};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use gateway_proto::signing::{Signed, TrustedKeys};
use gateway_proto::{Dispatch, OperationError, Report, ReportAck, ReportState, Service};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tracing::{field, info_span, Span};

/// Longest delay asked for when handing a message back after transient failures.
const MAX_NAK_DELAY: Duration = Duration::from_secs(30);

/// How long JetStream should wait before delivering a message again after attempt
/// `attempt` failed transiently: 1 s per attempt, at most 30 s.
pub fn nak_delay(attempt: i32) -> Duration {
    let secs = u64::try_from(attempt).unwrap_or(0).max(1);
    Duration::from_secs(secs).min(MAX_NAK_DELAY)
}

/// One delivery, as far as the handler cares.
pub(crate) struct Delivery {
    /// The subject it was published on: signed, and named in logs about messages that
    /// are not operations.
    pub(crate) subject: String,
    /// Its `Nats-Msg-Id`, [`gateway_proto::signing::KEY_HEADER`] and
    /// [`gateway_proto::signing::SIGNATURE_HEADER`].
    pub(crate) signature: SignatureHeaders,
    /// The message's body: a JSON [`Dispatch`], unless the message is poison.
    pub(crate) payload: Bytes,
    /// JetStream's delivery count; `None` if the message has no JetStream metadata.
    pub(crate) delivered: Option<i64>,
    /// The client's `X-Request-Id` and `traceparent`, from the message's headers.
    pub(crate) trace: TraceHeaders,
}

/// The headers a dispatch's signature check reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct SignatureHeaders {
    pub(crate) msg_id: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) signature: Option<String>,
}

/// Retry and heartbeat timings; tests shrink them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Between report attempts while the gateway is unavailable; without end.
    pub(crate) report_retry: ExponentialBuilder,
    /// Between in-process driver attempts after transient errors.
    pub(crate) driver_retry: ExponentialBuilder,
    /// Between `Progress` acks.
    pub(crate) progress_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            // 100 ms doubling to 2.5 s, jitter up to +100 %: at most 5 s between tries.
            report_retry: ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_millis(2500))
                .with_jitter()
                .without_max_times(),
            // 3 retries: 100 ms, 200 ms, 400 ms, each with jitter up to +100 %.
            driver_retry: ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_jitter()
                .with_max_times(3),
            progress_interval: PROGRESS_INTERVAL,
        }
    }
}

/// Decides, for one delivery, what to report and how to settle it.
pub(crate) struct Handler<D, R> {
    /// What carries the operations out.
    pub(crate) driver: D,
    /// The gateway: reports, and reads of peers.
    pub(crate) reporter: R,
    /// The pool's service; operations of another are poison.
    pub(crate) service: Service,
    /// The pool's zone; operations for another are poison.
    pub(crate) zone: String,
    /// The consumer's `max_deliver`, read from the consumer when the pool binds (until
    /// then [`crate::PoolConfig::max_deliver`]).
    pub(crate) max_deliver: AtomicI64,
    /// Whose signatures make a message a dispatch of the gateway.
    pub(crate) trust: TrustedKeys,
    /// Retry and heartbeat timings.
    pub(crate) timing: Timing,
    /// This pool's series of the worker metrics.
    pub(crate) metrics: PoolMetrics,
}

/// What became of a delivery: the outcome counted, and how the message is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handled {
    outcome: MessageOutcome,
    disposition: Disposition,
}

impl Handled {
    /// Terminated without an accepted report.
    const POISON: Handled = Handled {
        outcome: MessageOutcome::Poison,
        disposition: Disposition::Term,
    };
    /// Not signed by a trusted key: terminated unread, never retried.
    const FORGED: Handled = Handled {
        outcome: MessageOutcome::Forged,
        disposition: Disposition::Term,
    };
    /// The gateway answered `409`: not this delivery's to finish.
    const FINISHED_ELSEWHERE: Handled = Handled {
        outcome: MessageOutcome::FinishedElsewhere,
        disposition: Disposition::Ack,
    };
    /// Reported `succeeded`: acked.
    const SUCCEEDED: Handled = Handled {
        outcome: MessageOutcome::Succeeded,
        disposition: Disposition::Ack,
    };
    /// Reported `failed`: terminated.
    const FAILED: Handled = Handled {
        outcome: MessageOutcome::Failed,
        disposition: Disposition::Term,
    };
    /// Reported `cancelled`: acked.
    const CANCELLED: Handled = Handled {
        outcome: MessageOutcome::Cancelled,
        disposition: Disposition::Ack,
    };

    /// Handed back, to be delivered again after `delay`.
    fn retried(delay: Duration) -> Handled {
        Handled {
            outcome: MessageOutcome::Retried,
            disposition: Disposition::Nak(Some(delay)),
        }
    }
}

impl<D: Driver, R: Reporter + Peers> Handler<D, R> {
    /// The span of one delivery: the pool, and the `X-Request-Id` and `traceparent` the
    /// message carries from the client's request, so every log line about the message
    /// can be followed back to it. [`Handler::handle`] adds the operation and attempt.
    pub(crate) fn span(&self, delivery: &Delivery) -> Span {
        info_span!(
            "message",
            operation.id = field::Empty,
            service = %self.service,
            zone = %self.zone,
            attempt = field::Empty,
            request_id = delivery.trace.request_id.as_deref(),
            traceparent = delivery.trace.traceparent.as_deref(),
        )
    }

    /// Handles one delivery and counts its outcome. Records the operation's fields on
    /// the current span (see [`Handler::span`]).
    pub(crate) async fn handle(&self, delivery: &Delivery) -> Disposition {
        let handled = self.decide(delivery).await;
        self.metrics.message(handled.outcome);
        handled.disposition
    }

    /// Terminates what the gateway did not sign or is not an operation of this pool,
    /// and processes the rest.
    async fn decide(&self, delivery: &Delivery) -> Handled {
        let signed = Signed {
            subject: &delivery.subject,
            msg_id: delivery.signature.msg_id.as_deref(),
            key: delivery.signature.key.as_deref(),
            signature: delivery.signature.signature.as_deref(),
            body: &delivery.payload,
        };
        if let Err(why) = self.trust.verify(&signed) {
            tracing::warn!(
                subject = %delivery.subject,
                msg_id = delivery.signature.msg_id.as_deref(),
                reason = %why,
                "refused a message the gateway did not sign: terminating it without reading it"
            );
            return Handled::FORGED;
        }
        let op: Dispatch = match serde_json::from_slice(&delivery.payload) {
            Ok(op) => op,
            Err(e) => {
                tracing::error!(
                    subject = %delivery.subject,
                    error = %e,
                    "poison message: the payload is not an operation; terminating it"
                );
                return Handled::POISON;
            }
        };
        let span = Span::current();
        span.record("operation.id", field::display(op.operation_id));
        let Some(delivered) = delivery.delivered else {
            tracing::error!(subject = %delivery.subject, "message without JetStream metadata; terminating it");
            return Handled::POISON;
        };
        let attempt = i32::try_from(delivered).unwrap_or(i32::MAX);
        span.record("attempt", attempt);
        // The relay publishes on `{prefix}.{service}.{zone}`: this pool's consumer
        // filters on that subject, and a message for another pool is poison.
        let ours = format!(".{}.{}", self.service, self.zone);
        if !delivery.subject.ends_with(&ours) || op.zone != self.zone {
            tracing::error!(
                kind = %op.kind,
                op_zone = %op.zone,
                "an operation for another pool reached this consumer; terminating it"
            );
            return Handled::POISON;
        }
        self.process(&op, attempt, &delivery.trace).await
    }

    /// Reports `running`, then runs the driver unless cancellation was requested, and
    /// reports the outcome.
    async fn process(&self, op: &Dispatch, attempt: i32, trace: &TraceHeaders) -> Handled {
        let ack = match self.start(op, attempt, trace).await {
            Ok(ack) => ack,
            Err(handled) => return handled,
        };
        if ack.cancel_requested {
            tracing::info!("cancellation requested: not running the driver");
            let cancelled = Report {
                attempt,
                state: ReportState::Cancelled,
                status: None,
                error: None,
            };
            return self.finish(op, cancelled, trace, Handled::CANCELLED).await;
        }

        tracing::info!(action = %op.action, kind = %op.kind, "operation started");
        let result = self.run_driver(op, trace).await;
        self.conclude(op, attempt, trace, result).await
    }

    /// Reports `running`; the gateway's acknowledgement, or how the delivery ends when
    /// the gateway will not let it start.
    async fn start(
        &self,
        op: &Dispatch,
        attempt: i32,
        trace: &TraceHeaders,
    ) -> Result<ReportAck, Handled> {
        let running = Report {
            attempt,
            state: ReportState::Running,
            status: None,
            error: None,
        };
        match self.report(op, running, trace).await {
            Ok(ReportOutcome::Accepted(ack)) => Ok(ack),
            Ok(ReportOutcome::Refused { code, message }) => {
                tracing::info!(
                    code = %code,
                    message = %message,
                    "the gateway refused the start (operation finished, or not this delivery's); acknowledging"
                );
                Err(Handled::FINISHED_ELSEWHERE)
            }
            Err(e) => {
                tracing::error!(error = %e, "the gateway rejected the start report; terminating the message");
                Err(Handled::POISON)
            }
        }
    }

    /// Reports what the driver's `result` means for the operation, or hands the message
    /// back after a transient failure that is not on the last delivery.
    async fn conclude(
        &self,
        op: &Dispatch,
        attempt: i32,
        trace: &TraceHeaders,
        result: Result<serde_json::Value, DriverError>,
    ) -> Handled {
        match result {
            Ok(status) => {
                let succeeded = Report {
                    attempt,
                    state: ReportState::Succeeded,
                    status: Some(status),
                    error: None,
                };
                self.finish(op, succeeded, trace, Handled::SUCCEEDED).await
            }
            Err(DriverError::Permanent { code, message }) => {
                tracing::warn!(code = %code, message = %message, "the driver failed");
                let retryable = retryable(&code);
                self.finish(
                    op,
                    failed(attempt, code, message, retryable),
                    trace,
                    Handled::FAILED,
                )
                .await
            }
            Err(DriverError::Transient(message)) if self.is_last(attempt) => {
                tracing::warn!(error = %message, "the driver failed transiently on the last delivery");
                let report = failed(attempt, "retries_exhausted".into(), message, true);
                self.finish(op, report, trace, Handled::FAILED).await
            }
            Err(DriverError::Transient(message)) => {
                let delay = nak_delay(attempt);
                tracing::warn!(
                    error = %message,
                    retry_in = ?delay,
                    "the driver failed transiently; handing the message back"
                );
                Handled::retried(delay)
            }
        }
    }

    /// Within the deadline: reads what the operation needs about other resources
    /// ([`Handler::look_up`]), then runs the driver, retrying transient errors in process.
    async fn run_driver(
        &self,
        op: &Dispatch,
        trace: &TraceHeaders,
    ) -> Result<serde_json::Value, DriverError> {
        let remaining = time_left(op)?;
        let deadline = tokio::time::Instant::now() + remaining;
        let run = async {
            let enriched = self.look_up(op, trace).await?;
            let op = enriched.as_ref().unwrap_or(op);
            (|| self.attempt(op, deadline))
                .retry(seeded(self.timing.driver_retry))
                .when(DriverError::is_transient)
                .notify(|e, delay| {
                    self.metrics.driver_retry();
                    tracing::info!(error = %e, retry_in = ?delay, "the driver failed transiently; retrying");
                })
                .await
        };
        tokio::time::timeout_at(deadline, run)
            .await
            .unwrap_or_else(|_| Err(DriverError::deadline_exceeded(op)))
    }

    /// One call of the driver, cut short at `deadline`; counted and timed.
    async fn attempt(
        &self,
        op: &Dispatch,
        deadline: tokio::time::Instant,
    ) -> Result<serde_json::Value, DriverError> {
        self.metrics.driver_attempt();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout_at(deadline, self.driver.execute(op))
            .await
            .unwrap_or_else(|_| Err(DriverError::deadline_exceeded(op)));
        let outcome = match &result {
            Ok(_) => DriverOutcome::Ok,
            Err(DriverError::Transient(_)) => DriverOutcome::Transient,
            Err(DriverError::Permanent { .. }) => DriverOutcome::Permanent,
        };
        self.metrics.driver_finished(outcome, started.elapsed());
        result
    }

    /// If `op` depends on another resource ([`Peer::of`]), reads it through the gateway
    /// and returns the copy of `op` the driver gets, its `input` enriched with what it
    /// needs; `None` when nothing is needed.
    ///
    /// Transient failures (unreachable gateway, `5xx`, `429`) are retried like reports,
    /// without end: the caller bounds this by the deadline, and on shutdown the message
    /// is handed back. A peer that is gone, or a read the gateway will never answer, is a
    /// permanent error.
    async fn look_up(
        &self,
        op: &Dispatch,
        trace: &TraceHeaders,
    ) -> Result<Option<Dispatch>, DriverError> {
        let Some(peer) = Peer::of(&self.service, op) else {
            return Ok(None);
        };
        let read = || async {
            let answer = self.reporter.read(&op.tenant, peer, trace).await;
            self.metrics.peer_lookup(match &answer {
                Ok(PeerAnswer::Found(_)) => LookupOutcome::Found,
                Ok(PeerAnswer::NotFound { .. }) => LookupOutcome::NotFound,
                Err(LookupError::Transient(_)) => LookupOutcome::Transient,
                Err(LookupError::Permanent(_)) => LookupOutcome::Permanent,
            });
            answer
        };
        let answer = read
            .retry(seeded(self.timing.report_retry))
            .when(LookupError::is_transient)
            .notify(|e, delay| {
                tracing::warn!(peer = ?peer, error = %e, retry_in = ?delay, "cannot read a resource the operation needs; retrying");
            })
            .await
            .map_err(|e| peer.lookup_failed(&e))?;
        let value = peer.resolve(op, answer)?;
        tracing::debug!(peer = ?peer, %value, "read a resource the operation needs");
        Ok(Some(crate::peers::with_input(op, peer.input_key(), value)))
    }

    /// Reports a terminal state; on acceptance the delivery ends as `on_accepted`.
    async fn finish(
        &self,
        op: &Dispatch,
        report: Report,
        trace: &TraceHeaders,
        on_accepted: Handled,
    ) -> Handled {
        let state = report.state;
        match self.report(op, report, trace).await {
            Ok(ReportOutcome::Accepted(_)) => {
                tracing::info!(state = ?state, "operation finished");
                on_accepted
            }
            Ok(ReportOutcome::Refused { code, message }) => {
                tracing::info!(
                    code = %code,
                    message = %message,
                    "the gateway refused the outcome (operation already ended or moved on); acknowledging"
                );
                Handled::FINISHED_ELSEWHERE
            }
            Err(e) => {
                tracing::error!(error = %e, "the gateway rejected the outcome; terminating the message");
                Handled::POISON
            }
        }
    }

    /// Sends a report until the gateway gives a verdict; `Err` when it never will.
    async fn report(
        &self,
        op: &Dispatch,
        report: Report,
        trace: &TraceHeaders,
    ) -> Result<ReportOutcome, ReportError> {
        let state = report.state;
        (|| self.reporter.report(op.operation_id, &report, trace))
            .retry(seeded(self.timing.report_retry))
            .when(ReportError::is_transient)
            .notify(|e, delay| {
                self.metrics.report_retry();
                tracing::warn!(report = ?state, error = %e, retry_in = ?delay, "report not delivered; retrying");
            })
            .await
    }

    /// Whether this delivery is the consumer's last.
    fn is_last(&self, attempt: i32) -> bool {
        let max = self.max_deliver.load(Ordering::Relaxed);
        max > 0 && i64::from(attempt) >= max
    }
}

/// A `failed` report with the error `code`.
fn failed(attempt: i32, code: String, message: String, retryable: bool) -> Report {
    Report {
        attempt,
        state: ReportState::Failed,
        status: None,
        error: Some(OperationError {
            code,
            message,
            retryable,
        }),
    }
}

/// Whether submitting the same request again may succeed after a driver's permanent
/// error with `code`: only if time or capacity was what ran out.
fn retryable(code: &str) -> bool {
    matches!(code, "deadline_exceeded" | "capacity_exhausted")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sim::tests::{dispatch, instant, vm};
    use crate::drivers::{SimConfig, SimDriver};
    use crate::metrics::render;
    use crate::metrics::testing::{message_outcomes, sample};
    use crate::metrics::WorkerMetrics;
    use chrono::Utc;
    use gateway_proto::signing;
    use gateway_proto::{Action, Kind, OperationState, ReportAck};
    use prometheus_client::registry::Registry;
    use serde_json::json;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use tracing::Instrument;
    use uuid::Uuid;

    /// A gateway that answers reports from a script (then accepts everything), reads
    /// from another script (then answers `404`, or stays down with `peer_outage`), and
    /// records what it was sent.
    #[derive(Default)]
    struct FakeGateway {
        script: Mutex<VecDeque<Result<ReportOutcome, ReportError>>>,
        seen: Mutex<Vec<(Uuid, Report, TraceHeaders)>>,
        cancel_requested: bool,
        peer_script: Mutex<VecDeque<Result<PeerAnswer, LookupError>>>,
        peer_outage: bool,
        reads: Mutex<Vec<(String, Peer, TraceHeaders)>>,
    }

    impl Peers for FakeGateway {
        fn read(
            &self,
            tenant: &str,
            peer: Peer,
            trace: &TraceHeaders,
        ) -> impl Future<Output = Result<PeerAnswer, LookupError>> + Send {
            self.reads
                .lock()
                .unwrap()
                .push((tenant.to_owned(), peer, trace.clone()));
            let scripted = self.peer_script.lock().unwrap().pop_front();
            let answer = scripted.unwrap_or_else(|| {
                if self.peer_outage {
                    Err(LookupError::Transient("connection refused".into()))
                } else {
                    Ok(PeerAnswer::NotFound {
                        code: "not_found".into(),
                        message: "resource not found".into(),
                    })
                }
            });
            std::future::ready(answer)
        }
    }

    impl Reporter for FakeGateway {
        fn report(
            &self,
            operation: Uuid,
            report: &Report,
            trace: &TraceHeaders,
        ) -> impl Future<Output = Result<ReportOutcome, ReportError>> + Send {
            self.seen
                .lock()
                .unwrap()
                .push((operation, report.clone(), trace.clone()));
            let answer =
                self.script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Ok(ReportOutcome::Accepted(ReportAck {
                        operation_id: operation,
                        state: OperationState::Running,
                        attempt: report.attempt,
                        cancel_requested: self.cancel_requested,
                    })));
            std::future::ready(answer)
        }
    }

    /// A handler whose metrics are registered in a registry of its own.
    struct Tested {
        handler: Handler<SimDriver, FakeGateway>,
        registry: Registry,
    }

    impl std::ops::Deref for Tested {
        type Target = Handler<SimDriver, FakeGateway>;

        fn deref(&self) -> &Self::Target {
            &self.handler
        }
    }

    impl Tested {
        /// The `worker_messages_total` outcomes counted so far (non-zero ones).
        fn outcomes(&self) -> Vec<(String, f64)> {
            message_outcomes(&render(&self.registry).unwrap())
        }

        /// The value of `name` for this handler's pool, with `outcome` if given.
        fn count(&self, name: &str, outcome: Option<&str>) -> f64 {
            let outcome = outcome.map_or(String::new(), |o| format!(",outcome=\"{o}\""));
            let series = format!(
                "{name}{{service=\"{}\",zone=\"zone-a\"{outcome}}}",
                self.service
            );
            let text = render(&self.registry).unwrap();
            sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
        }
    }

    /// `outcome` once, as [`Tested::outcomes`] shows it.
    fn once(outcome: &str) -> Vec<(String, f64)> {
        vec![(outcome.to_owned(), 1.0)]
    }

    fn build(service: Service, config: SimConfig, gateway: FakeGateway) -> Tested {
        let tiny = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(1))
            .with_max_delay(Duration::from_millis(1));
        let mut registry = Registry::default();
        let metrics = WorkerMetrics::register(&mut registry);
        let handler = Handler {
            driver: SimDriver::new(config),
            reporter: gateway,
            service: service.clone(),
            zone: "zone-a".into(),
            max_deliver: AtomicI64::new(5),
            trust: TrustedKeys::new(vec![test_key().public_key()]),
            timing: Timing {
                report_retry: tiny.without_max_times(),
                driver_retry: tiny.with_max_times(3),
                progress_interval: Duration::from_millis(1),
            },
            metrics: metrics.pool(&service, "zone-a"),
        };
        Tested { handler, registry }
    }

    fn handler(config: SimConfig, gateway: FakeGateway) -> Tested {
        build(Service::named("vm"), config, gateway)
    }

    fn storage_handler(config: SimConfig, gateway: FakeGateway) -> Tested {
        build(Service::named("storage"), config, gateway)
    }

    /// A volume of `acme` in `zone-a` attached to `vm`.
    fn attached_volume(action: Action, vm: Uuid) -> Dispatch {
        dispatch(
            Kind::named("volume"),
            action,
            "data",
            json!({"size_gb": 20, "class": "ssd", "attached_to": vm}),
        )
    }

    /// The gateway's `200` about a VM of `acme` in `zone-a`.
    fn found_vm(vm: Uuid, phase: &str, host: Option<&str>) -> Result<PeerAnswer, LookupError> {
        Ok(PeerAnswer::Found(json!({
            "id": vm, "tenant": "acme", "kind": "vm", "zone": "zone-a", "name": "db",
            "spec": {"flavor": "m1.small", "image": "debian-12"},
            "status": {"power_state": "running", "host": host},
            "phase": phase, "generation": 1, "observed_generation": 1,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
        })))
    }

    fn peer_script(answers: Vec<Result<PeerAnswer, LookupError>>) -> FakeGateway {
        FakeGateway {
            peer_script: Mutex::new(answers.into()),
            ..FakeGateway::default()
        }
    }

    /// The dispatch signing key the handlers under test trust.
    fn test_key() -> signing::SigningKey {
        signing::SigningKey::from_seed([42; 32])
    }

    fn delivery(op: &Dispatch, delivered: i64) -> Delivery {
        signed_delivery(serde_json::to_vec(op).unwrap().into(), delivered)
    }

    /// A delivery of `payload`, signed by [`test_key`] as the relay signs.
    fn signed_delivery(payload: Bytes, delivered: i64) -> Delivery {
        // The subject of the pool of the payload's kind, as the relay publishes it.
        let kind = serde_json::from_slice::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| v["kind"].as_str().and_then(|k| k.parse().ok()))
            .unwrap_or_else(|| gateway_proto::Kind::named("vm"));
        let service = crate::drivers::sim::tests::service_of(&kind);
        let subject = format!("ops.{service}.zone-a");
        let (subject, msg_id) = (subject.as_str(), "0193a1b2-0000-7000-8000-000000000000.1");
        let [(_, key), (_, signature)] = test_key().sign(subject, msg_id, &payload);
        Delivery {
            subject: subject.into(),
            signature: SignatureHeaders {
                msg_id: Some(msg_id.into()),
                key: Some(key),
                signature: Some(signature),
            },
            payload,
            delivered: Some(delivered),
            trace: TraceHeaders {
                request_id: Some("req-1".into()),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            },
        }
    }

    fn states(h: &Handler<SimDriver, FakeGateway>) -> Vec<ReportState> {
        h.reporter
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r, _)| r.state)
            .collect()
    }

    fn last_report(h: &Handler<SimDriver, FakeGateway>) -> Report {
        h.reporter.seen.lock().unwrap().last().unwrap().1.clone()
    }

    fn script(answers: Vec<Result<ReportOutcome, ReportError>>) -> FakeGateway {
        FakeGateway {
            script: Mutex::new(answers.into()),
            ..FakeGateway::default()
        }
    }

    fn accepted(op: &Dispatch) -> Result<ReportOutcome, ReportError> {
        Ok(ReportOutcome::Accepted(ReportAck {
            operation_id: op.operation_id,
            state: OperationState::Running,
            attempt: 1,
            cancel_requested: false,
        }))
    }

    fn refused(code: &str) -> Result<ReportOutcome, ReportError> {
        Ok(ReportOutcome::Refused {
            code: code.into(),
            message: "no".into(),
        })
    }

    #[tokio::test]
    async fn a_success_is_reported_with_its_status_then_acked() {
        let h = handler(instant(), FakeGateway::default());
        let op = vm("web-1");
        assert_eq!(h.handle(&delivery(&op, 2)).await, Disposition::Ack);
        assert_eq!(states(&h), [ReportState::Running, ReportState::Succeeded]);
        let seen = h.reporter.seen.lock().unwrap();
        for (id, report, trace) in seen.iter() {
            assert_eq!(*id, op.operation_id);
            assert_eq!(report.attempt, 2, "attempt is the delivery count");
            assert_eq!(trace.request_id.as_deref(), Some("req-1"));
        }
        let status = seen[1].1.status.as_ref().unwrap();
        assert_eq!(status["flavor"], "m1.small");
        assert_eq!(status["generation"], 3);
        drop(seen);

        assert_eq!(h.outcomes(), once("succeeded"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 1.0);
        assert_eq!(h.count("worker_driver_retries_total", None), 0.0);
        assert_eq!(
            h.count("worker_driver_duration_seconds_count", Some("ok")),
            1.0
        );
        assert_eq!(h.count("worker_report_retries_total", None), 0.0);
        assert_eq!(h.count("worker_in_flight", None), 0.0);
    }

    #[tokio::test]
    async fn the_terminal_report_is_retried_until_accepted_and_only_then_acked() {
        let op = vm("web-1");
        let outage = || Err(ReportError::Transient("connection refused".into()));
        let gateway = script(vec![outage(), accepted(&op), outage(), outage(), outage()]);
        let h = handler(instant(), gateway);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        use ReportState::*;
        assert_eq!(
            states(&h),
            [Running, Running, Succeeded, Succeeded, Succeeded, Succeeded]
        );
        assert_eq!(h.driver.executions(op.operation_id), 1);
        assert_eq!(h.count("worker_report_retries_total", None), 4.0);
        assert_eq!(h.outcomes(), once("succeeded"));
    }

    #[tokio::test]
    async fn a_cancelled_operation_is_reported_cancelled_without_running_the_driver() {
        let gateway = FakeGateway {
            cancel_requested: true,
            ..FakeGateway::default()
        };
        let h = handler(instant(), gateway);
        let op = vm("web-1");
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        assert_eq!(states(&h), [ReportState::Running, ReportState::Cancelled]);
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(h.outcomes(), once("cancelled"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 0.0);
    }

    #[tokio::test]
    async fn a_refused_start_is_acked_without_running_the_driver() {
        for code in [
            "operation_finished",
            "stale_attempt",
            "operation_not_dispatched",
        ] {
            let h = handler(instant(), script(vec![refused(code)]));
            let op = vm("web-1");
            assert_eq!(
                h.handle(&delivery(&op, 1)).await,
                Disposition::Ack,
                "{code}"
            );
            assert_eq!(h.driver.executions(op.operation_id), 0);
            assert_eq!(h.outcomes(), once("finished_elsewhere"), "{code}");
        }
    }

    #[tokio::test]
    async fn a_refused_outcome_is_acked() {
        let op = vm("web-1");
        let h = handler(
            instant(),
            script(vec![accepted(&op), refused("operation_finished")]),
        );
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        assert_eq!(h.outcomes(), once("finished_elsewhere"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 1.0);
    }

    #[tokio::test]
    async fn a_report_the_gateway_will_never_accept_terminates_the_message() {
        let h = handler(
            instant(),
            script(vec![Err(ReportError::Permanent("403 Forbidden".into()))]),
        );
        let op = vm("web-1");
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(h.outcomes(), once("poison"), "terminated without a report");
    }

    #[tokio::test]
    async fn a_permanent_failure_is_reported_failed_then_terminated() {
        let h = handler(instant(), FakeGateway::default());
        let op = vm("fail-web");
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        let report = last_report(&h);
        assert_eq!(report.state, ReportState::Failed);
        let error = report.error.unwrap();
        assert_eq!(error.code, "simulated_failure");
        assert!(!error.retryable);
        assert_eq!(h.outcomes(), once("failed"));
        assert_eq!(
            h.count("worker_driver_duration_seconds_count", Some("permanent")),
            1.0
        );
        assert_eq!(h.count("worker_driver_retries_total", None), 0.0);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_in_process_then_handed_back() {
        let flaky = SimConfig {
            transient_failure_rate: 1.0,
            ..instant()
        };
        let h = handler(flaky, FakeGateway::default());
        let op = vm("web-1");
        assert_eq!(
            h.handle(&delivery(&op, 2)).await,
            Disposition::Nak(Some(Duration::from_secs(2)))
        );
        assert_eq!(h.driver.executions(op.operation_id), 4, "1 try + 3 retries");
        assert_eq!(
            states(&h),
            [ReportState::Running],
            "nothing terminal is reported"
        );
        assert_eq!(h.outcomes(), once("retried"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 4.0);
        assert_eq!(h.count("worker_driver_retries_total", None), 3.0);
        assert_eq!(
            h.count("worker_driver_duration_seconds_count", Some("transient")),
            4.0
        );
    }

    #[tokio::test]
    async fn transient_failures_on_the_last_delivery_fail_the_operation() {
        let flaky = SimConfig {
            transient_failure_rate: 1.0,
            ..instant()
        };
        let h = handler(flaky, FakeGateway::default());
        let op = vm("web-1");
        assert_eq!(h.handle(&delivery(&op, 5)).await, Disposition::Term);
        let error = last_report(&h).error.unwrap();
        assert_eq!(error.code, "retries_exhausted");
        assert!(error.message.contains("simulated transient failure"));
        assert_eq!(h.outcomes(), once("failed"));
    }

    #[tokio::test]
    async fn an_operation_past_its_deadline_fails_without_running() {
        let h = handler(instant(), FakeGateway::default());
        let mut op = vm("web-1");
        op.deadline = Utc::now() - chrono::Duration::seconds(1);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        assert_eq!(last_report(&h).error.unwrap().code, "deadline_exceeded");
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(h.outcomes(), once("failed"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 0.0);
    }

    #[tokio::test]
    async fn a_driver_call_cut_short_by_the_deadline_is_timed_as_permanent() {
        let slow = SimConfig {
            min_latency: Duration::from_secs(60),
            max_latency: Duration::from_secs(60),
            ..instant()
        };
        let h = handler(slow, FakeGateway::default());
        let mut op = vm("web-1");
        op.deadline = Utc::now() + chrono::Duration::milliseconds(100);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        assert_eq!(last_report(&h).error.unwrap().code, "deadline_exceeded");
        assert_eq!(h.outcomes(), once("failed"));
        assert_eq!(h.count("worker_driver_attempts_total", None), 1.0);
        assert_eq!(
            h.count("worker_driver_duration_seconds_count", Some("permanent")),
            1.0
        );
        let took = h.count("worker_driver_duration_seconds_sum", Some("permanent"));
        assert!((0.05..5.0).contains(&took), "{took}");
    }

    #[tokio::test]
    async fn poison_and_misrouted_messages_are_terminated_without_a_report() {
        let h = handler(instant(), FakeGateway::default());
        let poison = signed_delivery(Bytes::from_static(b"{not json"), 1);
        assert_eq!(h.handle(&poison).await, Disposition::Term);

        let mut elsewhere = vm("web-1");
        elsewhere.zone = "zone-b".into();
        assert_eq!(h.handle(&delivery(&elsewhere, 1)).await, Disposition::Term);
        assert!(states(&h).is_empty());

        let mut without_metadata = delivery(&vm("web-2"), 1);
        without_metadata.delivered = None;
        assert_eq!(h.handle(&without_metadata).await, Disposition::Term);
        assert_eq!(h.outcomes(), [("poison".to_owned(), 3.0)]);
    }

    #[tokio::test]
    async fn unsigned_forged_and_altered_messages_are_terminated_unread_and_counted() {
        let h = handler(instant(), FakeGateway::default());
        let op = vm("web-1");
        let genuine = delivery(&op, 1);

        let mut unsigned = delivery(&op, 1);
        unsigned.signature = SignatureHeaders {
            msg_id: unsigned.signature.msg_id.clone(),
            ..SignatureHeaders::default()
        };
        let mut by_another_key = delivery(&op, 1);
        let [(_, key), (_, signature)] = signing::SigningKey::from_seed([7; 32]).sign(
            &genuine.subject,
            genuine.signature.msg_id.as_deref().unwrap(),
            &genuine.payload,
        );
        by_another_key.signature.key = Some(key);
        by_another_key.signature.signature = Some(signature);
        let mut altered = delivery(&op, 1);
        let mut changed = op.clone();
        changed.spec["flavor"] = json!("m1.xlarge");
        changed.input = json!({"vm_id": Uuid::now_v7()});
        altered.payload = serde_json::to_vec(&changed).unwrap().into();
        let mut moved = delivery(&op, 1);
        moved.subject = "ops.vm.zone-b".into();
        let mut renumbered = delivery(&op, 1);
        renumbered.signature.msg_id = Some(format!("{}.9", op.operation_id));

        for d in [&unsigned, &by_another_key, &altered, &moved, &renumbered] {
            assert_eq!(h.handle(d).await, Disposition::Term);
        }
        assert!(states(&h).is_empty(), "nothing was reported");
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(h.outcomes(), [("forged".to_owned(), 5.0)]);

        // The genuine message still runs.
        assert_eq!(h.handle(&genuine).await, Disposition::Ack);
        assert_eq!(h.driver.executions(op.operation_id), 1);
    }

    #[tokio::test]
    async fn an_attachment_reads_the_vm_through_the_gateway_and_the_driver_sees_its_host() {
        let vm_id = Uuid::now_v7();
        let outage = || Err(LookupError::Transient("503 Service Unavailable".into()));
        let gateway = peer_script(vec![
            outage(),
            outage(),
            found_vm(vm_id, "ready", Some("zone-a-host-3")),
        ]);
        let h = storage_handler(instant(), gateway);
        let op = attached_volume(Action::named("attach"), vm_id);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        assert_eq!(states(&h), [ReportState::Running, ReportState::Succeeded]);
        let status = last_report(&h).status.unwrap();
        assert_eq!(status["attached_to"], vm_id.to_string());
        assert_eq!(status["attached_host"], "zone-a-host-3");
        assert_eq!(status["device"], "/dev/vdb");
        let reads = h.reporter.reads.lock().unwrap();
        assert_eq!(reads.len(), 3, "two outages, then the answer");
        for (tenant, peer, trace) in reads.iter() {
            assert_eq!(tenant, "acme");
            assert_eq!(*peer, Peer::AttachTarget { vm: vm_id });
            assert_eq!(trace.request_id.as_deref(), Some("req-1"));
            assert!(trace.traceparent.is_some());
        }
        drop(reads);
        assert_eq!(h.driver.executions(op.operation_id), 1);
        assert_eq!(h.outcomes(), once("succeeded"));
        assert_eq!(h.count("worker_peer_lookups_total", Some("transient")), 2.0);
        assert_eq!(h.count("worker_peer_lookups_total", Some("found")), 1.0);
    }

    #[tokio::test]
    async fn a_vm_still_provisioning_lends_no_host_but_the_attachment_goes_ahead() {
        let vm_id = Uuid::now_v7();
        let gateway = peer_script(vec![found_vm(vm_id, "provisioning", None)]);
        let h = storage_handler(instant(), gateway);
        let op = attached_volume(Action::create(), vm_id);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        let status = last_report(&h).status.unwrap();
        assert_eq!(status["attached_to"], vm_id.to_string());
        assert_eq!(status["attached_host"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn a_missing_or_dying_vm_fails_the_attachment_without_running_the_driver() {
        let vm_id = Uuid::now_v7();
        for (answer, why) in [
            (
                Ok(PeerAnswer::NotFound {
                    code: "not_found".into(),
                    message: "resource not found".into(),
                }),
                "does not exist",
            ),
            (
                found_vm(vm_id, "deleting", Some("zone-a-host-3")),
                "deleting",
            ),
            (found_vm(vm_id, "deleted", None), "deleted"),
        ] {
            let h = storage_handler(instant(), peer_script(vec![answer]));
            let op = attached_volume(Action::update(), vm_id);
            assert_eq!(
                h.handle(&delivery(&op, 1)).await,
                Disposition::Term,
                "{why}"
            );
            assert_eq!(states(&h), [ReportState::Running, ReportState::Failed]);
            let error = last_report(&h).error.unwrap();
            assert_eq!(error.code, "attachment_target_missing");
            assert!(
                error.message.contains(&vm_id.to_string()),
                "{}",
                error.message
            );
            assert!(error.message.contains(why), "{}", error.message);
            assert!(!error.retryable);
            assert_eq!(h.driver.executions(op.operation_id), 0);
            assert_eq!(h.outcomes(), once("failed"), "{why}");
            let lookups = h.count("worker_peer_lookups_total", Some("found"))
                + h.count("worker_peer_lookups_total", Some("not_found"));
            assert_eq!(lookups, 1.0, "{why}");
        }
    }

    #[tokio::test]
    async fn a_read_the_gateway_refuses_fails_the_operation() {
        let refused = Err(LookupError::Permanent(
            "403 Forbidden: forbidden: no".into(),
        ));
        let h = storage_handler(instant(), peer_script(vec![refused]));
        let op = attached_volume(Action::named("attach"), Uuid::now_v7());
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        let error = last_report(&h).error.unwrap();
        assert_eq!(error.code, "attachment_lookup_failed");
        assert!(error.message.contains("403"), "{}", error.message);
        assert_eq!(h.reporter.reads.lock().unwrap().len(), 1, "not retried");
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(h.count("worker_peer_lookups_total", Some("permanent")), 1.0);
        assert_eq!(h.outcomes(), once("failed"));
    }

    #[tokio::test]
    async fn reads_are_retried_until_the_deadline() {
        let gateway = FakeGateway {
            peer_outage: true,
            ..FakeGateway::default()
        };
        let h = storage_handler(instant(), gateway);
        let mut op = attached_volume(Action::named("attach"), Uuid::now_v7());
        op.deadline = Utc::now() + chrono::Duration::milliseconds(100);
        assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Term);
        assert_eq!(last_report(&h).error.unwrap().code, "deadline_exceeded");
        let reads = h.reporter.reads.lock().unwrap().len();
        assert!(reads > 1);
        assert_eq!(h.driver.executions(op.operation_id), 0);
        assert_eq!(
            h.count("worker_peer_lookups_total", Some("transient")),
            reads as f64
        );
        assert_eq!(h.count("worker_driver_attempts_total", None), 0.0);
    }

    #[tokio::test]
    async fn only_storage_operations_on_attached_volumes_read_peers() {
        let vm_id = Uuid::now_v7();
        // Deleting an attached volume, or one with no attachment: nothing to read.
        let h = storage_handler(instant(), FakeGateway::default());
        for op in [
            attached_volume(Action::delete(), vm_id),
            dispatch(
                Kind::named("volume"),
                Action::named("detach"),
                "data",
                json!({"size_gb": 20, "class": "ssd"}),
            ),
        ] {
            assert_eq!(h.handle(&delivery(&op, 1)).await, Disposition::Ack);
        }
        assert!(h.reporter.reads.lock().unwrap().is_empty());
        // A VM pool never reads anything.
        let h = handler(instant(), FakeGateway::default());
        assert_eq!(h.handle(&delivery(&vm("web-1"), 1)).await, Disposition::Ack);
        assert!(h.reporter.reads.lock().unwrap().is_empty());
    }

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    thread_local! {
        /// Where this thread's log lines go while a test captures them.
        static CAPTURED: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
    }

    /// Writes to the capture of the thread it is made on, if any, else nowhere.
    struct ThisThread;

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ThisThread {
        type Writer = Box<dyn std::io::Write>;

        fn make_writer(&'a self) -> Self::Writer {
            match CAPTURED.with(|c| c.borrow().clone()) {
                Some(logs) => Box::new(logs),
                None => Box::new(std::io::sink()),
            }
        }
    }

    impl Logs {
        /// Captures the JSON log lines (debug and up) of the calling thread, through one
        /// subscriber set for the whole test binary. A subscriber set for the test alone
        /// (`set_default`) lost lines now and then (one run in five): a log line's
        /// interest is cached when its callsite is first hit, and another test hitting it
        /// on a thread without that subscriber, while it was being registered, left it
        /// cached as "never". The global subscriber is always asked.
        fn capture() -> Self {
            static INSTALLED: std::sync::Once = std::sync::Once::new();
            INSTALLED.call_once(|| {
                let subscriber = tracing_subscriber::fmt()
                    .json()
                    .with_max_level(tracing::Level::DEBUG)
                    .with_writer(ThisThread)
                    .finish();
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other test sets a global subscriber");
            });
            let logs = Logs::default();
            CAPTURED.with(|c| *c.borrow_mut() = Some(logs.clone()));
            logs
        }

        /// Each JSON line written so far.
        fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        }
    }

    #[tokio::test]
    async fn every_json_log_line_about_a_message_carries_its_request_id_and_traceparent() {
        // On this thread: a `#[tokio::test]` runs its tasks on the thread it starts on.
        let logs = Logs::capture();

        let h = handler(instant(), FakeGateway::default());
        let op = vm("web-1");
        let good = delivery(&op, 1);
        let poison = signed_delivery(Bytes::from_static(b"{not json"), 1);
        let mut forged = delivery(&op, 1);
        forged.signature.signature = None;
        for d in [&good, &poison, &forged] {
            h.handle(d).instrument(h.span(d)).await;
        }

        let lines = logs.lines();
        let messages: Vec<&str> = lines
            .iter()
            .map(|l| l["fields"]["message"].as_str().unwrap())
            .collect();
        assert!(messages.contains(&"operation finished"), "{messages:?}");
        assert!(
            messages.iter().any(|m| m.starts_with("poison message")),
            "{messages:?}"
        );
        // A refused, unsigned message is logged at warn, with why.
        let refused = lines
            .iter()
            .find(|l| l["fields"]["message"] == "refused a message the gateway did not sign: terminating it without reading it")
            .unwrap_or_else(|| panic!("{messages:?}"));
        assert_eq!(refused["level"], "WARN");
        assert_eq!(
            refused["fields"]["reason"],
            "the message carries no dispatch signature"
        );
        for line in &lines {
            let span = &line["span"];
            assert_eq!(span["name"], "message", "{line}");
            assert_eq!(span["request_id"], "req-1", "{line}");
            assert_eq!(
                span["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "{line}"
            );
            assert_eq!(span["service"], "vm", "{line}");
        }
        let finished = lines
            .iter()
            .find(|l| l["fields"]["message"] == "operation finished")
            .unwrap();
        assert_eq!(
            finished["span"]["operation.id"],
            op.operation_id.to_string()
        );
        assert_eq!(finished["span"]["attempt"], 1);
    }

    #[test]
    fn nak_delay_grows_one_second_per_attempt_up_to_thirty() {
        assert_eq!(nak_delay(0), Duration::from_secs(1));
        assert_eq!(nak_delay(1), Duration::from_secs(1));
        assert_eq!(nak_delay(4), Duration::from_secs(4));
        assert_eq!(nak_delay(30), Duration::from_secs(30));
        assert_eq!(nak_delay(1000), Duration::from_secs(30));
        assert_eq!(nak_delay(-3), Duration::from_secs(1));
    }

    #[test]
    fn default_timings_send_progress_well_within_ack_wait() {
        let t = Timing::default();
        assert!(t.progress_interval * 3 <= Duration::from_secs(30));
        use backon::BackoffBuilder;
        let longest = t
            .report_retry
            .with_jitter_seed(7)
            .build()
            .take(50)
            .max()
            .unwrap();
        assert!(longest <= Duration::from_secs(5), "{longest:?}");
        assert_eq!(t.driver_retry.build().count(), 3);
    }
}
