//! The operation state machine as driven by workers' reports.
//!
//! A report is accepted only if it moves the operation forward for the current attempt.
//! A repeated report is a no-op with the same answer (workers retry reports whose answer
//! they lost), and a stale one is rejected, so a slow worker whose message was
//! redelivered cannot overwrite a newer attempt's outcome.

use super::{OperationState, ReportState};
use gateway_proto::Report;

/// What the gateway knows of an operation when a report arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Current state.
    pub state: OperationState,
    /// Current attempt (0 before any worker started one).
    pub attempt: i32,
    /// Whether a client asked to cancel it.
    pub cancel_requested: bool,
}

/// What an accepted report does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing: the report repeats one already applied.
    Unchanged,
    /// A worker started `attempt`.
    Start {
        /// The attempt started.
        attempt: i32,
    },
    /// The operation ends in `state`.
    Finish {
        /// A terminal state.
        state: OperationState,
        /// The attempt that ended it.
        attempt: i32,
    },
}

/// Why a report was refused. Each maps to a `409` or `422` with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The operation already ended, differently.
    #[error("operation already ended as {state}")]
    Finished {
        /// Its terminal state.
        state: OperationState,
    },
    /// The report is about an attempt older than the current one.
    #[error("attempt {reported} is older than the current attempt {current}")]
    StaleAttempt {
        /// The attempt reported.
        reported: i32,
        /// The current attempt.
        current: i32,
    },
    /// The operation is still queued behind another one: no worker can have it.
    #[error("operation is queued and has not been dispatched")]
    NotDispatched,
    /// The report contradicts itself.
    #[error("{0}")]
    Invalid(&'static str),
}

impl Rejection {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Finished { .. } => "operation_finished",
            Rejection::StaleAttempt { .. } => "stale_attempt",
            Rejection::NotDispatched => "operation_not_dispatched",
            Rejection::Invalid(_) => "invalid_report",
        }
    }
}

/// The terminal operation state a report claims, if any.
pub fn terminal_state(state: ReportState) -> Option<OperationState> {
    match state {
        ReportState::Running => None,
        ReportState::Succeeded => Some(OperationState::Succeeded),
        ReportState::Failed => Some(OperationState::Failed),
        ReportState::Cancelled => Some(OperationState::Cancelled),
    }
}

/// Decides what `report` does to an operation in `current` progress.
pub fn decide(current: Progress, report: &Report) -> Result<Transition, Rejection> {
    if report.attempt < 1 {
        return Err(Rejection::Invalid("attempt must be 1 or more"));
    }
    match report.state {
        ReportState::Failed if report.error.is_none() => {
            return Err(Rejection::Invalid("a failed report needs an error"))
        }
        ReportState::Succeeded | ReportState::Running if report.error.is_some() => {
            return Err(Rejection::Invalid("only failed reports carry an error"))
        }
        ReportState::Cancelled if !current.cancel_requested && !current.state.is_terminal() => {
            return Err(Rejection::Invalid(
                "cancelled may be reported only after a cancellation was requested",
            ))
        }
        _ => {}
    }
    let claimed = terminal_state(report.state);
    if current.state.is_terminal() {
        return if claimed == Some(current.state) && report.attempt == current.attempt {
            Ok(Transition::Unchanged)
        } else {
            Err(Rejection::Finished {
                state: current.state,
            })
        };
    }
    if current.state == OperationState::Queued {
        return Err(Rejection::NotDispatched);
    }
    if report.attempt < current.attempt {
        return Err(Rejection::StaleAttempt {
            reported: report.attempt,
            current: current.attempt,
        });
    }
    Ok(match claimed {
        None if current.state == OperationState::Running && report.attempt == current.attempt => {
            Transition::Unchanged
        }
        None => Transition::Start {
            attempt: report.attempt,
        },
        Some(state) => Transition::Finish {
            state,
            attempt: report.attempt,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_proto::OperationError;

    fn at(state: OperationState, attempt: i32) -> Progress {
        Progress {
            state,
            attempt,
            cancel_requested: false,
        }
    }

    fn report(state: ReportState, attempt: i32) -> Report {
        Report {
            attempt,
            state,
            status: None,
            error: (state == ReportState::Failed).then(|| OperationError {
                code: "boom".into(),
                message: "it broke".into(),
                retryable: false,
            }),
        }
    }

    #[test]
    fn a_worker_may_start_from_pending_or_dispatched() {
        for s in [OperationState::Pending, OperationState::Dispatched] {
            assert_eq!(
                decide(at(s, 0), &report(ReportState::Running, 1)),
                Ok(Transition::Start { attempt: 1 })
            );
        }
    }

    #[test]
    fn repeated_reports_are_no_ops() {
        let running = at(OperationState::Running, 2);
        assert_eq!(
            decide(running, &report(ReportState::Running, 2)),
            Ok(Transition::Unchanged)
        );
        let done = at(OperationState::Succeeded, 2);
        assert_eq!(
            decide(done, &report(ReportState::Succeeded, 2)),
            Ok(Transition::Unchanged)
        );
    }

    #[test]
    fn a_redelivery_starts_a_newer_attempt_and_the_old_one_is_stale() {
        let running = at(OperationState::Running, 1);
        assert_eq!(
            decide(running, &report(ReportState::Running, 2)),
            Ok(Transition::Start { attempt: 2 })
        );
        let running = at(OperationState::Running, 2);
        assert_eq!(
            decide(running, &report(ReportState::Succeeded, 1)),
            Err(Rejection::StaleAttempt {
                reported: 1,
                current: 2
            })
        );
    }

    #[test]
    fn terminal_states_never_change() {
        let done = at(OperationState::Succeeded, 1);
        for r in [
            report(ReportState::Failed, 1),
            report(ReportState::Running, 2),
            report(ReportState::Succeeded, 2),
        ] {
            assert_eq!(
                decide(done, &r),
                Err(Rejection::Finished {
                    state: OperationState::Succeeded
                })
            );
        }
    }

    #[test]
    fn contradictory_reports_are_invalid() {
        let pending = at(OperationState::Pending, 0);
        let mut failed = report(ReportState::Failed, 1);
        failed.error = None;
        assert_eq!(
            decide(pending, &failed).unwrap_err().code(),
            "invalid_report"
        );
        assert_eq!(
            decide(pending, &report(ReportState::Running, 0))
                .unwrap_err()
                .code(),
            "invalid_report"
        );
        assert_eq!(
            decide(pending, &report(ReportState::Cancelled, 1))
                .unwrap_err()
                .code(),
            "invalid_report"
        );
        assert_eq!(
            decide(
                at(OperationState::Queued, 0),
                &report(ReportState::Running, 1)
            ),
            Err(Rejection::NotDispatched)
        );
    }

    #[test]
    fn success_finishes_with_the_reported_attempt() {
        assert_eq!(
            decide(
                at(OperationState::Running, 1),
                &report(ReportState::Succeeded, 1)
            ),
            Ok(Transition::Finish {
                state: OperationState::Succeeded,
                attempt: 1
            })
        );
    }
}
