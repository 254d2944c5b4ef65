//! Resource phases: what is happening to a resource right now. The enum and its rules
//! are in `gateway_proto`, shared with the typed client.

pub use gateway_proto::Phase;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Action, OperationState};

    #[test]
    fn phases_follow_the_operation() {
        assert_eq!(Phase::on_start(&Action::create()), Phase::Provisioning);
        assert_eq!(Phase::on_start(&Action::named("resize")), Phase::Updating);
        assert_eq!(
            Phase::on_end(&Action::delete(), OperationState::Succeeded),
            Some(Phase::Deleted)
        );
        assert_eq!(
            Phase::on_end(&Action::create(), OperationState::Failed),
            Some(Phase::Failed)
        );
        assert_eq!(
            Phase::on_end(&Action::create(), OperationState::Running),
            None
        );
        for p in [Phase::Ready, Phase::Deleted, Phase::Failed] {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
    }
}
