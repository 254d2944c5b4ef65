//! Coalescing reports: the reports a pool has ready at the same moment go to the gateway
//! in one `POST /v1/reports`, applied there in one transaction and each still accepted or
//! refused on its own.
//!
//! Nothing waits for a batch to fill. A report is sent as soon as no other request of the
//! pool is in flight, with whatever else queued meanwhile: one report alone goes through
//! `POST /v1/operations/{id}/reports` with its trace headers, exactly as without
//! batching, and under load the batches grow by themselves. Only a full batch (a backlog
//! of `max` reports or more) goes beside requests still in flight, up to [`SENDERS`] at
//! once, and so does a partial one that has waited [`STUCK`] for them. With up to four
//! requests in flight whatever their size, batches stayed at one report until the
//! gateway was saturated, and the gateway's work per report (a request, a transaction, a
//! commit) was what queued at a steady rate: see the gateway's changelog for what one
//! request at a time bought end to end. Each report keeps its own
//! answer, so the handler's retries and decisions do not change. A gateway without the
//! batch route (an older one, during a rolling upgrade) gets each report on its own.

use crate::peers::{LookupError, Peer, PeerAnswer, Peers};
use crate::report::{
    error_body, refusal, GatewayClient, ReportError, ReportOutcome, Reporter, TraceHeaders,
};
use gateway_proto::{BatchedReport, BatchedReportResult, Report, ReportBatch, ReportBatchResult};
use reqwest::StatusCode;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

/// How many requests of batches may be in flight at once, per pool, when full batches
/// are waiting (a partial batch waits for the requests in flight to end, or [`STUCK`]).
pub const SENDERS: usize = 4;

/// How long a partial batch waits for the requests in flight to end before it goes
/// beside them: a report request takes milliseconds, one in flight this long is held up
/// (a gateway transaction waiting on a lock, a lost connection that has yet to time
/// out), and the reports behind it must not wait for it.
pub const STUCK: std::time::Duration = std::time::Duration::from_millis(250);

/// A report waiting to be sent, and where its answer goes.
struct Queued {
    operation: Uuid,
    report: Report,
    trace: TraceHeaders,
    answer: oneshot::Sender<Result<ReportOutcome, ReportError>>,
}

/// A [`Reporter`] that coalesces concurrent reports into batches of at most `max`.
/// Cheap to clone; its sending task ends when the last clone is dropped.
///
/// Its queue is unbounded as a channel but not in use: every report in it has a caller
/// waiting for its answer, and a pool's callers are its message handlers, at most its
/// `WORKER_CONCURRENCY` at once, each with one report in flight. So while the gateway is
/// away the queue holds at most one report per handler.
#[derive(Clone)]
pub struct BatchReporter {
    client: GatewayClient,
    queue: mpsc::UnboundedSender<Queued>,
}

impl BatchReporter {
    /// Starts the sending task (on the current Tokio runtime) for batches of at most
    /// `max` reports (`1` sends every report on its own).
    pub fn new(client: GatewayClient, max: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_batches(client.clone(), rx, max.max(1)));
        Self { client, queue }
    }
}

/// Takes what is queued, up to `max`: a full batch whenever a sender is free, a partial
/// one once no request is in flight (reports queued meanwhile join it) or after
/// [`STUCK`].
async fn send_batches(client: GatewayClient, mut rx: mpsc::UnboundedReceiver<Queued>, max: usize) {
    let senders = Arc::new(Semaphore::new(SENDERS));
    while let Some(first) = rx.recv().await {
        if 1 + rx.len() < max {
            // Every sender free (this task alone takes permits, so the one taken next is
            // there at once), or a request in flight is held up.
            tokio::select! {
                all = senders.acquire_many(SENDERS as u32) => match all {
                    Ok(all) => drop(all),
                    Err(_) => return,
                },
                _ = tokio::time::sleep(STUCK) => {}
            }
        }
        let Ok(permit) = senders.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            send(&client, batch).await;
            drop(permit);
        });
    }
}

/// Sends `batch` and hands every report its answer.
async fn send(client: &GatewayClient, batch: Vec<Queued>) {
    if let [one] = batch.as_slice() {
        let outcome = client.send(one.operation, &one.report, &one.trace).await;
        let one = batch.into_iter().next().expect("one report");
        let _ = one.answer.send(outcome);
        return;
    }
    let body = ReportBatch {
        reports: batch
            .iter()
            .map(|q| BatchedReport {
                operation_id: q.operation,
                report: q.report.clone(),
                request_id: q.trace.request_id.clone(),
            })
            .collect(),
    };
    match post(client, &body).await {
        Ok(Some(results)) => {
            for (queued, result) in batch.into_iter().zip(results) {
                let _ = queued.answer.send(outcome(result));
            }
        }
        // A gateway older than batches (during a rolling upgrade): each on its own.
        Ok(None) => {
            futures::future::join_all(batch.into_iter().map(|q| async move {
                let outcome = client.send(q.operation, &q.report, &q.trace).await;
                let _ = q.answer.send(outcome);
            }))
            .await;
        }
        Err(e) => {
            for queued in batch {
                let _ = queued.answer.send(Err(e.clone()));
            }
        }
    }
}

/// `POST /v1/reports`: one result per report, in order; `None` when the gateway has no
/// such route (`404`, `405`); or why there are no results.
async fn post(
    client: &GatewayClient,
    body: &ReportBatch,
) -> Result<Option<Vec<BatchedReportResult>>, ReportError> {
    let url = format!("{}/v1/reports", client.base_url());
    let (status, bytes) = client.post(url, body, &TraceHeaders::default()).await?;
    if matches!(
        status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    ) {
        return Ok(None);
    }
    if !status.is_success() {
        let (code, message) = error_body(&bytes);
        return Err(match refusal(status, code, message) {
            // A batch is never refused as a whole with a 409; were it, nothing applied.
            Ok(_) => ReportError::Permanent(format!("{status} for a whole batch")),
            Err(e) => e,
        });
    }
    match serde_json::from_slice::<ReportBatchResult>(&bytes) {
        Ok(r) if r.results.len() == body.reports.len() => Ok(Some(r.results)),
        Ok(r) => Err(ReportError::Permanent(format!(
            "{} results for {} reports",
            r.results.len(),
            body.reports.len()
        ))),
        Err(e) => Err(ReportError::Permanent(format!(
            "{status} with a body that is not a ReportBatchResult: {e}"
        ))),
    }
}

/// One report's result, sorted as [`crate::report::classify`] sorts a single answer.
fn outcome(r: BatchedReportResult) -> Result<ReportOutcome, ReportError> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = r.code.unwrap_or_else(|| "unknown".into());
    let message = r.message.unwrap_or_default();
    match (status, r.ack) {
        (StatusCode::OK, Some(ack)) => Ok(ReportOutcome::Accepted(ack)),
        (StatusCode::OK, None) => Err(ReportError::Permanent(
            "200 for a report without its acknowledgement".into(),
        )),
        (s, _) => refusal(s, code, message),
    }
}

impl Reporter for BatchReporter {
    fn report(
        &self,
        operation: Uuid,
        report: &Report,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<ReportOutcome, ReportError>> + Send {
        let (answer, answered) = oneshot::channel();
        let queued = self.queue.send(Queued {
            operation,
            report: report.clone(),
            trace: trace.clone(),
            answer,
        });
        async move {
            if queued.is_err() {
                return Err(ReportError::Transient(
                    "the report sender has stopped".into(),
                ));
            }
            answered
                .await
                .unwrap_or_else(|_| Err(ReportError::Transient("the report was dropped".into())))
        }
    }
}

impl Peers for BatchReporter {
    fn read(
        &self,
        tenant: &str,
        peer: Peer,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<PeerAnswer, LookupError>> + Send {
        self.client.read(tenant, peer, trace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_proto::{OperationState, ReportAck};

    fn result(status: u16, code: Option<&str>) -> BatchedReportResult {
        let id = Uuid::now_v7();
        BatchedReportResult {
            operation_id: id,
            status,
            ack: (status == 200).then_some(ReportAck {
                operation_id: id,
                state: OperationState::Running,
                attempt: 1,
                cancel_requested: false,
            }),
            code: code.map(Into::into),
            message: code.map(|_| "why".into()),
        }
    }

    #[test]
    fn each_result_is_sorted_like_a_single_answer() {
        assert!(matches!(
            outcome(result(200, None)),
            Ok(ReportOutcome::Accepted(_))
        ));
        assert_eq!(
            outcome(result(409, Some("stale_attempt"))).unwrap(),
            ReportOutcome::Refused {
                code: "stale_attempt".into(),
                message: "why".into()
            }
        );
        for status in [403, 404, 422] {
            let err = outcome(result(status, Some("forbidden"))).unwrap_err();
            assert!(!err.is_transient(), "{status}");
        }
        assert!(outcome(result(503, Some("unavailable")))
            .unwrap_err()
            .is_transient());
        // A 200 without its acknowledgement breaks the contract: not retried.
        let mut broken = result(200, None);
        broken.ack = None;
        assert!(!outcome(broken).unwrap_err().is_transient());
    }

    /// A first attempt's `running` report.
    fn running() -> Report {
        Report {
            attempt: 1,
            state: gateway_proto::ReportState::Running,
            status: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_gateway_without_the_batch_route_gets_each_report_on_its_own() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let singles = Arc::new(AtomicUsize::new(0));
        let counted = singles.clone();
        let app = axum::Router::new().route(
            "/v1/operations/{id}/reports",
            axum::routing::post(move |axum::extract::Path(id): axum::extract::Path<Uuid>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    axum::Json(ReportAck {
                        operation_id: id,
                        state: OperationState::Running,
                        attempt: 1,
                        cancel_requested: false,
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let reporter = BatchReporter::new(GatewayClient::new(&url, "k").unwrap(), 16);
        let report = running();
        let trace = TraceHeaders::default();
        // One task at a time: all ten are queued before the sender looks, so they leave
        // as one batch, which this gateway answers 404.
        let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let answers =
            futures::future::join_all(ids.iter().map(|id| reporter.report(*id, &report, &trace)))
                .await;
        for (id, answer) in ids.iter().zip(answers) {
            match answer {
                Ok(ReportOutcome::Accepted(ack)) => assert_eq!(ack.operation_id, *id),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(singles.load(Ordering::SeqCst), 10);
    }

    /// A gateway whose every answer waits for `gate`, counting requests in flight (the
    /// most at once) and the size of each request (one for a single report).
    struct SlowGateway {
        url: String,
        gate: Arc<tokio::sync::Semaphore>,
        sizes: Arc<std::sync::Mutex<Vec<usize>>>,
        most_at_once: Arc<std::sync::atomic::AtomicUsize>,
    }

    async fn slow_gateway() -> SlowGateway {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let answer = {
            let (gate, sizes, now, most) = (gate.clone(), sizes.clone(), now, most.clone());
            move |ids: Vec<Uuid>| {
                let (gate, sizes, now, most) =
                    (gate.clone(), sizes.clone(), now.clone(), most.clone());
                async move {
                    let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(at_once, Ordering::SeqCst);
                    sizes.lock().unwrap().push(ids.len());
                    gate.acquire().await.unwrap().forget();
                    now.fetch_sub(1, Ordering::SeqCst);
                    ids.into_iter()
                        .map(|id| ReportAck {
                            operation_id: id,
                            state: OperationState::Running,
                            attempt: 1,
                            cancel_requested: false,
                        })
                        .collect::<Vec<_>>()
                }
            }
        };
        let single = answer.clone();
        let app = axum::Router::new()
            .route(
                "/v1/operations/{id}/reports",
                axum::routing::post(move |axum::extract::Path(id): axum::extract::Path<Uuid>| {
                    let single = single.clone();
                    async move { axum::Json(single(vec![id]).await.remove(0)) }
                }),
            )
            .route(
                "/v1/reports",
                axum::routing::post(move |axum::Json(batch): axum::Json<ReportBatch>| {
                    let answer = answer.clone();
                    async move {
                        let ids = batch.reports.iter().map(|r| r.operation_id).collect();
                        let results = answer(ids)
                            .await
                            .into_iter()
                            .map(|ack| BatchedReportResult {
                                operation_id: ack.operation_id,
                                status: 200,
                                ack: Some(ack),
                                code: None,
                                message: None,
                            })
                            .collect();
                        axum::Json(ReportBatchResult { results })
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowGateway {
            url,
            gate,
            sizes,
            most_at_once: most,
        }
    }

    /// Waits until the gateway has seen `n` requests.
    async fn requests_seen(gateway: &SlowGateway, n: usize) {
        for _ in 0..500 {
            if gateway.sizes.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "the gateway saw {:?}, not {n} requests",
            gateway.sizes.lock().unwrap()
        );
    }

    /// `n` `running` reports of new operations, each made by a task of its own.
    fn spawn_reports(
        reporter: &BatchReporter,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<ReportOutcome, ReportError>>> {
        (0..n)
            .map(|_| {
                let reporter = reporter.clone();
                let trace = TraceHeaders::default();
                tokio::spawn(
                    async move { reporter.report(Uuid::now_v7(), &running(), &trace).await },
                )
            })
            .collect()
    }

    /// Waits for every report of `reports` and checks that each was accepted.
    async fn all_accepted(
        reports: Vec<tokio::task::JoinHandle<Result<ReportOutcome, ReportError>>>,
    ) {
        for answer in futures::future::join_all(reports).await {
            assert!(matches!(answer.unwrap(), Ok(ReportOutcome::Accepted(_))));
        }
    }

    /// The most requests the gateway had in flight at once.
    fn most_at_once(gateway: &SlowGateway) -> usize {
        gateway
            .most_at_once
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn reports_made_while_one_is_in_flight_wait_and_leave_as_one_batch() {
        let gateway = slow_gateway().await;
        let reporter = BatchReporter::new(GatewayClient::new(&gateway.url, "k").unwrap(), 16);
        let first = spawn_reports(&reporter, 1);
        requests_seen(&gateway, 1).await;
        // Five more while the first is in flight: a sender is free, but they wait.
        let rest = spawn_reports(&reporter, 5);
        tokio::time::sleep(STUCK / 2).await;
        assert_eq!(
            *gateway.sizes.lock().unwrap(),
            [1],
            "nothing sent beside the first"
        );
        gateway.gate.add_permits(100);
        all_accepted(first).await;
        all_accepted(rest).await;
        assert_eq!(*gateway.sizes.lock().unwrap(), [1, 5]);
        assert_eq!(most_at_once(&gateway), 1);
    }

    #[tokio::test]
    async fn reports_behind_a_request_held_up_go_beside_it_after_a_moment() {
        let gateway = slow_gateway().await;
        let reporter = BatchReporter::new(GatewayClient::new(&gateway.url, "k").unwrap(), 16);
        let first = spawn_reports(&reporter, 1);
        requests_seen(&gateway, 1).await;
        let started = tokio::time::Instant::now();
        let rest = spawn_reports(&reporter, 3);
        // The first is held up: after STUCK the three go as one batch beside it.
        requests_seen(&gateway, 2).await;
        assert!(
            started.elapsed() >= STUCK,
            "sent after {:?}",
            started.elapsed()
        );
        assert_eq!(*gateway.sizes.lock().unwrap(), [1, 3]);
        assert_eq!(most_at_once(&gateway), 2);
        gateway.gate.add_permits(100);
        all_accepted(first).await;
        all_accepted(rest).await;
    }

    #[tokio::test]
    async fn full_batches_go_beside_requests_in_flight() {
        let gateway = slow_gateway().await;
        let reporter = BatchReporter::new(GatewayClient::new(&gateway.url, "k").unwrap(), 2);
        let (report, trace) = (running(), TraceHeaders::default());
        // Ten reports queued at once: five full batches of two, up to SENDERS at once.
        let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let answers = tokio::spawn({
            let reporter = reporter.clone();
            async move {
                futures::future::join_all(
                    ids.iter().map(|id| reporter.report(*id, &report, &trace)),
                )
                .await
            }
        });
        requests_seen(&gateway, SENDERS).await;
        assert_eq!(most_at_once(&gateway), SENDERS);
        gateway.gate.add_permits(100);
        for answer in answers.await.unwrap() {
            assert!(matches!(answer, Ok(ReportOutcome::Accepted(_))));
        }
        assert_eq!(gateway.sizes.lock().unwrap().iter().sum::<usize>(), 10);
    }

    #[tokio::test]
    async fn an_unreachable_gateway_fails_every_report_of_a_batch_transiently() {
        let port = crate::testing::closed_port();
        let client = GatewayClient::new(&format!("http://127.0.0.1:{port}"), "k").unwrap();
        let reporter = BatchReporter::new(client, 16);
        let report = running();
        let trace = TraceHeaders::default();
        let answers = futures::future::join_all(
            (0..20).map(|_| reporter.report(Uuid::now_v7(), &report, &trace)),
        )
        .await;
        for answer in answers {
            assert!(answer.unwrap_err().is_transient());
        }
    }
}
