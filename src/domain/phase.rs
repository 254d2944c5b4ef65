//! Resource phases: what is happening to a resource right now.

use super::{Action, OperationState};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::ToSchema;

/// Coarse lifecycle of a resource, derived from its operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Its create operation has not succeeded yet.
    Provisioning,
    /// Converged on its spec.
    Ready,
    /// An update or action is in progress.
    Updating,
    /// Its delete operation is in progress.
    Deleting,
    /// The last operation failed; `status.last_error` says why.
    Failed,
    /// Deleted; kept only for the history of its operations.
    Deleted,
}

impl Phase {
    /// The value as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "provisioning",
            Phase::Ready => "ready",
            Phase::Updating => "updating",
            Phase::Deleting => "deleting",
            Phase::Failed => "failed",
            Phase::Deleted => "deleted",
        }
    }

    /// The phase a resource enters when an operation with `action` starts.
    pub fn on_start(action: Action) -> Phase {
        match action {
            Action::Create => Phase::Provisioning,
            Action::Delete => Phase::Deleting,
            _ => Phase::Updating,
        }
    }

    /// The phase a resource is left in when an operation with `action` ends in `state`,
    /// or `None` when the phase stays as it was.
    pub fn on_end(action: Action, state: OperationState) -> Option<Phase> {
        match (state, action) {
            (OperationState::Succeeded, Action::Delete) => Some(Phase::Deleted),
            (OperationState::Succeeded, _) => Some(Phase::Ready),
            (OperationState::Failed, _) => Some(Phase::Failed),
            // A cancelled create never provisioned anything: the resource goes away.
            (OperationState::Cancelled, Action::Create) => Some(Phase::Deleted),
            // Any other cancellation stopped before it changed anything.
            (OperationState::Cancelled, _) => Some(Phase::Ready),
            _ => None,
        }
    }
}

impl TryFrom<String> for Phase {
    type Error = gateway_proto::UnknownValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for Phase {
    type Err = gateway_proto::UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "provisioning" => Phase::Provisioning,
            "ready" => Phase::Ready,
            "updating" => Phase::Updating,
            "deleting" => Phase::Deleting,
            "failed" => Phase::Failed,
            "deleted" => Phase::Deleted,
            _ => {
                return Err(gateway_proto::UnknownValue {
                    what: "Phase",
                    value: s.to_owned(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_operation() {
        assert_eq!(Phase::on_start(Action::Create), Phase::Provisioning);
        assert_eq!(Phase::on_start(Action::Resize), Phase::Updating);
        assert_eq!(
            Phase::on_end(Action::Delete, OperationState::Succeeded),
            Some(Phase::Deleted)
        );
        assert_eq!(
            Phase::on_end(Action::Create, OperationState::Failed),
            Some(Phase::Failed)
        );
        assert_eq!(Phase::on_end(Action::Create, OperationState::Running), None);
        for p in [Phase::Ready, Phase::Deleted, Phase::Failed] {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
    }
}
