//! The domain: resource kinds, their specs and validation, resource phases and the
//! operation state machine.
//!
//! **Architecture invariant:** no axum, no sqlx, no NATS in here. Everything is a pure
//! function of its inputs, so it is tested without any server.

pub mod actions;
pub mod names;
pub mod phase;
pub mod quota;
pub mod report;
pub mod role;
pub mod sealing;
pub mod spec;
pub mod webhook;

pub use gateway_proto::{
    kind_from_path, kind_path, Action, Kind, OperationError, OperationState, ReportState, Service,
};
pub use phase::Phase;
pub use role::Role;

/// A request that breaks a rule of the domain; becomes a `422` with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Stable machine-readable code, e.g. `invalid_spec`.
    pub code: &'static str,
    /// Dotted path of the offending field, e.g. `spec.node_count`.
    pub field: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ValidationError {
    /// A rule broken by one field.
    pub fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_path_that_maps_back() {
        for kind in Kind::ALL {
            assert_eq!(kind_from_path(kind_path(*kind)), Some(*kind));
        }
        assert_eq!(kind_from_path("vm"), None);
    }
}
