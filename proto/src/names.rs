//! Names that become parts of NATS subjects or JetStream object names (stream names,
//! subject prefixes, zones), checked the same way by the gateway and the workers.

/// Checks that `value` can be one NATS subject token (or, with `allow_dots`, several
/// tokens joined by inner dots): letters, digits, `-` and `_`, never empty, never a
/// wildcard or whitespace. `name` is the setting it came from; the error names it.
pub fn check_token(name: &str, value: &str, allow_dots: bool) -> Result<(), String> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (allow_dots && c == '.'))
        && !value.starts_with('.')
        && !value.ends_with('.')
        && !value.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name}: may hold only letters, digits, '-' and '_'{}, got {value:?}",
            if allow_dots { " (and inner '.')" } else { "" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check_token;

    #[test]
    fn tokens_refuse_subject_syntax() {
        assert!(check_token("OPS_STREAM", "OPS", false).is_ok());
        assert!(check_token("OPS_STREAM", "a.b", false).is_err());
        assert!(check_token("OPS_SUBJECT_PREFIX", "t1.ops", true).is_ok());
        for bad in ["", "ops.*", "ops.>", "a b", ".ops", "ops.", "a..b"] {
            let err = check_token("OPS_SUBJECT_PREFIX", bad, true).unwrap_err();
            assert!(err.starts_with("OPS_SUBJECT_PREFIX:"), "{err}");
        }
    }
}
