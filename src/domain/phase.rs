//! Resource phases: what is happening to a resource right now. The enum and its rules
//! are in `gateway_proto`, shared with the typed client.

pub use gateway_proto::Phase;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Action, OperationState};

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
