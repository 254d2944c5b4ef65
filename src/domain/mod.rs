//! The domain: resource types (what a kind's spec looks like, its actions, how it may
//! evolve), resource phases, quotas and the operation state machine.
//!
//! **Architecture invariant:** no axum, no sqlx, no NATS in here. Everything is a pure
//! function of its inputs, so it is tested without any server.

pub mod names;
pub mod phase;
pub mod quota;
pub mod region;
pub mod report;
pub mod resource_type;
pub mod role;
pub mod sealing;
pub mod spec;
pub mod webhook;

pub use gateway_proto::{Action, Kind, OperationError, OperationState, ReportState, Service};
pub use phase::Phase;
pub use role::Role;

/// A request that breaks a rule of the domain; becomes a `422` with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Stable machine-readable code, e.g. `invalid_spec`.
    pub code: std::borrow::Cow<'static, str>,
    /// Dotted path of the offending field, e.g. `spec.node_count`.
    pub field: String,
    /// The same as a JSON pointer into the request body (`/spec/node_count`), where it
    /// is known exactly; else it is derived from `field`.
    pub pointer: Option<String>,
    /// Human-readable explanation.
    pub message: String,
}

impl ValidationError {
    /// A rule broken by one field.
    pub fn new(
        code: impl Into<std::borrow::Cow<'static, str>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            code: code.into(),
            field: field.into(),
            pointer: None,
            message: message.into(),
        }
    }

    /// The same error, naming its field by the JSON pointer `pointer`.
    pub fn at(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into());
        self
    }

    /// The field as a JSON pointer into the request body: the exact one where known,
    /// else derived from the dotted field (`limits[0].zone`: `/limits/0/zone`).
    pub fn json_pointer(&self) -> String {
        if let Some(p) = &self.pointer {
            return p.clone();
        }
        let mut out = String::new();
        for part in self.field.split('.') {
            let mut pieces = part.split('[');
            let name = pieces.next().unwrap_or("");
            if !name.is_empty() {
                out.push('/');
                out.push_str(&name.replace('~', "~0").replace('/', "~1"));
            }
            for index in pieces {
                out.push('/');
                out.push_str(index.trim_end_matches(']'));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_become_json_pointers() {
        let at = |f: &str| ValidationError::new("x", f, "m").json_pointer();
        assert_eq!(at("spec.node_count"), "/spec/node_count");
        assert_eq!(at("limits[0].zone"), "/limits/0/zone");
        assert_eq!(at("limits[1]"), "/limits/1");
        assert_eq!(at("name"), "/name");
        let exact = ValidationError::new("x", "spec.a.b", "m").at("/spec/a.b");
        assert_eq!(exact.json_pointer(), "/spec/a.b");
    }
}
